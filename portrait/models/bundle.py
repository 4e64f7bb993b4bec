"""The ``Pose2VideoModel`` bundle and its model folder.

A model folder (what ``infer/`` reads, what every job exports)::

    MODEL_DIR/
      fastportrait.json        format version, kind, the resolved model config, extra metadata
      README.md                model card
      vae/                     diffusers AutoencoderKL          (plain diffusers ``from_pretrained`` works)
      image_encoder/           transformers CLIPVisionModelWithProjection
      reference_unet/          diffusers UNet2DConditionModel
      denoising_unet/          diffusers UNetMotionModel (+ widths.json when pruned, see portrait.models.widths)
      pose_guider/             portrait PoseGuider (diffusers ModelMixin format)
      scheduler/               diffusers DDIMScheduler config

All weights are safetensors; no pickled modules. Writes go to a temporary sibling folder that is renamed
into place, so an interrupted export never leaves a half-written folder (the previous one survives).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNetMotionModel
from torch import nn
from transformers import CLIPVisionModelWithProjection

from portrait import config as config_lib
from portrait.models.pose_guider import PoseGuider
from portrait.models.reference import PoseInjection, ReferenceAttention, make_motion_norms_per_frame
from portrait.models.unets import build_denoising_unet, build_image_encoder, build_reference_unet, build_vae, sd_unet_config
from portrait.models.widths import WidthManifestError, load_unet, save_manifest

FORMAT_VERSION = 1
KIND = "fastportrait.pose2video"
COMPONENTS = ("vae", "image_encoder", "reference_unet", "denoising_unet", "pose_guider", "scheduler")
UNCOND_REFERENCE_MODES = ("zero_embed", "self")

# DESIGN §1 / AniPortrait inference_v2.yaml: DDIM, linear betas, v-prediction, zero-SNR, trailing.
TEACHER_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="linear",
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=1,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)


class ModelFolderError(ValueError):
    """A model folder is missing, incomplete, corrupt, or of another model kind."""


@dataclass
class ModelConfig:
    """Architecture of a Pose2Video model. ``configs/model/*.yaml`` fill it; exports embed it.

    The component dicts hold constructor overrides for the stock classes (validated by name).
    """

    name: str = "tiny"
    resolution: int = 64
    # SD-style UNet2DConditionModel kwargs shared by both UNets (overrides of SD1.5).
    unet: dict[str, Any] = field(default_factory=lambda: dict(
        block_out_channels=[32, 64, 64, 64], layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=4, sample_size=16,
    ))
    motion: dict[str, Any] = field(default_factory=lambda: dict(num_attention_heads=4))
    vae: dict[str, Any] = field(default_factory=lambda: dict(
        block_out_channels=[16, 32, 32], layers_per_block=1, norm_num_groups=16, latent_channels=4, sample_size=64,
    ))
    image_encoder: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
        patch_size=8, image_size=32, projection_dim=32,
    ))
    pose_guider: dict[str, Any] = field(default_factory=lambda: dict(attention_heads=2, attention_head_dim=32, mode="faithful"))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(TEACHER_SCHEDULER))
    # How the unconditional CFG half sees the reference: "zero_embed" = its own bank from a reference UNet
    # run with zero CLIP embeddings (DESIGN §1); "self" = plain self-attention, exactly upstream's
    # mutual_self_attention reader (uc_mask), used by the faithful AniPortrait import.
    uncond_reference: str = "zero_embed"
    # w-embedding for guidance-distilled students: UNetMotionModel.time_cond_proj_dim (None = teacher).
    time_cond_proj_dim: int | None = None
    latent_scale: float = 0.18215


def _check_kwargs(what: str, cls, kwargs: dict) -> None:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise config_lib.ConfigError(f"unknown {what} key(s) {unknown} (not arguments of {cls.__name__})")


def validate_model_config(cfg: ModelConfig) -> None:
    from transformers import CLIPVisionConfig

    _check_kwargs("model.unet", UNet2DConditionModel, cfg.unet)
    _check_kwargs("model.vae", AutoencoderKL, cfg.vae)
    _check_kwargs("model.pose_guider", PoseGuider, cfg.pose_guider)
    _check_kwargs("model.scheduler", DDIMScheduler, cfg.scheduler)
    bad_ie = [k for k in cfg.image_encoder if not hasattr(CLIPVisionConfig(), k)]
    if bad_ie:
        raise config_lib.ConfigError(f"unknown model.image_encoder key(s) {bad_ie}")
    bad_m = [k for k in cfg.motion if k not in ("num_attention_heads", "max_seq_length", "norm_num_groups", "mid_block")]
    if bad_m:
        raise config_lib.ConfigError(f"unknown model.motion key(s) {bad_m}")
    if cfg.uncond_reference not in UNCOND_REFERENCE_MODES:
        raise config_lib.ConfigError(f"model.uncond_reference must be one of {UNCOND_REFERENCE_MODES}, got {cfg.uncond_reference!r}")
    vae_factor = 2 ** (len(cfg.vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    if cfg.resolution % (vae_factor * 8) != 0:
        raise config_lib.ConfigError(f"model.resolution {cfg.resolution} must be a multiple of {vae_factor * 8} (VAE factor x UNet 8x)")


class Pose2VideoModel(nn.Module):
    """VAE + image encoder + reference UNet + denoising UNet + pose guider + scheduler config.

    Attribute names match the model folder's component folders. On construction the reference-attention
    processors, the per-frame motion GroupNorm and the pose-injection hooks are attached.
    """

    def __init__(self, vae: AutoencoderKL, image_encoder: CLIPVisionModelWithProjection, reference_unet: UNet2DConditionModel,
                 denoising_unet: UNetMotionModel, pose_guider: PoseGuider, scheduler_config: dict, config: ModelConfig,
                 metadata: dict | None = None):
        super().__init__()
        self.vae = vae
        self.image_encoder = image_encoder
        self.reference_unet = reference_unet
        self.denoising_unet = denoising_unet
        self.pose_guider = pose_guider
        self.scheduler_config = dict(scheduler_config)
        self.config = config
        self.metadata = dict(metadata or {})
        self.attach()

    # -- construction ---------------------------------------------------------------------------
    def attach(self) -> None:
        """(Re-)attach our behaviour to the stock modules. Call after replacing a UNet (e.g. pruning)."""
        if hasattr(self, "pose_injection"):
            for h in self.pose_injection.handles:
                h.remove()
        make_motion_norms_per_frame(self.denoising_unet)
        self.reference = ReferenceAttention(self.reference_unet, self.denoising_unet)
        self.pose_injection = PoseInjection(self.denoising_unet)

    def __deepcopy__(self, memo: dict) -> Pose2VideoModel:
        """A working copy: the components are deep-copied and our behaviour is attached afresh.

        A plain deepcopy is wrong here: the pose-injection hooks on the down blocks are closures, which deepcopy
        shares instead of copying, so the copy's down blocks would read *this* bundle's pose features (i.e. none).
        """
        import copy

        parts = {name: copy.deepcopy(getattr(self, name), memo) for name in COMPONENTS if name != "scheduler"}
        unet = parts["denoising_unet"]
        ids = {h.id for h in self.pose_injection.handles}
        for mod in [unet.conv_in, *unet.down_blocks]:  # drop the copied hooks; attach() installs new ones
            for hooks in (mod._forward_hooks, mod._forward_hooks_with_kwargs, mod._forward_hooks_always_called):
                for i in ids:
                    hooks.pop(i, None)
        clone = type(self)(**parts, scheduler_config=copy.deepcopy(self.scheduler_config, memo),
                           config=copy.deepcopy(self.config, memo), metadata=copy.deepcopy(self.metadata, memo))
        clone.train(self.training)
        memo[id(self)] = clone
        return clone

    @classmethod
    def from_components(cls, **kw) -> Pose2VideoModel:
        return cls(**kw)

    @classmethod
    def from_config(cls, cfg: ModelConfig, seed: int | None = 0) -> Pose2VideoModel:
        """Freshly initialised model (deterministic given ``seed``)."""
        validate_model_config(cfg)
        if seed is not None:
            torch.manual_seed(seed)
        sd = sd_unet_config(cfg.unet)
        vae_factor = 2 ** (len(cfg.vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        pg_kwargs = dict(cfg.pose_guider)
        pg_kwargs.setdefault("num_downsamples", {2: 1, 4: 2, 8: 3}[vae_factor])
        boc = sd["block_out_channels"]
        pg_kwargs.setdefault("channel_mult", tuple(c // boc[0] for c in boc))
        return cls(
            vae=build_vae(cfg.vae),
            image_encoder=build_image_encoder(cfg.image_encoder),
            reference_unet=build_reference_unet(sd),
            denoising_unet=build_denoising_unet(sd, cfg.motion, cfg.time_cond_proj_dim),
            pose_guider=PoseGuider(noise_latent_channels=sd["block_out_channels"][0], **pg_kwargs),
            scheduler_config=dict(cfg.scheduler),
            config=cfg,
        )

    # -- properties -----------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.denoising_unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoising_unet.parameters()).dtype

    def make_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler(**self.scheduler_config)

    # -- the building blocks every job composes ---------------------------------------------------
    def encode_images(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents (N, 4, H/s, W/s); the posterior mean unless ``sample``."""
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return z * self.config.latent_scale

    def decode_latents(self, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Scaled latents (N, 4, h, w) -> images (N, 3, H, W) in [-1, 1], ``batch_size`` frames per VAE call."""
        z = latents.to(self.vae.dtype) / self.config.latent_scale
        bs = batch_size or z.shape[0]
        return torch.cat([self.vae.decode(z[i : i + bs]).sample for i in range(0, z.shape[0], bs)])

    def encode_reference_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> CLIP ``image_embeds`` as encoder states (B, 1, D).

        Preprocessing as CLIPImageProcessor: resize to the encoder's size (bicubic), CLIP mean/std.
        """
        size = self.image_encoder.config.image_size
        x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        mean = x.new_tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = x.new_tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(self.image_encoder.dtype)
        return self.image_encoder(pixel_values=x).image_embeds.unsqueeze(1)

    def compute_bank(self, ref_latents: torch.Tensor, encoder_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the reference UNet once at t=0 and return its attention bank {block path: (B, N, C)}."""
        t = torch.zeros(ref_latents.shape[0], device=ref_latents.device, dtype=torch.long)
        with self.reference.write() as bank:
            self.reference_unet(ref_latents.to(self.reference_unet.dtype), t, encoder_hidden_states=encoder_states.to(self.reference_unet.dtype))
            tokens = dict(bank.tokens)
        bank.clear()
        return tokens

    def pose_features(self, pose: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, F, H, W) pose images in [-1, 1] -> 5 maps (B*F, C_i, h_i, w_i)."""
        return self.pose_guider(pose.to(self.pose_guider.dtype))

    def denoise(self, x: torch.Tensor, t: torch.Tensor, encoder_states: torch.Tensor, pose_feats: list[torch.Tensor] | None,
                bank: dict[str, torch.Tensor] | None, active: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
                unet: UNetMotionModel | None = None) -> torch.Tensor:
        """One denoising-UNet evaluation.

        Args:
            x: (B, 4, F, h, w) noisy latents. t: scalar or (B,) timesteps.
            encoder_states: (B, 1, D); repeated per frame because UNetMotionModel wants batch B*F.
            pose_feats: 5 maps (B*F, C_i, h_i, w_i) or None (no pose).
            bank: reference tokens {path: (B, N, C)} or None / {} for no reference attention.
            active: (B,) bool, samples that read the bank (None = all).
            timestep_cond: (B, cond_dim) guidance embedding for students with ``time_cond_proj_dim``.
            unet: another denoising UNet made runnable by :meth:`attach_unet` (distillation's frozen teacher /
                target copies); None = this bundle's ``denoising_unet``.
        Returns:
            (B, 4, F, h, w) model output in the scheduler's prediction type (v for the teacher).
        """
        f = x.shape[2]
        net = self.denoising_unet if unet is None else unet
        injection = self.pose_injection if unet is None else self._extra_injection(unet)
        enc = encoder_states.to(net.dtype).repeat_interleave(f, dim=0)
        with self.reference.read(bank, f, active), injection.use(pose_feats):
            return net(x.to(net.dtype), t, encoder_hidden_states=enc, timestep_cond=timestep_cond).sample

    def attach_unet(self, unet: UNetMotionModel) -> UNetMotionModel:
        """Give another denoising UNet this bundle's behaviour so ``denoise(..., unet=unet)`` runs it.

        Installs the per-frame motion GroupNorm, reference-attention readers on *this* bundle's bank and
        pose-injection hooks. The UNet is NOT registered as a submodule (distillation keeps its frozen teacher
        and EMA target outside the accelerate-prepared module). Call again after :meth:`attach`.
        """
        make_motion_norms_per_frame(unet)
        self.reference.install(unet, write=False)
        old = unet.__dict__.get("_fastportrait_pose_injection")
        if old is not None:
            for h in old.handles:
                h.remove()
        unet.__dict__["_fastportrait_pose_injection"] = PoseInjection(unet)  # plain attribute, not a submodule
        return unet

    @staticmethod
    def _extra_injection(unet: UNetMotionModel) -> PoseInjection:
        inj = unet.__dict__.get("_fastportrait_pose_injection")
        if inj is None:
            raise RuntimeError("this UNet was not attached to the bundle: call model.attach_unet(unet) first")
        return inj

    # -- folder I/O -----------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, model_card: str | None = None, metadata: dict | None = None,
                        storage_dtype: torch.dtype | None = None) -> Path:
        """Write the model folder atomically (temp sibling folder, then rename).

        ``storage_dtype`` (e.g. ``torch.float16``) stores a cast copy, halving the folder; ``from_pretrained``
        loads it back as fp32 unless asked for another dtype.
        """
        if storage_dtype is not None and storage_dtype != self.dtype:
            import copy

            clone = copy.deepcopy(self).to(storage_dtype)
            clone.metadata["storage_dtype"] = str(storage_dtype).replace("torch.", "")
            return clone.save_pretrained(path, model_card, metadata)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.metadata)
        meta.update(metadata or {})
        _sweep_stale_tmp(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
        try:
            self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            self.image_encoder.save_pretrained(tmp / "image_encoder", safe_serialization=True)
            self.reference_unet.save_pretrained(tmp / "reference_unet", safe_serialization=True)
            self.denoising_unet.save_pretrained(tmp / "denoising_unet", safe_serialization=True)
            # A pruned UNet's widths differ from its config: record them so from_pretrained rebuilds the shapes.
            save_manifest(self.denoising_unet, tmp / "denoising_unet", meta.get("pruning"))
            self.pose_guider.save_pretrained(tmp / "pose_guider", safe_serialization=True)
            DDIMScheduler(**self.scheduler_config).save_pretrained(tmp / "scheduler")
            info = {"format_version": FORMAT_VERSION, "kind": KIND, "model_config": config_lib.to_dict(self.config), "metadata": meta}
            (tmp / "fastportrait.json").write_text(json.dumps(info, indent=2, default=str))
            (tmp / "README.md").write_text(model_card or default_model_card(self, meta))
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Pose2VideoModel:
        path = Path(path)
        info = read_model_info(path)
        cfg = config_lib.from_dict(ModelConfig, info["model_config"], source=f"{path}/fastportrait.json")
        for comp in COMPONENTS:
            if not (path / comp).is_dir():
                raise ModelFolderError(f"model folder {path} is missing the '{comp}/' component; re-export it or point --model at a complete folder")
        try:
            kw = dict(torch_dtype=dtype) if dtype is not None else {}
            vae = AutoencoderKL.from_pretrained(path / "vae", **kw)
            image_encoder = CLIPVisionModelWithProjection.from_pretrained(path / "image_encoder", dtype=dtype or torch.float32)
            reference_unet = UNet2DConditionModel.from_pretrained(path / "reference_unet", **kw)
            denoising_unet = load_unet(path / "denoising_unet", dtype)  # plain diffusers, or config + widths.json
            pose_guider = PoseGuider.from_pretrained(path / "pose_guider", **kw)
            scheduler_config = {k: v for k, v in DDIMScheduler.load_config(path / "scheduler").items() if not k.startswith("_")}
        except ModelFolderError:
            raise
        except WidthManifestError as e:
            raise ModelFolderError(f"cannot load the pruned denoising UNet of {path}: {e}") from None
        except Exception as e:
            raise ModelFolderError(f"cannot load model folder {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        model = cls(vae, image_encoder, reference_unet, denoising_unet, pose_guider, scheduler_config, cfg, info.get("metadata"))
        return model.to(device).eval()


def load_folder_vae(path: str | Path, purpose: str = "") -> tuple[AutoencoderKL, float]:
    """(frozen ``AutoencoderKL``, ``latent_scale``) of a Pose2Video model folder, without loading the rest; the folder
    checks (and their errors) are those of :meth:`Pose2VideoModel.from_pretrained`. ``purpose`` ends the error of a
    folder without ``vae/``."""
    p = Path(path)
    info = read_model_info(p)
    if not (p / "vae").is_dir():
        raise FileNotFoundError(f"model folder {p} has no vae/{f' (needed by {purpose})' if purpose else ''}; "
                                "point to a complete model folder")
    vae = AutoencoderKL.from_pretrained(p / "vae").eval().requires_grad_(False)
    return vae, float(info.get("model_config", {}).get("latent_scale", vae.config.scaling_factor))


def read_model_info(path: Path) -> dict:
    if not path.exists():
        raise ModelFolderError(f"model folder not found: {path}. Build one with `python -m portrait.models.build --out {path}` or import AniPortrait weights.")
    meta = path / "fastportrait.json"
    if not meta.is_file():
        raise ModelFolderError(f"{path} is not a fastportrait model folder (no fastportrait.json). Is it a diffusers pipeline or a training checkpoint? Export a model folder first.")
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{meta} is corrupt: {e}") from None
    if info.get("kind") != KIND:
        raise ModelFolderError(f"{path} holds a '{info.get('kind')}' model, not a Pose2Video model ({KIND})")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFolderError(f"{path} has format version {info['format_version']}, newer than this code ({FORMAT_VERSION}); upgrade fastportrait")
    return info


def _sweep_stale_tmp(path: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` folders next to ``path`` left by an export whose process died (SIGKILL, OOM).

    Temp folders of live processes are left alone, so two exports of the same folder never delete each other's work.
    """
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
        if not pid.isdigit() or not tmp.is_dir():
            continue  # not ours (pre-PID format): leave it
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _replace_dir(tmp: Path, dst: Path) -> None:
    """Move ``tmp`` to ``dst``; an existing ``dst`` is swapped out only after ``tmp`` is complete."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def default_model_card(model: Pose2VideoModel, meta: dict) -> str:
    rows = "\n".join(f"| {name} | {count_parameters(getattr(model, name)) / 1e6:.2f} M |" for name in COMPONENTS if name != "scheduler")
    extra = "\n".join(f"- **{k}**: {v}" for k, v in meta.items())
    return f"""---
library_name: fastportrait
tags: [pose-to-video, portrait-animation, aniportrait]
---
# {meta.get('title', f"fastportrait model `{model.config.name}`")}

A Pose2Video model (AniPortrait architecture: reference UNet, denoising UNet with AnimateDiff motion
modules, pose guider) in the fastportrait model-folder format. Load it with
`portrait.models.Pose2VideoModel.from_pretrained(path)`; run it with `python -m infer.animate --model PATH ...`.

| component | parameters |
|---|---|
{rows}

Resolution: {model.config.resolution}x{model.config.resolution}; unconditional reference: `{model.config.uncond_reference}`;
pose guider mode: `{model.pose_guider.config.mode}`; guidance embedding: `{model.config.time_cond_proj_dim}`.

{extra}
"""
