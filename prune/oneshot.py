"""One-shot pruning of a model folder, without recovery (the "before KD" points of the ratio sweep).

    python -m prune.oneshot --model runs/teacher/tiny/model --out runs/prune/oneshot/taylor40 \
        --importance taylor --target-mac-reduction 0.4 [--scope local] [--taylor-clips 16] [--taylor-steps 25]

Writes a model folder (with its width manifest) whose ``metadata["pruning"]`` holds the report of
``prune.pruner.prune_model``. For pruning with KD recovery use ``train/prune.py``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prune.oneshot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--importance", default="taylor", choices=["magnitude", "taylor"])
    ap.add_argument("--scope", default="local", choices=["local", "global"])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=float)
    g.add_argument("--target-mac-reduction", type=float)
    ap.add_argument("--taylor-clips", type=int, default=16)
    ap.add_argument("--taylor-steps", type=int, default=0, help="inference steps whose timesteps Taylor uses (0: the model's default)")
    ap.add_argument("--num-frames", type=int, default=8)
    ap.add_argument("--data", default="runs/data/synthetic64")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    from portrait.models.bundle import ModelFolderError, Pose2VideoModel
    from prune import pruner

    try:
        model = Pose2VideoModel.from_pretrained(args.model)
        batches = None
        if args.importance == "taylor":
            from portrait.data.dataset import ClipDataset
            from portrait.training import GlobalBatchPlan, load_items, sample_generator

            ds = ClipDataset(args.data, "train", num_frames=args.num_frames, strides=[1, 2], reference="mixed", seed=args.seed)
            plan = GlobalBatchPlan(len(ds), 1, 1, args.seed + 7919)  # the same clips as train/prune.py's taylor_batches
            batches = []
            for i in range(min(args.taylor_clips, len(ds))):
                b = load_items(ds, plan.items(i, 0, 0, 1))
                batches.append((b, [sample_generator(args.seed, int(b["sample_id"][0]), "taylor")]))
        spec = pruner.PruneSpec(ratio=args.ratio or 0.0, scope=args.scope, importance=args.importance)
        timesteps = pruner.inference_timesteps(model, args.taylor_steps or None) if batches else None
        report = pruner.prune_model(model, spec, batches=batches, timesteps=timesteps, target_mac_reduction=args.target_mac_reduction)
        report["source"] = args.model
        model.save_pretrained(args.out, metadata={"pruning": report, "title": f"one-shot pruned ({args.importance}) {args.model}"})
    except (ModelFolderError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
