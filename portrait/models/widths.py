"""Width manifests: how a pruned denoising UNet is stored and rebuilt without pickling modules.

A pruned ``UNetMotionModel`` keeps its diffusers ``config.json`` (the *unpruned* architecture) and its safetensors
(the pruned tensors). Beside them, ``widths.json`` lists every layer whose width differs from what the config builds::

    {"format_version": 1, "kind": "fastportrait.unet_widths",
     "layers": {"down_blocks.0.resnets.0.conv1": {"type": "Conv2d", "in": 32, "out": 24}, ...},
     "norm_groups": {"down_blocks.0.resnets.0.norm2": 24},
     "heads": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": 3},
     "pruning": {...free-form record of how it was pruned...}}

:func:`load_unet` builds the config's model, shrinks those layers to the recorded widths (the values are then
overwritten by the file, so which channels were removed does not matter), and loads the tensors strictly; a manifest
that disagrees with the tensors raises :class:`WidthManifestError` naming the keys. A folder without ``widths.json``
loads with plain diffusers ``from_pretrained`` as before. (diffusers' own ``from_pretrained`` cannot load a pruned
folder, DESIGN §4.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNetMotionModel
from diffusers.models.attention_processor import Attention
from torch import nn

MANIFEST = "widths.json"
KIND = "fastportrait.unet_widths"
FORMAT_VERSION = 1
_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)


class WidthManifestError(ValueError):
    """A width manifest is corrupt or disagrees with the tensors stored beside it."""


def _dims(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.GroupNorm):
        return m.num_channels, m.num_channels
    return int(m.normalized_shape[0]), int(m.normalized_shape[0])  # LayerNorm


def _reference(unet: UNetMotionModel) -> UNetMotionModel:
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNetMotionModel.from_config(cfg)


def width_manifest(unet: UNetMotionModel, pruning: dict | None = None) -> dict | None:
    """The manifest of ``unet`` against its own config, or None when it has the config's widths (not pruned)."""
    ref = dict(_reference(unet).named_modules())
    layers, groups, heads = {}, {}, {}
    for name, m in unet.named_modules():
        r = ref.get(name)
        if r is None:
            continue
        if isinstance(m, _LAYERS) and _dims(m) != _dims(r):
            i, o = _dims(m)
            layers[name] = {"type": type(m).__name__, "in": i, "out": o}
        if isinstance(m, nn.GroupNorm) and m.num_groups != r.num_groups:
            groups[name] = m.num_groups
        if isinstance(m, Attention) and m.heads != r.heads:
            heads[name] = m.heads
    if not (layers or groups or heads):
        return None
    return {"format_version": FORMAT_VERSION, "kind": KIND, "layers": layers, "norm_groups": groups, "heads": heads,
            "pruning": dict(pruning or {})}


def _shrink(m: nn.Module, i: int, o: int) -> None:
    def param(*shape, like: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, dtype=like.dtype, device=like.device), requires_grad=like.requires_grad)

    if isinstance(m, nn.Linear):
        m.weight = param(o, i, like=m.weight)
        if m.bias is not None:
            m.bias = param(o, like=m.bias)
        m.in_features, m.out_features = i, o
    elif isinstance(m, nn.Conv2d):
        if m.groups != 1:
            raise WidthManifestError(f"grouped conv {m} cannot be resized")
        m.weight = param(o, i, *m.kernel_size, like=m.weight)
        if m.bias is not None:
            m.bias = param(o, like=m.bias)
        m.in_channels, m.out_channels = i, o
    elif isinstance(m, nn.GroupNorm):
        if m.affine:
            m.weight, m.bias = param(o, like=m.weight), param(o, like=m.bias)
        m.num_channels = o
    elif isinstance(m, nn.LayerNorm):
        if m.weight is not None:
            m.weight = param(o, like=m.weight)
        if m.bias is not None:
            m.bias = param(o, like=m.bias)
        m.normalized_shape = (o,)


