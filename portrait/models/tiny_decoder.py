"""A distilled tiny VAE decoder (TAESD architecture, diffusers ``AutoencoderTiny``) in place of the KL VAE's decoder.

Why: once the UNet work is cut by step distillation, pruning and keyframes, the KL VAE decode is the largest cost
left. The tiny teacher's decoder is 48 % of the pick's counted FLOPs (``benchmarks/bench_tiny_v2``); at 512^2 SD's
decoder is about 1.26 TMAC per frame (DESIGN §1) against 0.071 TMAC for TAESD's decoder (counted by
``portrait.flops``, see BENCHMARKS.md). TAESD (Ollin Boer Bohan, github.com/madebyollin/taesd) is a
conv-only decoder trained to reproduce SD's decoder from the same latents; diffusers ships its architecture as
``AutoencoderTiny``.

    from portrait.models.tiny_decoder import load_tiny_decoder
    pipe = Pose2VideoPipeline(model, decoder=load_tiny_decoder("portrait/assets/tiny_decoder"))   # or a folder path
    python -m infer.animate --model MODEL --decoder portrait/assets/tiny_decoder ...

Latent convention (TAESD's, diffusers' ``scaling_factor`` = 1.0): the decoder reads the UNet-space latents
(KL latents x ``latent_scale``, 0.18215) as they come out of the sampler, and returns images in [-1, 1].

Folders: ``AutoencoderTiny.save_pretrained`` (``config.json`` + ``diffusion_pytorch_model.safetensors``) plus our
``fastportrait_decoder.json`` (what it was distilled from, metrics) and a model card. A plain diffusers TAESD folder
(e.g. ``madebyollin/taesd``, the SD1.5 latent space that AniPortrait uses) loads as is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

META_FILE = "fastportrait_decoder.json"
KIND = "tiny_decoder"

# Architectures by name (DESIGN §3 "build by name"). "taesd" is diffusers' default AutoencoderTiny = TAESD for SD1.x
# (4 blocks of 64 channels, 8x up), the one to distil for full-size AniPortrait. "tiny" matches the embedded
# teacher's 4x VAE (3 stages, 2 upsamplings) at 24 channels with no block at full resolution (only the upsampling
# conv and the output conv touch 64^2): 0.43x of its KL decoder's MACs per frame. "tiny16" (16 channels, one block
# at full resolution, 0.37x) learned slower: 1.9 dB behind "tiny" at 500 steps (BENCHMARKS.md). diffusers'
# DecoderTiny needs the same width in every stage.
TINY_DECODER_CONFIGS: dict[str, dict] = {
    "tiny": dict(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(24, 24, 24),
                 num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(2, 2, 0)),
    "tiny16": dict(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16),
                   num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(2, 2, 1)),
    "taesd": dict(),
}


class DecoderFolderError(ValueError):
    """A tiny-decoder folder is missing, corrupt, of another kind, or does not fit the model's latent space."""


def build_tiny_decoder(arch: str, latent_channels: int = 4):
    """A fresh ``AutoencoderTiny`` of architecture ``arch`` (``TINY_DECODER_CONFIGS``)."""
    from diffusers import AutoencoderTiny

    if arch not in TINY_DECODER_CONFIGS:
        raise ValueError(f"unknown tiny-decoder arch {arch!r}; choose from {sorted(TINY_DECODER_CONFIGS)}")
    return AutoencoderTiny(latent_channels=latent_channels, **TINY_DECODER_CONFIGS[arch])


def upsampling_factor(tiny) -> int:
    """Pixels per latent of an ``AutoencoderTiny`` decoder: one upsampling between consecutive blocks."""
    c = tiny.config
    return int(c.upsampling_scaling_factor) ** (len(c.decoder_block_out_channels) - 1)


def check_compatible(tiny, model, name: str = "decoder") -> None:
    """Raise ``DecoderFolderError`` unless ``tiny`` decodes ``model``'s latents (channels and pixels per latent)."""
    lc, sf = model.vae.config.latent_channels, model.vae_scale_factor
    if tiny.config.latent_channels != lc or upsampling_factor(tiny) != sf:
        raise DecoderFolderError(
            f"{name} decodes {tiny.config.latent_channels}-channel latents at {upsampling_factor(tiny)}x, but the model's VAE "
            f"has {lc} channels at {sf}x; distil a decoder for this model (`bash launch.sh decoder vae_model=MODEL`)")
    want = getattr(tiny, "fastportrait", {}).get("vae_signature")
    if want is not None and not signature_matches(want, vae_signature(model.vae)):
        raise DecoderFolderError(
            f"{name} was distilled from another VAE (its decoder gives another image for the same latent probe): its "
            "latents mean something else; distil a decoder for this model (`bash launch.sh decoder vae_model=MODEL`)")


SIGNATURE_TOLERANCE = 0.05  # max abs difference of the [-1, 1] probe images; bf16 / fp16 rounding stays far below it


