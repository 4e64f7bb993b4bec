"""MACs, parameters and wall time of one denoising-UNet evaluation (what pruning reduces).

    python -m prune.count runs/prune/tiny/model                         # a model folder (pruned or not)
    python -m prune.count runs/prune/tiny/model --compare runs/teacher/tiny/model --frames 16 --repeats 20
    python -m prune.count --config configs/model/aniportrait.yaml --meta  # full size, counted on the meta device
    python -m prune.count --config configs/model/aniportrait.yaml --meta --target-mac-reduction 0.4   # full size, pruned

One evaluation = one ``Pose2VideoModel.denoise`` call on one CFG branch: batch 1, ``--frames`` frames at the model's
resolution, reference-bank attention on (its doubled K/V included) and pose features injected. MACs are counted with
``portrait.flops.count_flops`` (``torch.utils.flop_counter`` with the CPU SDPA formula registered, so attention is
counted on every device); MACs = FLOPs / 2. Wall time is the median of ``--repeats`` timed calls after one warm-up,
with ``torch.get_num_threads()`` threads (set ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from portrait.flops import count_flops
from portrait.models.bundle import Pose2VideoModel, count_parameters


def _inputs(model: Pose2VideoModel, frames: int, seed: int = 0) -> dict:
    from prune.graph import example_inputs

    return example_inputs(model, frames=frames, batch=1, seed=seed)


def _call(model: Pose2VideoModel, inp: dict) -> torch.Tensor:
    cond = None
    if model.config.time_cond_proj_dim is not None:
        cond = torch.zeros(1, model.config.time_cond_proj_dim, device=model.device, dtype=model.dtype)
    return model.denoise(inp["sample"], inp["timestep"], inp["encoder_states"], inp["pose_feats"], inp["bank"], timestep_cond=cond)


def count_unet_macs(model: Pose2VideoModel, frames: int = 16) -> float:
    """MACs of one denoising-UNet evaluation (batch 1, ``frames`` frames), SDPA included."""
    inp = _inputs(model, frames)
    return count_flops(lambda: _call(model, inp)).macs


@torch.no_grad()
def time_unet(model: Pose2VideoModel, frames: int = 16, repeats: int = 10) -> float:
    """Median wall seconds of one denoising-UNet evaluation (after a warm-up call)."""
    inp = _inputs(model, frames)
    _call(model, inp)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _call(model, inp)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def unet_cost(model: Pose2VideoModel, frames: int = 16, repeats: int = 10) -> dict:
    """{macs, params, seconds (None on meta), frames, resolution} of one denoising-UNet evaluation."""
    meta = model.device.type == "meta"
    return {"macs": count_unet_macs(model, frames), "params": count_parameters(model.denoising_unet),
            "seconds": None if meta or repeats <= 0 else time_unet(model, frames, repeats), "frames": frames,
            "resolution": model.config.resolution, "threads": torch.get_num_threads()}


def _load(args, path: str | None) -> Pose2VideoModel:
    if path:
        return Pose2VideoModel.from_pretrained(path)
    from portrait import config as config_lib
    from portrait.models.bundle import ModelConfig

    cfg = config_lib.load(ModelConfig, args.config)
    if args.meta:
        with torch.device("meta"):
            return Pose2VideoModel.from_config(cfg, seed=None).eval()
    return Pose2VideoModel.from_config(cfg).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prune.count", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="model folder")
    ap.add_argument("--config", help="count a freshly built model of this model config instead of a folder")
    ap.add_argument("--meta", action="store_true", help="with --config: build on the meta device (MACs only, no timing)")
    ap.add_argument("--compare", help="a second model folder (e.g. the unpruned one) to report ratios against")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--ratio", type=float, help="prune the model (local, uniform widths) by this ratio before counting")
    ap.add_argument("--target-mac-reduction", type=float, help="prune the model to this MAC reduction before counting")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    if bool(args.model) == bool(args.config):
        print("error: give a model folder or --config (not both)", file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)
    from portrait.models.bundle import ModelFolderError

    try:
        model = _load(args, args.model)
        if args.ratio is not None or args.target_mac_reduction is not None:
            from prune import pruner

            base = unet_cost(model, args.frames, 0 if args.meta else args.repeats)
            report = pruner.prune_model(model, pruner.PruneSpec(ratio=args.ratio or 0.0, importance="magnitude"),
                                        target_mac_reduction=args.target_mac_reduction, count_frames=min(args.frames, 2))
            print(f"pruned: global ratio {report['ratio']:.3f} ({report['units_removed']} units, magnitude, local)")
            rows = {"compare": base}
        else:
            rows = {}
        rows["model"] = unet_cost(model, args.frames, 0 if args.meta else args.repeats)
        if args.compare:
            rows["compare"] = unet_cost(Pose2VideoModel.from_pretrained(args.compare), args.frames, args.repeats)
    except (ModelFolderError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, r in list(rows.items()):
        sec = f"{r['seconds'] * 1e3:.1f} ms" if r["seconds"] is not None else "n/a"
        print(f"{name}: {r['macs'] / 1e9:.3f} GMAC, {r['params'] / 1e6:.3f} M params, {sec} per UNet eval "
              f"({r['frames']} frames at {r['resolution']}px, {r['threads']} threads)")
    if "compare" in rows:
        a, b = rows["model"], rows["compare"]
        rows["ratios"] = {"mac_reduction": 1 - a["macs"] / b["macs"], "param_reduction": 1 - a["params"] / b["params"],
                          "speedup": (b["seconds"] / a["seconds"]) if a["seconds"] else None}
        speed = f"x{rows['ratios']['speedup']:.2f}" if rows["ratios"]["speedup"] else "n/a"
        print(f"MACs -{rows['ratios']['mac_reduction']:.1%}, params -{rows['ratios']['param_reduction']:.1%}, wall-time speed-up {speed}")
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": "python -m prune.count " + " ".join(argv or sys.argv[1:]), **rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
