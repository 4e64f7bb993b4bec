"""PSNR of an interpolator's in-between frames on held-out validation triplets: landmarks on, landmark-blind, blend.

It is train/interpolator.py's export validation (VAE round-trip keyframes, gaps 2-4, every t = j/k, fixed seeds) on
more triplets. BENCHMARKS.md ("landmark-blind mode") ran::

    python benchmarks/scripts/interpolator_val_modes.py --triplets 256
    # the pre-fix landmark-blind mode: the same command with portrait/models/interpolator.py from commit 2319d01
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: train/ is a folder of scripts
import train.interpolator as TI  # noqa: E402
from portrait.models.interpolator import FrameInterpolator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interpolator", default="portrait/assets/tiny_fast_interpolator")
    ap.add_argument("--data", default="runs/data/synthetic64")
    ap.add_argument("--triplets", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = FrameInterpolator.from_pretrained(args.interpolator)
    meta = net.metadata.get("config", {})
    cfg = dataclasses.replace(TI.InterpolatorTrainConfig(), val_triplets=args.triplets,
                              vae_model=meta.get("vae_model", TI.InterpolatorTrainConfig().vae_model))
    vae = TI.load_vae(cfg.vae_model)
    print(json.dumps(TI.validate(net, cfg, Path(args.data), vae, "cpu"), indent=1))


if __name__ == "__main__":
    main()
