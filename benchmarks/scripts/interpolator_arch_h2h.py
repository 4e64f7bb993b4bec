"""Wall time of interpolators against one teacher UNet evaluation, interleaved on one thread (batch of 15 in-between
frames at 64^2; the UNet is one 16-frame window with the CFG batch of 2, divided by 32 = one evaluation per frame).

BENCHMARKS.md ("tiny_fast") ran::

    OMP_NUM_THREADS=1 python benchmarks/scripts/interpolator_arch_h2h.py portrait/assets/tiny_interpolator \
        runs/interpolator/tiny_fast/model --repeats 30

A name from ``INTERPOLATOR_CONFIGS`` (e.g. ``tiny_fast``) times an untrained network of that config: the same cost.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from infer.eval_interpolator import time_interleaved
from infer.pipeline import GenerationConfig, Pose2VideoPipeline
from portrait.models import Pose2VideoModel
from portrait.models.interpolator import FrameInterpolator, build_interpolator, count_macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("interpolators", nargs="+", help="interpolator folders or config names")
    ap.add_argument("--model", default="portrait/assets/tiny_teacher")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    nets = {s: (FrameInterpolator.from_pretrained(s) if Path(s).is_dir() else build_interpolator(s).eval()) for s in args.interpolators}
    for k, n in nets.items():
        print(f"{k}: {sum(p.numel() for p in n.parameters())} params, {count_macs(n, 64) / 1e6:.2f} MMAC per frame (counted)")
    time_against_unet(nets, args.model, args.repeats)


def time_against_unet(nets: dict, model: str, repeats: int, size: int = 64, b: int = 15) -> None:
    """Print each interpolator's wall time per in-between frame against one teacher UNet evaluation per frame,
    timed interleaved (also used by interpolator_format_h2h.py)."""
    m = Pose2VideoModel.from_pretrained(model)
    pipe = Pose2VideoPipeline(m)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)
    lmk = torch.rand(b, 68, 2, generator=g) * size
    t = torch.rand(b, generator=g)
    prep = pipe.prepare(np.full((size, size, 3), 128, np.uint8), np.zeros((16, size, size, 3), np.uint8), True)
    fn = pipe.model_fn(prep, GenerationConfig(guidance=3.5))
    h = size // m.vae_scale_factor
    z = torch.randn(1, m.vae.config.latent_channels, 16, h, h, generator=g)
    fns = {k: (lambda n=n: n.interpolate(x0, x1, t, x0, x1, x0, lmk, lmk, lmk)) for k, n in nets.items()}
    fns["unet"] = lambda: fn(z, torch.tensor(500))
    with torch.inference_mode():
        times = time_interleaved(fns, repeats)
    u, um = min(times["unet"]) / 32, float(np.median(times["unet"])) / 32
    print(f"teacher UNet eval per frame: min {u * 1e3:.2f} ms, median {um * 1e3:.2f} ms")
    for k in nets:
        a, am = min(times[k]) / b, float(np.median(times[k])) / b
        print(f"{k}: per in-between frame min {a * 1e3:.2f} ms ({a / u:.1%} of a UNet eval), median {am * 1e3:.2f} ms ({am / um:.1%})")

if __name__ == "__main__":
    main()
