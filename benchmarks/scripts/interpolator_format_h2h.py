"""Head-to-head wall time of two interpolator implementations (same weights) against one teacher UNet evaluation.

The BENCHMARKS.md "Interpolator format 2" cost table came from::

    git show fd672f1:portrait/models/interpolator.py > /tmp/interp_v1.py     # format 1
    OMP_NUM_THREADS=1 python benchmarks/scripts/interpolator_format_h2h.py /tmp/interp_v1.py

It times a batch of 15 in-between frames at 64^2 for each implementation and one 16-frame UNet window with the CFG
batch of 2 (divided by 32 = one UNet evaluation per frame), interleaved, on one thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import numpy as np
import torch

from infer.pipeline import GenerationConfig, Pose2VideoPipeline
from portrait.models import Pose2VideoModel
from portrait.models import interpolator as current


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="path of the other interpolator module (e.g. format 1 from git show)")
    ap.add_argument("--model", default="portrait/assets/tiny_teacher")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    spec = importlib.util.spec_from_file_location("interp_old", args.old)
    old = importlib.util.module_from_spec(spec)
    sys.modules["interp_old"] = old  # dataclasses look their module up while the class is built
    spec.loader.exec_module(old)

    size, b = 64, 15
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)
    lmk = torch.rand(b, 68, 2, generator=g) * size
    t = torch.rand(b, generator=g)
    nets = {"old": old.build_interpolator("tiny").eval(), "current": current.build_interpolator("tiny").eval()}
    nets["current"].load_state_dict(nets["old"].state_dict())
    m = Pose2VideoModel.from_pretrained(args.model)
    pipe = Pose2VideoPipeline(m)
    prep = pipe.prepare(np.full((size, size, 3), 128, np.uint8), np.zeros((16, size, size, 3), np.uint8), True)
    fn = pipe.model_fn(prep, GenerationConfig(guidance=3.5))
    h = size // m.vae_scale_factor
    z = torch.randn(1, m.vae.config.latent_channels, 16, h, h, generator=g)
    fns = {k: (lambda n=n: n.interpolate(x0, x1, t, x0, x1, x0, lmk, lmk, lmk)) for k, n in nets.items()}
    fns["unet"] = lambda: fn(z, torch.tensor(500))
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            f()
        for _ in range(args.repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    u, um = min(times["unet"]) / 32, float(np.median(times["unet"])) / 32
    print(f"teacher UNet eval per frame: min {u * 1e3:.2f} ms, median {um * 1e3:.2f} ms")
    for k in ("old", "current"):
        a, am = min(times[k]) / b, float(np.median(times[k])) / b
        print(f"{k}: per in-between frame min {a * 1e3:.2f} ms ({a / u:.1%} of a UNet eval), "
              f"median {am * 1e3:.2f} ms ({am / um:.1%})")


if __name__ == "__main__":
    main()
