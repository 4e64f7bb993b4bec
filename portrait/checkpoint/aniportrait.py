"""Import AniPortrait's released Lmk2Video weights into fastportrait's Pose2Video bundle.

AniPortrait (github Zejun-Yang/AniPortrait @7f6593f) ships four plain ``torch.save(OrderedDict)`` state
dicts beside three diffusers/transformers folders (its ``pretrained_model/``)::

    pretrained_model/
      denoising_unet.pth       SD1.5 UNet keys (stage 1: UNet3D built without motion modules)
      reference_unet.pth       SD1.5 UNet keys minus conv_norm_out.* / conv_out.*
      pose_guider.pth          pose guider, BatchNorm buffers included
      motion_module.pth        the 21 AnimateDiff-v2 motion modules (stage 2), incl. pos_encoder.pe
      stable-diffusion-v1-5/unet/config.json     the UNet shape (weights there are NOT used)
      sd-vae-ft-mse/           diffusers AutoencoderKL folder (config.json + weights)
      image_encoder/           transformers CLIPVisionModelWithProjection folder (config.json + weights)

Everything here maps those names 1:1 onto stock diffusers classes (``UNetMotionModel``,
``UNet2DConditionModel``) and our :class:`portrait.models.pose_guider.PoseGuider`, and loads them
*strictly*: every tensor of every file is consumed and every parameter / persistent buffer is filled,
or :class:`CheckpointMismatchError` says exactly what differs. The key rules (checked 1:1 against
diffusers 0.42.1 at full and tiny size, see ``shared/fixtures/aniportrait/README.md``):

1. keys without ``motion_modules.`` are unchanged;
2. motion keys: drop ``.temporal_transformer``; ``attention_blocks.{0,1}`` -> ``attn{1,2}``;
   ``norms.{0,1}`` -> ``norm{1,2}``; ``ff_norm`` -> ``norm3``;
3. ``attention_blocks.0.pos_encoder.pe`` -> ``pos_embed.pe`` (diffusers keeps one ``[1, 32, C]``
   sinusoid per block); ``attention_blocks.1.pos_encoder.pe`` is an identical copy and is dropped.

The library entry point is :func:`import_aniportrait` (the CLI is
``python -m portrait.checkpoint.import_aniportrait``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ANIPORTRAIT_COMMIT = "7f6593fd971c95b65f603c15ef8ce2c3fc7f5404"

DENOISING_UNET_FILE = "denoising_unet.pth"
REFERENCE_UNET_FILE = "reference_unet.pth"
POSE_GUIDER_FILE = "pose_guider.pth"
MOTION_MODULE_FILE = "motion_module.pth"
PTH_FILES = (DENOISING_UNET_FILE, REFERENCE_UNET_FILE, POSE_GUIDER_FILE, MOTION_MODULE_FILE)
SD15_UNET_CONFIG = Path("stable-diffusion-v1-5") / "unet" / "config.json"
VAE_DIR = "sd-vae-ft-mse"
IMAGE_ENCODER_DIR = "image_encoder"

EXPECTED_LAYOUT = """\
expected AniPortrait `pretrained_model/` layout (as in the AniPortrait README):
  pretrained_model/
    denoising_unet.pth
    reference_unet.pth
    pose_guider.pth
    motion_module.pth
    stable-diffusion-v1-5/unet/config.json   (only the config is read)
    sd-vae-ft-mse/config.json + diffusion_pytorch_model.{safetensors,bin}
    image_encoder/config.json + {model.safetensors,pytorch_model.bin}"""

# The reference UNet's output head: absent from reference_unet.pth (upstream deleted it because only the
# attention bank of the reference UNet is ever used). We fill it with zeros so that every parameter of a
# stock UNet2DConditionModel is defined and plain diffusers `from_pretrained` loads the folder.
REFERENCE_HEAD_KEYS = ("conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias")

# AniPortrait configs/inference/inference_v2.yaml noise_scheduler_kwargs, as the effective DDIMScheduler
# config (fixture full_size_configs.json "ddim_effective_config"): linear betas, v-prediction,
# zero-terminal-SNR rescale (Lin et al. 2024, "Common Diffusion Noise Schedules ..."), trailing spacing.
ANIPORTRAIT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": True,
}

# AniPortrait's inference defaults (scripts/pose2vid.py + configs/prompts/animation.yaml).
ANIPORTRAIT_INFERENCE_DEFAULTS: dict[str, Any] = {
    "num_inference_steps": 25,
    "guidance_scale": 3.5,
    "width": 512,
    "height": 512,
    "context_frames": 16,
    "context_overlap": 4,
    "latent_scale": 0.18215,
}

# Upstream hard-codes Transformer2DModel's default 16 heads x 88 in the pose guider; heads do not change
# any tensor shape, so they cannot be read from the file and this is the (upstream) default.
POSE_GUIDER_ATTENTION_HEADS = 16

_MAX_LISTED = 20  # keys listed per category in a mismatch error before "... and N more"


class CheckpointMismatchError(ValueError):
    """A state dict does not match its model: missing keys, unexpected keys or shape conflicts.

    Attributes ``what`` (source file(s) -> target module), ``missing``, ``unexpected`` (lists of key
    names) and ``mismatched`` (list of ``(key, file_shape, model_shape)``) hold the full lists; the
    message truncates long lists.
    """

    def __init__(
        self,
        what: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, tuple, tuple]] = (),
        note: str = "",
        origins: Mapping[str, str] | None = None,
    ):
        self.what = what
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        origins = origins or {}

        def named(k: str) -> str:
            src = origins.get(k)
            return f"{k} (file key {src})" if src and src != k else k

        if not (self.missing or self.unexpected or self.mismatched):
            super().__init__(f"{what}: {note}")
            return
        lines = [
            (
                f"{what}: state dict does not match the model ({len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape conflicts)"
            )
        ]
        if self.missing:
            lines.append(f"  missing keys (the model has them, the file does not) [{len(self.missing)}]:")
            lines += _truncated([f"    {k}" for k in self.missing])
        if self.unexpected:
            lines.append(f"  unexpected keys (the file has them, the model does not) [{len(self.unexpected)}]:")
            lines += _truncated([f"    {named(k)}" for k in self.unexpected])
        if self.mismatched:
            lines.append(f"  shape conflicts (file vs model) [{len(self.mismatched)}]:")
            lines += _truncated([f"    {named(k)}: file {list(a)} vs model {list(b)}" for k, a, b in self.mismatched])
        if note:
            lines.append(f"  {note}")
        super().__init__("\n".join(lines))


class CheckpointReadError(ValueError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, or not a tensor state dict)."""


