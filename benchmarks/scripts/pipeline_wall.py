"""Wall time of the shipped tiny teacher on one 16-frame clip (25 DDIM steps, CFG 3.5, 2 threads): 4 timed runs after a warm-up.

BENCHMARKS.md (the allocator note under issue 6) ran it with and without glibc tunables::

    python benchmarks/scripts/pipeline_wall.py
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295 python benchmarks/scripts/pipeline_wall.py
"""

import time

import numpy as np
import torch

from infer.pipeline import GenerationConfig, Pose2VideoPipeline
from portrait.models import Pose2VideoModel


def main() -> None:
    torch.set_num_threads(2)
    pipe = Pose2VideoPipeline(Pose2VideoModel.from_pretrained("portrait/assets/tiny_teacher"))
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    pose = rng.integers(0, 255, (16, 64, 64, 3), dtype=np.uint8)
    cfg = GenerationConfig(steps=25, guidance=3.5)
    pipe(ref, pose, cfg, generator=torch.Generator().manual_seed(0))
    ts = []
    for _ in range(4):
        t0 = time.perf_counter()
        pipe(ref, pose, cfg, generator=torch.Generator().manual_seed(0))
        ts.append(time.perf_counter() - t0)
    print(f"16 frames, 25 steps, CFG 3.5: min {min(ts):.2f} s, median {float(np.median(ts)):.2f} s")


if __name__ == "__main__":
    main()
