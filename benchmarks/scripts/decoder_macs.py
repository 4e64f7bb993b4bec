"""Counted MACs per decoded frame: the KL VAE decoder against the tiny (TAESD-architecture) decoder, at the embedded
tiny size (64^2) and at AniPortrait's (512^2). Counting runs on the meta device (shapes only, no weights, no time).

    python benchmarks/scripts/decoder_macs.py --out benchmarks/decoder_macs.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from portrait import config as config_lib  # noqa: E402
from portrait.flops import count_flops  # noqa: E402
from portrait.models.bundle import ModelConfig  # noqa: E402
from portrait.models.tiny_decoder import TINY_DECODER_CONFIGS, upsampling_factor  # noqa: E402


def kl_decoder_macs(vae_cfg: dict, resolution: int) -> tuple[float, int]:
    from portrait.models.unets import build_vae

    with torch.device("meta"):
        vae = build_vae(vae_cfg)  # as Pose2VideoModel builds it
    sf = 2 ** (len(vae.config.block_out_channels) - 1)
    z = torch.empty(1, vae.config.latent_channels, resolution // sf, resolution // sf, device="meta")
    n = count_flops(lambda: vae.decoder(vae.post_quant_conv(z)))
    params = sum(p.numel() for p in vae.decoder.parameters()) + sum(p.numel() for p in vae.post_quant_conv.parameters())
    return n.macs, params


def tiny_decoder_macs(arch: str, resolution: int) -> tuple[float, int, int]:
    from diffusers import AutoencoderTiny

    with torch.device("meta"):
        tiny = AutoencoderTiny(**TINY_DECODER_CONFIGS[arch])
    sf = upsampling_factor(tiny)
    z = torch.empty(1, tiny.config.latent_channels, resolution // sf, resolution // sf, device="meta")
    return count_flops(lambda: tiny.decoder(z)).macs, sum(p.numel() for p in tiny.decoder.parameters()), sf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/decoder_macs.json")
    args = ap.parse_args()
    rows = []
    for name, model_cfg, arch in [("tiny (embedded teacher)", "configs/model/tiny.yaml", "tiny"),
                                  ("tiny (embedded teacher)", "configs/model/tiny.yaml", "tiny16"),
                                  ("aniportrait (512^2)", "configs/model/aniportrait.yaml", "taesd")]:
        mc = config_lib.load(ModelConfig, model_cfg)
        vae_cfg = dict(mc.vae)
        kl, kl_p = kl_decoder_macs(vae_cfg, mc.resolution)
        td, td_p, sf = tiny_decoder_macs(arch, mc.resolution)
        rows.append({"model": name, "model_config": model_cfg, "resolution": mc.resolution, "tiny_arch": arch,
                     "kl_decoder_gmac_per_frame": kl / 1e9, "tiny_decoder_gmac_per_frame": td / 1e9, "ratio": td / kl,
                     "kl_decoder_params": kl_p, "tiny_decoder_params": td_p, "pixels_per_latent": sf})
        print(f"{name}, {arch}: KL decoder {kl / 1e9:.4g} GMAC/frame ({kl_p / 1e6:.3f} M params), {arch} {td / 1e9:.4g} GMAC/frame "
              f"({td_p / 1e6:.3f} M params): {td / kl:.3f}x")
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/scripts/decoder_macs.py", "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