class AniPortraitLayoutError(FileNotFoundError):
    """The AniPortrait folder lacks a required file or folder; the message names it and shows the layout."""


def _truncated(lines: list[str], limit: int = _MAX_LISTED) -> list[str]:
    if len(lines) <= limit:
        return lines
    return lines[:limit] + [f"    ... and {len(lines) - limit} more"]


# ----------------------------------------------------------------------------------------------------
# Key conversion (pure: values are passed through untouched, so tensors, meta tensors or shapes all work)
# ----------------------------------------------------------------------------------------------------


def is_motion_key(key: str) -> bool:
    """True for AnimateDiff motion-module keys (``*.motion_modules.*``) in either naming."""
    return "motion_modules." in key


def convert_motion_key(key: str) -> str | None:
    """Map one AniPortrait motion-module key to its diffusers ``UNetMotionModel`` name (``None`` = drop).

    ``down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_q.weight``
    -> ``down_blocks.0.motion_modules.0.transformer_blocks.0.attn2.to_q.weight``. Non-motion keys are
    returned unchanged.
    """
    if not is_motion_key(key):
        return key
    k = key.replace(".temporal_transformer.", ".")
    if k.endswith(".attention_blocks.1.pos_encoder.pe"):
        # Identical sinusoid to attention_blocks.0's; diffusers keeps a single buffer per block.
        return None
    k = k.replace(".attention_blocks.0.pos_encoder.pe", ".pos_embed.pe")
    for old, new in (
        (".attention_blocks.0.", ".attn1."),
        (".attention_blocks.1.", ".attn2."),
        (".norms.0.", ".norm1."),
        (".norms.1.", ".norm2."),
        (".ff_norm.", ".norm3."),
    ):
        k = k.replace(old, new)
    return k


def _same_value(a: Any, b: Any) -> bool:
    """Whether two state-dict values agree: tensors by shape+dtype+values (shape only on meta), shapes by ==."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_meta or b.is_meta:
            return True
        return bool(torch.equal(a, b))
    return _shape_of(a) == _shape_of(b)


def _shape_of(v: Any) -> tuple[int, ...]:
    """Shape of a tensor, or of a shape-like (``torch.Size`` / list / tuple of ints)."""
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    return tuple(int(s) for s in v)


def convert_denoising_unet_with_origins(
    denoising_sd: Mapping[str, Any], motion_sd: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`convert_denoising_unet`, also returning ``target key -> "file:source key"`` for error messages."""
    out: dict[str, Any] = {}
    origins: dict[str, str] = {}
    dropped_pe: list[tuple[str, str, Any]] = []
    conflicts: list[str] = []
    for fname, sd in ((DENOISING_UNET_FILE, denoising_sd), (MOTION_MODULE_FILE, motion_sd)):
        for key, value in sd.items():
            new = convert_motion_key(key)
            if new is None:
                dropped_pe.append((fname, key, value))
                continue
            if new in out:
                if not _same_value(out[new], value):
                    conflicts.append(f"{new}: {origins[new]} != {fname}:{key}")
                continue
            out[new] = value
            origins[new] = f"{fname}:{key}"
    # The dropped attention_blocks.1 sinusoid must equal the kept attention_blocks.0 one, otherwise the
    # single diffusers buffer could not reproduce upstream's second temporal attention.
    for fname, key, value in dropped_pe:
        kept = convert_motion_key(key.replace(".attention_blocks.1.", ".attention_blocks.0."))
        if kept in out and not _same_value(out[kept], value):
            conflicts.append(f"{kept}: {origins[kept]} differs from the dropped copy {fname}:{key}")
    if conflicts:
        raise CheckpointMismatchError(
            f"{DENOISING_UNET_FILE} + {MOTION_MODULE_FILE} -> denoising UNet",
            note="conflicting duplicate tensors (both files are merged; a key may appear twice only with "
            f"identical values) [{len(conflicts)}]:\n" + "\n".join(_truncated([f"    {c}" for c in conflicts])),
        )
    return out, origins


