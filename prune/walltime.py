"""Wall time per denoising-UNet evaluation of several model folders, interleaved so machine-load drift hits all alike.

    python -m prune.walltime --frames 16 --rounds 15 unpruned=runs/teacher/tiny/model p40=runs/prune/tiny/model

Per round every model runs once (batch 1, one CFG branch, ``--frames`` frames, reference bank and pose features on);
prints the median and min over rounds, the counted MACs (SDPA included) and the speed-ups against the first model.
Threads: ``torch.get_num_threads()`` (set ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prune.walltime", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="name=MODEL_DIR (the first is the baseline)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    from portrait.models.bundle import ModelFolderError, Pose2VideoModel
    from prune.count import _call, _inputs, count_unet_macs

    try:
        if any("=" not in m for m in args.models):
            raise ValueError("models are given as name=MODEL_DIR")
        models = {a.split("=", 1)[0]: Pose2VideoModel.from_pretrained(a.split("=", 1)[1]) for a in args.models}
    except (ModelFolderError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    inputs = {k: _inputs(m, args.frames) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for k, m in models.items():
            _call(m, inputs[k])  # warm-up
        for _ in range(args.rounds):
            for k, m in models.items():
                t0 = time.perf_counter()
                _call(m, inputs[k])
                times[k].append(time.perf_counter() - t0)
    res = {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "gmac": count_unet_macs(models[k], args.frames) / 1e9}
           for k, v in times.items()}
    base = next(iter(res.values()))
    for k, r in res.items():
        print(f"{k}: {r['gmac']:.3f} GMAC ({1 - r['gmac'] / base['gmac']:.1%} fewer), median {r['median_ms']:.1f} ms, min {r['min_ms']:.1f} ms, "
              f"speed-up x{base['median_ms'] / r['median_ms']:.2f} (min-based x{base['min_ms'] / r['min_ms']:.2f})")
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"frames": args.frames, "rounds": args.rounds, "threads": torch.get_num_threads(), **res}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
