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
from pathlib import Path

import torch

from portrait.models import interpolator as current

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interpolator_arch_h2h import time_against_unet  # noqa: E402


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

    nets = {"old": old.build_interpolator("tiny").eval(), "current": current.build_interpolator("tiny").eval()}
    nets["current"].load_state_dict(nets["old"].state_dict())
    time_against_unet(nets, args.model, args.repeats)

if __name__ == "__main__":
    main()