def convert_denoising_unet(denoising_sd: Mapping[str, Any], motion_sd: Mapping[str, Any]) -> dict[str, Any]:
    """AniPortrait UNet3D (``denoising_unet.pth`` + ``motion_module.pth``) -> diffusers ``UNetMotionModel`` keys.

    Both files are merged (upstream loads both non-strictly, so motion keys may turn up in either):
    spatial keys are kept as they are, motion keys are renamed by :func:`convert_motion_key`, and
    ``attention_blocks.1.pos_encoder.pe`` is dropped (after checking it equals the kept copy). A key
    present twice (in both files, or via two source names) must carry identical values, else
    :class:`CheckpointMismatchError`. Values are passed through (tensors, meta tensors or shapes).
    Full size: 686 + 588 file tensors -> 1253 ``UNetMotionModel`` tensors.
    """
    return convert_denoising_unet_with_origins(denoising_sd, motion_sd)[0]


def convert_reference_unet(sd: Mapping[str, Any], zero_head_like: Mapping[str, Any]) -> dict[str, Any]:
    """AniPortrait ``reference_unet.pth`` -> stock ``UNet2DConditionModel`` keys (names are already equal).

    Upstream's file lacks the output head (``conv_norm_out.{weight,bias}``, ``conv_out.{weight,bias}``,
    :data:`REFERENCE_HEAD_KEYS`). The reference UNet only runs to fill the attention bank, its output is
    never read, so those tensors are filled with ZEROS (shapes from ``zero_head_like``: key -> tensor or
    shape, e.g. the target model's meta state dict) in the file's floating dtype. A head already present
    in ``sd`` is kept. Values are otherwise passed through.
    """
    out = dict(sd)
    float_dtypes = [v.dtype for v in sd.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    dtype = float_dtypes[0] if float_dtypes else torch.float32
    as_tensors = any(isinstance(v, torch.Tensor) for v in sd.values()) or not sd
    for key in REFERENCE_HEAD_KEYS:
        if key in out:
            continue
        if key not in zero_head_like:
            raise KeyError(f"zero_head_like lacks {key!r} (needs all of {REFERENCE_HEAD_KEYS})")
        shape = _shape_of(zero_head_like[key])
        out[key] = torch.zeros(shape, dtype=dtype) if as_tensors else shape
    return out


_POSE_GUIDER_REQUIRED = (
    "scale",
    "conv_layers.0.weight",
    "final_proj.weight",
    "conv_layers_1.0.weight",
    "conv_layers_4.0.weight",
    "cross_attn1.proj_in.weight",
)


def convert_pose_guider(sd: Mapping[str, Any]) -> dict[str, Any]:
    """AniPortrait ``pose_guider.pth`` -> our ``PoseGuider`` keys: the identity, after validating the layout.

    Raises :class:`CheckpointMismatchError` when the keys our architecture derivation needs are absent
    (e.g. a ``module.``-prefixed DDP dump, or AniPortrait's v1 pose guider without ``cross_attn*``).
    """
    missing = [k for k in _POSE_GUIDER_REQUIRED if k not in sd]
    if missing:
        note = ""
        if any(k.startswith("module.") for k in sd):
            note = "keys carry a 'module.' prefix (a DDP state dict): strip it before importing"
        elif "cross_attn1.proj_in.weight" in missing and "final_proj.weight" not in missing:
            note = "no cross_attn* blocks: this looks like a pose guider without attention (use_ca=False), unsupported"
        raise CheckpointMismatchError(f"{POSE_GUIDER_FILE} -> pose guider", missing=missing, note=note)
    return dict(sd)


# ----------------------------------------------------------------------------------------------------
# Architecture derivation
# ----------------------------------------------------------------------------------------------------


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    return params


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


def unet2d_kwargs(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs from a diffusers ``unet/config.json`` dict.

    Drops private (``_class_name`` ...) and unknown keys (logged), fills every other argument with its
    default, so the result equals ``dict(UNet2DConditionModel(**raw).config)`` minus private keys.
    """
    from diffusers import UNet2DConditionModel

    params = _init_params(UNet2DConditionModel)
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in params)
    if unknown:
        log.warning("ignoring UNet config keys unknown to diffusers' UNet2DConditionModel: %s", unknown)
    cfg = {k: _jsonable(p.default) for k, p in params.items() if p.default is not inspect.Parameter.empty}
    cfg.update({k: _jsonable(v) for k, v in raw.items() if k in params})
    return cfg


def unet_motion_config_from_sd15(
    sd15_unet_config: Mapping[str, Any],
    *,
    motion_num_attention_heads: int = 8,
    motion_max_seq_length: int = 32,
    use_motion_mid_block: bool = True,
) -> dict[str, Any]:
    """``UNetMotionModel`` kwargs for AniPortrait's denoising UNet on an SD1.5-style UNet config.

    Equals ``dict(UNetMotionModel.from_unet2d(UNet2DConditionModel(**cfg), MotionAdapter(
    block_out_channels=cfg["block_out_channels"], motion_layers_per_block=cfg["layers_per_block"],
    motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32,
    use_motion_mid_block=True)).config)`` minus private keys, computed without building anything.
    AniPortrait puts one motion module after every resnet (``motion_module_resolutions`` 1,2,4,8) and
    one in the mid block, so the adapter's layers per block is the UNet's (2 for SD1.5, 1 for tiny);
    AnimateDiff-v2 settings: 8 heads, 1 temporal transformer layer, PE max length 32.
    """
    from diffusers import UNetMotionModel

    base = unet2d_kwargs(sd15_unet_config)
    params = _init_params(UNetMotionModel)
    cfg = {k: _jsonable(p.default) for k, p in params.items() if p.default is not inspect.Parameter.empty}
    cfg.update({k: v for k, v in base.items() if k in params})
    cfg["down_block_types"] = [
        "CrossAttnDownBlockMotion" if "CrossAttn" in t else "DownBlockMotion" for t in base["down_block_types"]
    ]
    cfg["up_block_types"] = [
        "CrossAttnUpBlockMotion" if "CrossAttn" in t else "UpBlockMotion" for t in base["up_block_types"]
    ]
    cfg["motion_num_attention_heads"] = motion_num_attention_heads
    cfg["motion_max_seq_length"] = motion_max_seq_length
    cfg["use_motion_mid_block"] = use_motion_mid_block
    cfg["layers_per_block"] = base["layers_per_block"]
    cfg["temporal_transformer_layers_per_block"] = 1
    cfg["temporal_transformer_layers_per_mid_block"] = 1
    # SD1.5's config names the head count `attention_head_dim` (a known diffusers misnomer); the motion
    # UNet calls it num_attention_heads, exactly as from_unet2d translates it.
    if not base.get("num_attention_heads"):
        cfg["num_attention_heads"] = base["attention_head_dim"]
    return cfg


def pose_guider_config_from_state_dict(
    sd: Mapping[str, Any], attention_heads: int = POSE_GUIDER_ATTENTION_HEADS
) -> dict[str, Any]:
    """``PoseGuider`` kwargs read off the tensor shapes of a ``pose_guider.pth`` state dict.

    - ``conditioning_channels`` = ``conv_layers.0.weight.shape[1]`` (3, an RGB pose image);
    - ``num_downsamples``: ``conv_layers`` is [conv, (stride-2 4x4 conv, 3x3 conv) x n, conv] with
      BN+ReLU after each conv, so n = (number of 4-D ``conv_layers.*.weight``) - 2, halved (3 upstream);
    - ``noise_latent_channels`` = ``final_proj.weight.shape[0]`` (320 upstream, 32 tiny);
    - attention inner width = ``cross_attn1.proj_in.weight.shape[0]`` (1408 upstream); the head count
      does not shape any tensor, so it is ``attention_heads`` (upstream 16) and head dim = inner / heads;
    - ``channel_mult`` = widths of ``cross_attn{1..4}.norm.weight`` / n (the UNet's block widths / n:
      (1, 2, 4, 4) for SD1.5). ``norm_num_groups`` is not visible in shapes: upstream's 32 (the default).
    Always ``mode="faithful"`` (the import reproduces upstream, see ``portrait.models.pose_guider``).
    """
    sd = convert_pose_guider(sd)
    conv_ids = sorted(
        int(k.split(".")[1])
        for k, v in sd.items()
        if k.startswith("conv_layers.") and k.endswith(".weight") and len(_shape_of(v)) == 4
    )
    n_convs = len(conv_ids)
    if n_convs < 2 or n_convs % 2:
        raise CheckpointMismatchError(
            f"{POSE_GUIDER_FILE} -> pose guider",
            note=f"conv_layers has {n_convs} convolutions {conv_ids}; expected 2 + 2 x num_downsamples",
        )
    inner = _shape_of(sd["cross_attn1.proj_in.weight"])[0]
    if inner % attention_heads:
        raise CheckpointMismatchError(
            f"{POSE_GUIDER_FILE} -> pose guider",
            note=f"attention inner width {inner} (cross_attn1.proj_in.weight) is not divisible by "
            f"{attention_heads} heads",
        )
    n = _shape_of(sd["final_proj.weight"])[0]
    widths = [_shape_of(sd[f"cross_attn{i}.norm.weight"])[0] if f"cross_attn{i}.norm.weight" in sd else None
              for i in range(1, 5)]
    if any(w is None or w % n for w in widths):
        raise CheckpointMismatchError(
            f"{POSE_GUIDER_FILE} -> pose guider",
            note=f"cross_attn1..4.norm.weight widths {widths} are not all multiples of final_proj's {n} channels",
        )
    return {
        "noise_latent_channels": n,
        "conditioning_channels": _shape_of(sd["conv_layers.0.weight"])[1],
        "num_downsamples": (n_convs - 2) // 2,
        "attention_heads": attention_heads,
        "attention_head_dim": inner // attention_heads,
        "channel_mult": [w // n for w in widths],
        "mode": "faithful",
    }


# ----------------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------------


def diff_state_dict(
    expected: Mapping[str, Any], got: Mapping[str, Any]
) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """Compare key->tensor/shape tables: ``(missing, unexpected, [(key, got_shape, expected_shape)])``."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = [
        (k, _shape_of(got[k]), _shape_of(expected[k]))
        for k in expected
        if k in got and _shape_of(got[k]) != _shape_of(expected[k])
    ]
    return missing, unexpected, mismatched


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    *,
    origins: Mapping[str, str] | None = None,
) -> nn.Module:
    """Load ``state_dict`` into ``module`` with nothing left over on either side, or raise ONE clear error.

    Checks every parameter and persistent buffer of ``module`` against ``state_dict`` by name and shape
    first and raises :class:`CheckpointMismatchError` (missing / unexpected / shape conflicts, lists
    truncated, ``what`` naming the source file and target) before touching the module. If the module has
    tensors on the meta device (built under ``with torch.device("meta"):``), the tensors are *assigned*
    (``load_state_dict(assign=True)``: no second copy, dtype from the state dict); otherwise they are
    copied into the existing tensors (dtype of the module). Afterwards no tensor may remain on meta
    (a non-persistent buffer cannot be filled from a file), else :class:`CheckpointMismatchError`.
    ``origins`` (target key -> source key) only improves the message. Returns ``module``.
    """
    expected = module.state_dict()
    missing, unexpected, mismatched = diff_state_dict(expected, state_dict)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what, missing, unexpected, mismatched, origins=origins)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor) or v.is_meta]
    if bad:
        raise CheckpointMismatchError(what, note=f"values without data (not tensors, or meta tensors): {bad[:5]}")
    on_meta = any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))
    module.load_state_dict(dict(state_dict), strict=True, assign=on_meta)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointMismatchError(
            what,
            note=f"tensors still on the meta device after loading (non-persistent buffers?): {left[:10]}; "
            "build this module on CPU instead of meta",
        )
    return module