def apply_manifest(unet: UNetMotionModel, manifest: dict, source: str = "widths.json") -> UNetMotionModel:
    """Resize ``unet`` (built from its config) to the widths in ``manifest``, in place. Values are left undefined."""
    if manifest.get("kind") != KIND or not isinstance(manifest.get("layers"), dict):
        raise WidthManifestError(f"{source} is not a fastportrait width manifest (kind {manifest.get('kind')!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise WidthManifestError(f"{source} has format version {manifest['format_version']}, newer than this code; upgrade fastportrait")
    mods = dict(unet.named_modules())
    for section in ("layers", "norm_groups", "heads"):
        unknown = [p for p in manifest.get(section, {}) if p not in mods]
        if unknown:
            raise WidthManifestError(f"{source} names module(s) {unknown[:3]} that the UNet config does not build")
    for name, spec in manifest["layers"].items():
        m = mods[name]
        if type(m).__name__ != spec.get("type"):
            raise WidthManifestError(f"{source}: {name} is a {type(m).__name__}, the manifest says {spec.get('type')}")
        _shrink(m, int(spec["in"]), int(spec["out"]))
    for name, g in manifest.get("norm_groups", {}).items():
        m = mods[name]
        if not isinstance(m, nn.GroupNorm) or m.num_channels % int(g):
            raise WidthManifestError(f"{source}: {name} has {getattr(m, 'num_channels', '?')} channels, not divisible into {g} groups")
        m.num_groups = int(g)
    for name, h in manifest.get("heads", {}).items():
        m = mods[name]
        if not isinstance(m, Attention):
            raise WidthManifestError(f"{source}: {name} is not an attention layer")
        m.heads = int(h)
        m.inner_dim = m.to_q.out_features
        if hasattr(m, "inner_kv_dim"):
            m.inner_kv_dim = m.to_k.out_features
        if m.to_q.out_features % m.heads:
            raise WidthManifestError(f"{source}: {name} has width {m.to_q.out_features}, not divisible by {h} heads")
    from diffusers.models.resnet import Downsample2D, Upsample2D

    for m in unet.modules():  # keep the resampler attributes in sync with their convs (DESIGN §4)
        if isinstance(m, (Downsample2D, Upsample2D)) and isinstance(getattr(m, "conv", None), nn.Conv2d):
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
    return unet


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(folder / f))
        return out
    raise WidthManifestError(f"{folder} has {MANIFEST} but no diffusion_pytorch_model.safetensors")


def is_pruned_folder(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def load_unet(folder: str | Path, dtype: torch.dtype | None = None) -> UNetMotionModel:
    """Load a denoising-UNet folder: plain diffusers when there is no manifest, else config -> manifest -> tensors."""
    folder = Path(folder)
    kw = dict(torch_dtype=dtype) if dtype is not None else {}
    if not is_pruned_folder(folder):
        return UNetMotionModel.from_pretrained(folder, **kw)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise WidthManifestError(f"{folder / MANIFEST} is corrupt: {e}") from None
    cfg = {k: v for k, v in UNetMotionModel.load_config(folder).items() if not k.startswith("_")}
    unet = apply_manifest(UNetMotionModel.from_config(cfg), manifest, str(folder / MANIFEST))
    state = _read_tensors(folder)
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    conflicts = [f"{k}: manifest {tuple(expected[k].shape)} vs file {tuple(state[k].shape)}"
                 for k in expected if k in state and expected[k].shape != state[k].shape]
    if missing or unexpected or conflicts:
        parts = []
        if conflicts:
            parts.append(f"{len(conflicts)} shape conflict(s), e.g. {'; '.join(conflicts[:3])}")
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        raise WidthManifestError(f"the width manifest {folder / MANIFEST} disagrees with the tensors beside it: "
                                 + ", ".join(parts) + ". The folder is corrupt or was edited by hand: re-export it.")
    unet.load_state_dict(state, strict=True)
    if dtype is not None:
        unet = unet.to(dtype)
    return unet.eval()


def save_manifest(unet: UNetMotionModel, folder: str | Path, pruning: dict | None = None) -> dict | None:
    """Write ``widths.json`` into an already saved UNet folder when ``unet`` is pruned; return the manifest."""
    manifest = width_manifest(unet, pruning)
    if manifest is not None:
        (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
