"""Fabricate a fake AniPortrait ``pretrained_model/`` folder from the key/shape manifests (no real weights).

The manifests (``shared/fixtures/aniportrait/*.json``) list every tensor name and shape of AniPortrait's
released ``.pth`` files, at full and at a tiny size. :func:`make_fake_aniportrait_dir` writes random
tensors with the tiny shapes exactly as upstream does (``torch.save`` of a flat OrderedDict, fp32), plus
a tiny ``stable-diffusion-v1-5/unet/config.json``, a tiny diffusers ``AutoencoderKL`` and a tiny
transformers ``CLIPVisionModelWithProjection`` saved with ``save_pretrained``.

The tiny pose guider of the manifest still has upstream's hard-coded 1408-wide attention (128M
parameters, 0.5 GB). ``pose_inner_dim`` narrows it (1408 -> w, 4x1408 -> 4w, 8x1408 -> 8w) for fast tests;
``pose_inner_dim=1408`` writes the manifest shapes exactly.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path

import torch

UPSTREAM_POSE_INNER = 1408  # 16 heads x 88, hard-coded in AniPortrait's pose guider


def fixtures_dir() -> Path | None:
    """The AniPortrait manifest folder, or None: $FASTPORTRAIT_ANIPORTRAIT_FIXTURES, tests/fixtures/aniportrait,
    or shared/fixtures/aniportrait in the repo or beside it."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [
        os.environ.get("FASTPORTRAIT_ANIPORTRAIT_FIXTURES"),
        repo / "tests" / "fixtures" / "aniportrait",
        repo / "shared" / "fixtures" / "aniportrait",
        repo.parent / "shared" / "fixtures" / "aniportrait",
    ]
    for c in candidates:
        if c and (Path(c) / "tiny_configs.json").is_file():
            return Path(c)
    return None


def load_json(name: str) -> dict:
    d = fixtures_dir()
    if d is None:
        raise FileNotFoundError("AniPortrait manifests not found (set FASTPORTRAIT_ANIPORTRAIT_FIXTURES)")
    return json.loads((d / name).read_text())


def manifest(name: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of one manifest file, e.g. ``manifest("tiny_pose_guider.json")``."""
    return {k: tuple(v) for k, v in load_json(name)["tensors"].items()}


def tiny_unet_config() -> dict:
    """The tiny SD1.5-style ``unet/config.json`` the tiny manifests were built with."""
    return dict(load_json("tiny_configs.json")["sd15_style_unet_config_tiny"])


def narrow_pose_shapes(shapes: dict[str, tuple[int, ...]], inner: int) -> dict[str, tuple[int, ...]]:
    """Replace the pose guider's 1408 attention width (and its 4x / 8x feed-forward widths) by ``inner``."""
    if inner == UPSTREAM_POSE_INNER:
        return dict(shapes)
    table = {UPSTREAM_POSE_INNER: inner, 4 * UPSTREAM_POSE_INNER: 4 * inner, 8 * UPSTREAM_POSE_INNER: 8 * inner}
    out = {}
    for k, shape in shapes.items():
        out[k] = tuple(table.get(s, s) for s in shape) if k.startswith("cross_attn") else shape
    return out


def sinusoid_pe(max_len: int, dim: int) -> torch.Tensor:
    """AnimateDiff's ``PositionalEncoding.pe``: (1, max_len, dim), sin on even and cos on odd channels."""
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(pos * div)
    pe[0, :, 1::2] = torch.cos(pos * div)
    return pe


def random_state_dict(shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> OrderedDict:
    """Random fp32 tensors for ``shapes``; BatchNorm ``num_batches_tracked`` int64 scalars; ``pos_encoder.pe`` sinusoids."""
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(int(torch.randint(0, 1000, (), generator=gen)), dtype=torch.long)
        elif k.endswith("pos_encoder.pe"):
            sd[k] = sinusoid_pe(shape[1], shape[2])
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=gen) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=gen)
    return sd


def save_tiny_vae(path: Path) -> None:
    """A tiny sd-vae-ft-mse stand-in: 4 blocks (8x down, like SD's VAE) of 32 channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
    )
    vae.save_pretrained(path, safe_serialization=True)


def save_tiny_image_encoder(path: Path, projection_dim: int) -> None:
    """A tiny CLIPVisionModelWithProjection whose projection equals the UNet's cross_attention_dim."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, patch_size=8,
        image_size=32, projection_dim=projection_dim, hidden_act="quick_gelu",
    )
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)


def make_fake_aniportrait_dir(root: str | Path, *, seed: int = 0, pose_inner_dim: int = 64,
                              edit=None) -> dict[str, OrderedDict]:
    """Write a fake tiny AniPortrait ``pretrained_model/`` at ``root``; return ``{file name: state dict}``.

    ``edit(name, state_dict)`` (optional) may mutate each state dict before it is saved (to fabricate bad
    checkpoints); the returned dicts are the saved ones.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tables = {
        "denoising_unet.pth": manifest("tiny_denoising_unet.json"),
        "reference_unet.pth": manifest("tiny_reference_unet.json"),
        "pose_guider.pth": narrow_pose_shapes(manifest("tiny_pose_guider.json"), pose_inner_dim),
        "motion_module.pth": manifest("tiny_motion_module.json"),
    }
    written = {}
    for name, shapes in tables.items():
        sd = random_state_dict(shapes, gen)
        if edit is not None:
            edit(name, sd)
        torch.save(sd, root / name)
        written[name] = sd
    unet_cfg = tiny_unet_config()
    (root / "stable-diffusion-v1-5" / "unet").mkdir(parents=True, exist_ok=True)
    (root / "stable-diffusion-v1-5" / "unet" / "config.json").write_text(json.dumps(unet_cfg, indent=2))
    save_tiny_vae(root / "sd-vae-ft-mse")
    save_tiny_image_encoder(root / "image_encoder", projection_dim=unet_cfg["cross_attention_dim"])
    return written
