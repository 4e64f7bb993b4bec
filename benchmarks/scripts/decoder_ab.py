"""A/B wall time of one model with the KL decoder and with the tiny decoder, calls alternating (A B A B ...) so that
load drifts hit both alike: a tighter estimate than the end-to-end benchmark's 3 passes for a small difference.
One synthetic 16-frame clip (an identity no split holds), generation only (no mp4), median of ``--pairs`` pairs.

    python benchmarks/scripts/decoder_ab.py --model runs/prune/tiny_4step/model --steps 1 --keyframes fixed:3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--keyframes", default="fixed:3")
    ap.add_argument("--interpolator", default="portrait/assets/tiny_fast_interpolator")
    ap.add_argument("--decoder", default="portrait/assets/tiny_decoder")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append the result as one JSON line to this file")
    args = ap.parse_args()
    from infer.pipeline import GenerationConfig, Pose2VideoPipeline
    from portrait.data.synthetic import generate_clip
    from portrait.models import Pose2VideoModel
    from portrait.models.interpolator import load_interpolator

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    model = Pose2VideoModel.from_pretrained(args.model)
    interp = load_interpolator(args.interpolator) if args.keyframes != "none" else None
    pipes = {"kl": Pose2VideoPipeline(model, interpolator=interp),
             "tiny": Pose2VideoPipeline(model, interpolator=interp, decoder=args.decoder)}
    clip = generate_clip(identity_seed=987654321, motion_seed=5, num_frames=16, size=64)
    gen = GenerationConfig(steps=args.steps, keyframes=args.keyframes)
    kw = {"landmarks": clip["landmarks"]} if args.keyframes != "none" else {}

    def run(name: str) -> float:
        t0 = time.perf_counter()
        pipes[name](clip["frames"][0], clip["pose"], gen, torch.Generator().manual_seed(0), **kw)
        return time.perf_counter() - t0

    for name in pipes:  # warm-up
        run(name)
    times: dict[str, list[float]] = {"kl": [], "tiny": []}
    for _ in range(args.pairs):
        for name in ("kl", "tiny"):
            times[name].append(run(name) / 16)
    res = {"model": args.model, "steps": args.steps, "keyframes": args.keyframes, "pairs": args.pairs, "threads": args.threads,
           **{f"{k}_ms_per_frame_median": 1e3 * statistics.median(v) for k, v in times.items()},
           **{f"{k}_ms_per_frame_min": 1e3 * min(v) for k, v in times.items()}}
    res["speedup_median"] = res["kl_ms_per_frame_median"] / res["tiny_ms_per_frame_median"]
    print(json.dumps(res))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