@torch.no_grad()
def vae_signature(vae) -> list[float]:
    """What a KL decoder makes of one fixed latent probe (seeded (1, C, 8, 8) noise), average-pooled to (3, 4, 4):
    48 numbers. A distilled decoder records the signature of the decoder it imitates, so that it is never used on
    another VAE's latents (same shapes, other meaning). It compares with a tolerance, so that the same VAE loaded in
    bf16 or fp16 matches (a hash of the weights would not). Students and pruned models keep their teacher's VAE."""
    p = next(vae.parameters())
    z = torch.randn((1, vae.config.latent_channels, 8, 8), generator=torch.Generator().manual_seed(0))
    img = vae.decode(z.to(p.device, p.dtype)).sample.float()
    return [round(v, 5) for v in torch.nn.functional.adaptive_avg_pool2d(img, 4).flatten().tolist()]


def signature_matches(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= SIGNATURE_TOLERANCE


def read_decoder_info(path: Path) -> dict:
    """Our metadata of a decoder folder ({} for a plain diffusers TAESD folder); errors name the folder."""
    path = Path(path)
    hint = "distil one with `bash launch.sh decoder`, or pass a diffusers AutoencoderTiny (TAESD) folder"
    if not path.is_dir():
        raise DecoderFolderError(f"decoder folder not found: {path} ({hint})")
    if (path / "fastportrait.json").is_file():
        raise DecoderFolderError(f"{path} is a Pose2Video model folder, not a tiny decoder: pass it as --model ({hint})")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise DecoderFolderError(f"{path} has no config.json: not a decoder folder ({hint})")
    try:
        cls = json.loads(cfg_file.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise DecoderFolderError(f"{cfg_file} is corrupt: {e}") from None
    if cls != "AutoencoderTiny":
        raise DecoderFolderError(f"{path} holds a {cls or 'non-diffusers'} model, not an AutoencoderTiny (TAESD) decoder ({hint})")
    meta = path / META_FILE
    if not meta.is_file():
        return {}
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise DecoderFolderError(f"{meta} is corrupt: {e}") from None
    if info.get("kind") != KIND:
        raise DecoderFolderError(f"{meta} describes a '{info.get('kind')}', not a {KIND}")
    return info


def load_tiny_decoder(spec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A folder path -> ``AutoencoderTiny`` in eval mode (``.fastportrait`` holds our metadata); a module as is."""
    from diffusers import AutoencoderTiny

    if isinstance(spec, torch.nn.Module):
        return spec.to(device)
    path = Path(spec)
    info = read_decoder_info(path)
    try:
        tiny = AutoencoderTiny.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:  # missing / truncated safetensors, shape mismatch
        raise DecoderFolderError(f"cannot load the decoder weights in {path}: {e}") from None
    tiny.fastportrait = info
    return tiny.to(device).eval().requires_grad_(False)


def decode(tiny, latents: torch.Tensor) -> torch.Tensor:
    """UNet-space latents ``(N, C, h, w)`` -> images ``(N, 3, H, W)`` in [-1, 1] (unclamped)."""
    z = latents.to(next(tiny.parameters()).dtype) / tiny.config.scaling_factor
    return tiny.decode(z).sample


def save_tiny_decoder(tiny, path: str | Path, metadata: dict) -> Path:
    """``AutoencoderTiny`` folder + ``fastportrait_decoder.json`` + model card, written atomically."""
    from portrait.data.dataset import atomic_output_dir

    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / META_FILE).is_file():
        raise FileExistsError(f"{path} exists and is not a tiny-decoder folder; refusing to replace it")
    with atomic_output_dir(path, overwrite=True) as tmp:
        tiny.save_pretrained(tmp, safe_serialization=True)
        (tmp / META_FILE).write_text(json.dumps({"kind": KIND, **metadata}, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(model_card(metadata))
    return path


def model_card(meta: dict) -> str:
    m = meta.get("metrics", {})
    lines = [f"# {meta.get('title', 'fastportrait tiny VAE decoder')}", "",
             "A TAESD-architecture decoder (diffusers `AutoencoderTiny`) distilled from the KL VAE decoder of "
             f"`{meta.get('vae_model', '?')}`. It decodes UNet-space latents (x{meta.get('latent_scale', 0.18215)}) to "
             "images in [-1, 1]; the encoder half is distilled too but fastportrait encodes the reference with the KL VAE.", "",
             "    python -m infer.animate --model MODEL --decoder THIS_FOLDER --ref ref.png --pose pose.npy --out out.mp4", ""]
    if m:
        lines += ["| metric (held-out frames) | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in m.items()] + [""]
    facts = {"arch": meta.get("arch"), "decoder parameters": meta.get("decoder_params"),
             "KL decoder parameters": meta.get("kl_decoder_params"), "steps": meta.get("steps"),
             "train_minutes": meta.get("train_minutes"), "data": meta.get("data")}
    lines += [f"- {k}: {v}" for k, v in facts.items() if v is not None] + [""]
    return "\n".join(lines)