def cast_floating(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating-point tensors to ``dtype`` (integer buffers such as ``num_batches_tracked`` untouched)."""
    if dtype is None:
        return dict(sd)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build ``factory()`` on the meta device (no allocation, no random init) for :func:`load_strict`.

    A module with non-persistent buffers (values that no file carries) is rebuilt on CPU instead.
    """
    with torch.device("meta"):
        module = factory()
    persistent = set(module.state_dict())
    if any(name not in persistent for name, _ in module.named_buffers()):
        log.info("%s has non-persistent buffers: building on CPU", type(module).__name__)
        module = factory()
    return module


# ----------------------------------------------------------------------------------------------------
# Reading the AniPortrait folder
# ----------------------------------------------------------------------------------------------------


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def read_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """Read one upstream ``.pth`` state dict (``torch.load(weights_only=True, map_location="cpu")``).

    Zip-format files (``torch.save``'s default) are memory-mapped, so a 3.4 GB UNet file costs no RAM
    until used. Raises :class:`AniPortraitLayoutError` if absent and :class:`CheckpointReadError` (naming
    the file) if it is truncated, corrupt, or not a flat ``{str: Tensor}`` mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise AniPortraitLayoutError(f"missing checkpoint file {path}\n{EXPECTED_LAYOUT}")
    try:
        mmap = zipfile.is_zipfile(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError / zipfile errors
        size = path.stat().st_size
        raise CheckpointReadError(
            f"cannot read checkpoint {path} ({size} bytes): {type(e).__name__}: {e}\n"
            "the file is truncated or corrupt (re-download it), or not a torch.save() state dict"
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointReadError(f"checkpoint {path} is not a flat {{name: tensor}} state dict (got {type(obj).__name__})")
    return dict(obj)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise AniPortraitLayoutError(f"missing {what}: {path}\n{EXPECTED_LAYOUT}")
    return path


def read_aniportrait_dir(src: str | Path, *, load: bool = True, hash_files: bool = True) -> dict[str, Any]:
    """Validate an AniPortrait ``pretrained_model/`` folder and read what the import needs.

    Returns a dict:
      ``src`` (resolved Path); ``paths`` (file name -> Path for the four ``.pth``);
      ``state_dicts`` (file name -> {key: Tensor}, CPU, memory-mapped; empty if ``load=False``);
      ``sha256`` (file name -> hex digest; empty if ``hash_files=False``);
      ``unet_config`` (raw dict of ``stable-diffusion-v1-5/unet/config.json``);
      ``vae_dir`` / ``image_encoder_dir`` (Paths of the diffusers / transformers folders).
    Every required piece is checked before any weight is read, so a missing piece fails fast with
    :class:`AniPortraitLayoutError` naming the path and showing the expected layout.
    """
    src = Path(src).expanduser().resolve()
    if not src.is_dir():
        raise AniPortraitLayoutError(f"AniPortrait folder not found: {src}\n{EXPECTED_LAYOUT}")
    paths = {name: _require(src / name, f"AniPortrait checkpoint {name}") for name in PTH_FILES}
    unet_cfg_path = _require(src / SD15_UNET_CONFIG, "SD1.5 UNet config (gives the UNet shape)")
    vae_dir = _require(src / VAE_DIR, "VAE folder (diffusers AutoencoderKL, stabilityai/sd-vae-ft-mse)")
    _require(vae_dir / "config.json", "VAE config")
    enc_dir = _require(src / IMAGE_ENCODER_DIR, "image encoder folder (transformers CLIPVisionModelWithProjection)")
    _require(enc_dir / "config.json", "image encoder config")
    try:
        unet_config = json.loads(unet_cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointReadError(f"cannot parse {unet_cfg_path}: {e}") from e
    state_dicts = {name: read_pth(p) for name, p in paths.items()} if load else {}
    digests = {name: sha256_file(p) for name, p in paths.items()} if hash_files else {}
    return {
        "src": src,
        "paths": paths,
        "state_dicts": state_dicts,
        "sha256": digests,
        "unet_config": unet_config,
        "vae_dir": vae_dir,
        "image_encoder_dir": enc_dir,
    }


# ----------------------------------------------------------------------------------------------------
# Whole import
# ----------------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _read_folder(path: Path, what: str, reader: Callable[..., Any], **kwargs) -> Any:
    """``reader(path, **kwargs)`` for a diffusers/transformers folder; failures become :class:`CheckpointReadError`."""
    try:
        return reader(path, **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointReadError(f"cannot read the {what} folder {path}: {type(e).__name__}: {first}\n{EXPECTED_LAYOUT}") from e


def _check_loading_info(info: Mapping[str, Any], what: str) -> None:
    """Turn a diffusers/transformers ``output_loading_info`` into our strictness policy.

    Missing or shape-mismatched weights (which from_pretrained would silently random-init) are errors;
    unexpected weights in these third-party folders are only logged (transformers already filters known
    legacy keys such as ``position_ids``).
    """
    missing = list(info.get("missing_keys") or [])
    mism = [(m[0], tuple(m[1]), tuple(m[2])) if isinstance(m, (tuple, list)) and len(m) == 3 else (str(m), (), ())
            for m in (info.get("mismatched_keys") or [])]
    if missing or mism:
        raise CheckpointMismatchError(what, missing=missing, mismatched=mism)
    if info.get("unexpected_keys"):
        log.warning("%s: ignoring unexpected weights %s", what, sorted(info["unexpected_keys"])[:_MAX_LISTED])


def check_components_fit(unet2d_cfg: Mapping[str, Any], pg_cfg: Mapping[str, Any], vae_cfg: Mapping[str, Any],
                         image_encoder_cfg: Any, src: str | Path = "") -> None:
    """Raise :class:`CheckpointMismatchError` if the parts of the folder cannot work together.

    Each file can load strictly into its own module and the assembly still be wrong, e.g. an image encoder
    whose projection (768 for ViT-L/14) is not the UNet's ``cross_attention_dim``. Checked:
    pose features ``n * [1, 1, m1, m2, m3]`` = the UNet's block widths (they are added to its hidden states);
    pose-guider downsampling ``2**num_downsamples`` = the VAE's factor (pose image -> latent grid);
    VAE ``latent_channels`` = UNet ``in_channels``; CLIP ``projection_dim`` = ``cross_attention_dim``.
    """
    boc = list(unet2d_cfg["block_out_channels"])
    n = pg_cfg["noise_latent_channels"]
    problems = []
    pose_widths = [n * m for m in pg_cfg.get("channel_mult", [1, 2, 4, 4])]
    if pose_widths != boc:
        problems.append(f"pose guider feature widths {pose_widths} ({POSE_GUIDER_FILE}) != UNet block_out_channels {boc}")
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    if 2 ** pg_cfg["num_downsamples"] != vae_factor:
        problems.append(f"pose guider downsamples {2 ** pg_cfg['num_downsamples']}x but the VAE ({VAE_DIR}) {vae_factor}x")
    if vae_cfg.get("latent_channels", 4) != unet2d_cfg["in_channels"]:
        problems.append(f"VAE latent_channels {vae_cfg.get('latent_channels')} != UNet in_channels {unet2d_cfg['in_channels']}")
    proj = getattr(image_encoder_cfg, "projection_dim", None)
    if proj != unet2d_cfg["cross_attention_dim"]:
        problems.append(f"image encoder projection_dim {proj} ({IMAGE_ENCODER_DIR}) != UNet cross_attention_dim "
                        f"{unet2d_cfg['cross_attention_dim']} ({SD15_UNET_CONFIG})")
    if problems:
        raise CheckpointMismatchError(f"AniPortrait folder {src}", note="components do not fit together:\n  - "
                                      + "\n  - ".join(problems))


# AnimateDiff-v2 motion settings in portrait.models.unets' `motion` vocabulary (inference_v2.yaml).
ANIPORTRAIT_MOTION = {"num_attention_heads": 8, "max_seq_length": 32, "norm_num_groups": 32, "mid_block": True}
_CLIP_ARCH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size",
                   "image_size", "projection_dim", "hidden_act", "layer_norm_eps", "num_channels")


def bundle_model_config(unet2d_cfg: Mapping[str, Any], pg_cfg: Mapping[str, Any], vae: nn.Module,
                        image_encoder: nn.Module) -> dict[str, Any]:
    """``portrait.models.bundle.ModelConfig`` fields describing the imported architecture (as a dict).

    ``resolution`` = UNet ``sample_size`` x VAE factor (64 x 8 = 512 for SD1.5); the pose guider entry
    omits ``noise_latent_channels`` (the bundle takes it from the UNet's first width);
    ``uncond_reference: self`` is upstream's CFG reader (``uc_mask`` in mutual_self_attention.py).
    """
    from diffusers import AutoencoderKL

    vae_params = _init_params(AutoencoderKL)
    vae_cfg = {k: _jsonable(v) for k, v in vae.config.items() if k in vae_params}
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    return {
        "name": "aniportrait",
        "resolution": int(unet2d_cfg["sample_size"]) * vae_factor,
        "unet": {k: _jsonable(v) for k, v in unet2d_cfg.items()},
        "motion": dict(ANIPORTRAIT_MOTION),
        "vae": vae_cfg,
        "image_encoder": {k: getattr(image_encoder.config, k) for k in _CLIP_ARCH_KEYS},
        "pose_guider": {k: v for k, v in pg_cfg.items() if k != "noise_latent_channels"},
        "scheduler": dict(ANIPORTRAIT_SCHEDULER_CONFIG),
        "uncond_reference": "self",
        "latent_scale": ANIPORTRAIT_INFERENCE_DEFAULTS["latent_scale"],
    }


def import_aniportrait(src: str | Path, dtype: torch.dtype = torch.float32, *, progress: bool = True):
    """Build a :class:`portrait.models.bundle.Pose2VideoModel` from an AniPortrait ``pretrained_model/`` folder.

    Architectures come from the folder (UNet: ``stable-diffusion-v1-5/unet/config.json``; pose guider:
    :func:`pose_guider_config_from_state_dict`; VAE/image encoder: their own configs), so a tiny folder
    of the same layout imports into a tiny model. Every ``.pth`` is loaded with :func:`load_strict`;
    floating tensors are cast to ``dtype`` (integer buffers are kept); :func:`check_components_fit` runs
    before any model is built. The returned bundle's ``config`` (a ``ModelConfig``) records pose guider
    ``mode: faithful`` and ``uncond_reference: self`` (upstream's CFG gives the unconditional half plain
    self-attention: ``uc_mask`` in its ``mutual_self_attention.py``); its ``metadata`` records those too,
    plus the source path and each file's sha256.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNetMotionModel
    from tqdm.auto import tqdm
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from portrait import config as config_lib
    from portrait.models.bundle import ModelConfig, Pose2VideoModel
    from portrait.models.pose_guider import PoseGuider

    steps = tqdm(total=7, desc="import AniPortrait", disable=not progress, unit="part")

    def step(msg: str) -> None:
        steps.set_postfix_str(msg)
        log.info("AniPortrait import: %s", msg)

    step("reading checkpoints")
    folder = read_aniportrait_dir(src)
    sds = folder["state_dicts"]
    unet2d_cfg = unet2d_kwargs(folder["unet_config"])
    pg_cfg = pose_guider_config_from_state_dict(sds[POSE_GUIDER_FILE])
    vae_cfg = _read_folder(folder["vae_dir"], "VAE", AutoencoderKL.load_config)
    enc_cfg = _read_folder(folder["image_encoder_dir"], "image encoder", CLIPVisionConfig.from_pretrained)
    check_components_fit(unet2d_cfg, pg_cfg, vae_cfg, enc_cfg, folder["src"])
    src_dtypes = sorted({str(v.dtype).removeprefix("torch.") for sd in sds.values() for v in sd.values() if v.is_floating_point()})
    steps.update()

    step("denoising UNet")
    motion_cfg = unet_motion_config_from_sd15(unet2d_cfg)
    denoising = build_on_meta(lambda: UNetMotionModel(**motion_cfg))
    den_sd, origins = convert_denoising_unet_with_origins(sds[DENOISING_UNET_FILE], sds[MOTION_MODULE_FILE])
    load_strict(denoising, cast_floating(den_sd, dtype), f"{DENOISING_UNET_FILE} + {MOTION_MODULE_FILE} -> "
                "denoising UNet (diffusers UNetMotionModel)", origins=origins)
    steps.update()

    step("reference UNet")
    reference = build_on_meta(lambda: UNet2DConditionModel(**unet2d_cfg))
    ref_sd = convert_reference_unet(sds[REFERENCE_UNET_FILE], reference.state_dict())
    load_strict(reference, cast_floating(ref_sd, dtype), f"{REFERENCE_UNET_FILE} -> reference UNet "
                "(diffusers UNet2DConditionModel, zero-filled output head)")
    steps.update()

    step("pose guider")
    pose_guider = build_on_meta(lambda: PoseGuider(**pg_cfg))
    load_strict(pose_guider, cast_floating(convert_pose_guider(sds[POSE_GUIDER_FILE]), dtype),
                f"{POSE_GUIDER_FILE} -> pose guider (PoseGuider {pg_cfg})")
    steps.update()

    step("VAE")
    vae, info = _read_folder(folder["vae_dir"], "VAE", AutoencoderKL.from_pretrained, torch_dtype=dtype,
                             output_loading_info=True)
    _check_loading_info(info, f"{folder['vae_dir']} -> VAE (AutoencoderKL)")
    steps.update()

    step("image encoder")
    image_encoder, info = _read_folder(folder["image_encoder_dir"], "image encoder",
                                       CLIPVisionModelWithProjection.from_pretrained, dtype=dtype, output_loading_info=True)
    _check_loading_info(info, f"{folder['image_encoder_dir']} -> image encoder (CLIPVisionModelWithProjection)")
    steps.update()

    step("bundle")
    for m in (denoising, reference, pose_guider, vae, image_encoder):
        m.eval().requires_grad_(False)
    metadata = {
        "title": "AniPortrait teacher (imported)",
        "pose_guider_mode": "faithful",
        "uncond_reference": "self",
        "dtype": next(k for k, v in DTYPES.items() if v == dtype),
        "source": {
            "kind": "aniportrait",
            "path": str(folder["src"]),
            "upstream_commit": ANIPORTRAIT_COMMIT,
            "file_dtypes": src_dtypes,
            "sha256": dict(folder["sha256"]),
        },
    }
    model_config = bundle_model_config(unet2d_cfg, pg_cfg, vae, image_encoder)
    model = Pose2VideoModel.from_components(
        vae=vae,
        image_encoder=image_encoder,
        reference_unet=reference,
        denoising_unet=denoising,
        pose_guider=pose_guider,
        scheduler_config=dict(ANIPORTRAIT_SCHEDULER_CONFIG),
        config=config_lib.from_dict(ModelConfig, model_config, source="AniPortrait import"),
        metadata=metadata,
    )
    steps.update()
    steps.close()
    return model


def model_card(metadata: Mapping[str, Any], pose_guider_config: Mapping[str, Any]) -> str:
    """Markdown model card for an imported AniPortrait teacher (``metadata`` as written by :func:`import_aniportrait`)."""
    src = metadata["source"]
    sums = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in sorted(src["sha256"].items()))
    pg = {k: v for k, v in pose_guider_config.items() if not k.startswith("_")}
    return f"""---
library_name: fastportrait
tags: [pose-to-video, portrait-animation, aniportrait]
---
# AniPortrait teacher (imported)

AniPortrait's landmark-to-video model (github Zejun-Yang/AniPortrait @{src['upstream_commit'][:7]}) converted
to the fastportrait model-folder format by `python -m portrait.checkpoint.import_aniportrait`.
Load it with `portrait.models.bundle.Pose2VideoModel.from_pretrained(path)`.

- Source folder: `{src['path']}` (file dtypes: {', '.join(src['file_dtypes']) or '-'}); stored as {metadata['dtype']}.
- Denoising UNet: diffusers `UNetMotionModel` (SD1.5 + AnimateDiff-v2 motion modules), renamed 1:1.
- Reference UNet: diffusers `UNet2DConditionModel`. Its output head (`conv_norm_out`, `conv_out`) is absent
  upstream and is ZERO-filled here: only the reference UNet's attention bank is ever used.
- Pose guider: `{pg}`. `mode: faithful` reproduces upstream's quirks (batch-statistics BatchNorm,
  reference pose without effect).
- `uncond_reference: self`: the unconditional CFG half uses plain self-attention, as upstream.
- Scheduler: DDIM, v-prediction, zero-terminal-SNR, trailing spacing; 25 steps, CFG 3.5 by default.

| file | sha256 |
|---|---|
{sums}

Licences: AniPortrait (Apache-2.0); weights derived from Stable Diffusion v1.5 (CreativeML OpenRAIL-M);
sd-vae-ft-mse (MIT); CLIP image encoder (MIT). Check them before redistributing.
"""
