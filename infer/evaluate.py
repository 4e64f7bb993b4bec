"""Quality evaluation on held-out identities: a model folder under several sampling settings, plus baselines.

    python -m infer.evaluate --model runs/teacher/tiny/model --data runs/data/synthetic64 --split test \
        --clips 16 --frames 16 --row cfg25:steps=25,guidance=3.5 --row nocfg25:steps=25,guidance=1 \
        --row cfg4:steps=4,guidance=3.5 --out runs/eval/teacher_tiny.json

Protocols (``--protocol``): "self" (self-reenactment, as in talking-head papers): for each held-out clip the
reference is its first frame, the driving poses are the clip's own pose images, and the ground truth is the clip.
"cross": the reference is the first frame of another clip of the same held-out identity, so the head pose of the
reference differs from the driving poses as in real use (a portrait photo driven by a video); copying the
reference then no longer nearly matches the target. Every row uses the
same clips and the same initial noise (seeded by clip index). Two reference rows are always added:

* ``copy_reference``: output the reference frame for every frame (no model);
* ``probe_on_ground_truth``: the landmark probe's own error on the ground-truth frames (its noise floor).

Metrics per row (``infer/metrics.py``): PSNR/SSIM vs ground truth, mouth-region PSNR, flicker, landmark error
(NME, probe vs driving landmarks), wall seconds per frame.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from infer.metrics import landmark_error, video_metrics
from infer.pipeline import GenerationConfig, Pose2VideoPipeline


@dataclass
class EvalClip:
    ref: np.ndarray  # (H, W, 3) uint8
    pose: np.ndarray  # (F, H, W, 3) uint8
    target: torch.Tensor  # (F, 3, H, W) float in [0, 1]
    landmarks: torch.Tensor  # (F, 68, 2)
    index: int


PROTOCOLS = {
    "self": "self-reenactment: reference = the clip's first sampled frame, driving = the clip's own poses, same noise per clip",
    "cross": "cross-clip reenactment: reference = the first sampled frame of another clip of the same held-out identity "
             "(a different head pose), driving = the clip's own poses, same noise per clip",
}


def load_eval_clips(data: str | Path, split: str = "test", clips: int = 16, frames: int = 16,
                    protocol: str = "self") -> list[EvalClip]:
    """The first ``clips`` clips of ``split`` (held-out identities), ``frames`` frames each.

    ``protocol`` "self": the reference is the clip's first sampled frame. "cross": the first sampled frame of the
    next clip of the same identity (cyclically), so reference and driving poses differ as in real use.
    """
    from portrait.data.dataset import ClipDataset

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {sorted(PROTOCOLS)}")
    ds = ClipDataset(data, split, num_frames=frames, strides=(1,), reference="first", seed=0)
    out = []
    for i in range(min(clips, len(ds))):
        item = ds[i]
        # frames start at a seeded offset; re-anchor so the reference is the first *sampled* frame
        t = item["target"]
        ref = t[0]
        if protocol == "cross":
            others = ds.other_clips(i)
            if len(others) == 0:
                raise ValueError(f"protocol 'cross' needs >= 2 clips per identity; clip {i} of {split!r} has none")
            later = others[others > i]
            ref = ds[int(later[0] if len(later) else others[0])]["target"][0]
        out.append(EvalClip(ref=ref.permute(1, 2, 0).numpy(), pose=item["pose"].permute(0, 2, 3, 1).numpy(),
                            target=t.float() / 255.0, landmarks=item["landmarks"], index=i))
    if not out:
        raise ValueError(f"split {split!r} of {data} holds no clips")
    return out


def parse_row(spec: str) -> tuple[str, GenerationConfig]:
    """``name:steps=25,guidance=3.5[,sampler=ddim,legacy_loop=1]`` -> (name, GenerationConfig)."""
    name, _, rest = spec.partition(":")
    gen = GenerationConfig()
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        if not hasattr(gen, k):
            raise ValueError(f"unknown generation key {k!r} in row {spec!r}")
        cur = getattr(gen, k)
        setattr(gen, k, type(cur)(float(v)) if isinstance(cur, (int, float)) and not isinstance(cur, bool) else (v in ("1", "true", "True")) if isinstance(cur, bool) else v)
    return name, gen


def generate(pipe: Pose2VideoPipeline, clip: EvalClip, gen: GenerationConfig) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = pipe(clip.ref, clip.pose, gen, torch.Generator().manual_seed(1000 + clip.index))
    return out.cpu(), time.perf_counter() - t0


def mean_metrics(per_clip: list[dict]) -> dict:
    keys = per_clip[0].keys()
    return {k: float(np.mean([m[k] for m in per_clip])) for k in keys}


def save_samples(out_dir: Path, name: str, clip: EvalClip, video: torch.Tensor, fps: float = 8.0) -> list[Path]:
    """A grid PNG (rows = frames 0, 4, 8, ...; columns = reference | pose | ground truth | output) and a GIF."""
    from PIL import Image

    from infer.io import write_gif

    out = (video.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    gt = (clip.target.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    strip = np.concatenate([np.repeat(clip.ref[None], len(out), 0), clip.pose, gt, out], axis=2)  # (F, H, 4W, 3)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}_clip{clip.index}.png"
    Image.fromarray(np.concatenate(list(strip[::4]), axis=0)).resize((strip.shape[2] * 3, strip[::4].shape[0] * strip.shape[1] * 3), Image.NEAREST).save(png)
    gif = write_gif(out_dir / f"{name}_clip{clip.index}.gif", np.stack([np.asarray(Image.fromarray(f).resize((f.shape[1] * 3, f.shape[0] * 3), Image.NEAREST)) for f in strip]), fps)
    return [png, gif]


def evaluate(model_dir: str, data: str, rows: list[tuple[str, GenerationConfig]], split: str = "test", clips: int = 16,
             frames: int = 16, probe_dir: str | None = None, baselines: bool = True, samples_dir: str | None = None,
             protocol: str = "self") -> dict:
    from portrait.models.bundle import Pose2VideoModel
    from portrait.models.landmark_probe import load_probe, predict_video_landmarks

    probe = load_probe(probe_dir)
    eval_clips = load_eval_clips(data, split, clips, frames, protocol)
    result: dict = {"model": str(model_dir), "data": str(data), "split": split, "clips": len(eval_clips), "frames": frames,
                    "protocol": PROTOCOLS[protocol], "protocol_name": protocol,
                    "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
                    "date": time.strftime("%Y-%m-%d"), "rows": {}}
    if baselines:
        copy = [video_metrics(torch.from_numpy(c.ref).permute(2, 0, 1).float().div(255).expand(frames, -1, -1, -1), c.target, c.landmarks, probe=probe)
                for c in eval_clips]
        result["rows"]["copy_reference"] = mean_metrics(copy)
        gt_err = [landmark_error(predict_video_landmarks(probe, c.target), c.landmarks) for c in eval_clips]
        result["rows"]["probe_on_ground_truth"] = {"landmark_error": float(np.mean(gt_err))}
    model = Pose2VideoModel.from_pretrained(model_dir)
    pipe = Pose2VideoPipeline(model)
    for name, gen in rows:
        per, secs = [], 0.0
        for c in tqdm(eval_clips, desc=name, leave=False):
            out, dt = generate(pipe, c, gen)
            secs += dt
            if samples_dir and c is eval_clips[0]:
                save_samples(Path(samples_dir), name, c, out)
            per.append(video_metrics(out, c.target, c.landmarks, probe=probe))
        row = mean_metrics(per)
        row.update({"steps": gen.steps, "guidance": gen.guidance, "sampler": pipe.sampler_name(gen),
                    "sec_per_frame": secs / (len(eval_clips) * frames)})
        result["rows"][name] = row
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return result


def to_markdown(result: dict) -> str:
    cols = ["psnr_gt", "ssim_gt", "mouth_psnr", "landmark_error", "flicker", "sec_per_frame"]
    lines = ["| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.4g}" if c in r else "" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infer.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="runs/data/synthetic64")
    ap.add_argument("--split", default="test")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--row", action="append", default=[], help="name:steps=N,guidance=W (repeatable)")
    ap.add_argument("--probe", default=None, help="landmark probe folder (default: the shipped one)")
    ap.add_argument("--out", default=None, help="write the result JSON (and a .md table beside it)")
    ap.add_argument("--samples", default=None, help="folder for a grid PNG + GIF of the first clip per row")
    ap.add_argument("--protocol", default="self", choices=sorted(PROTOCOLS), help="self: reference = the clip's first frame; "
                    "cross: reference = a frame of another clip of the same identity")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)  # denormals slow CPU maths 10-100x (see portrait/training.py)
    try:
        rows = [parse_row(r) for r in (args.row or ["teacher:steps=25,guidance=3.5"])]
        result = evaluate(args.model, args.data, rows, args.split, args.clips, args.frames, args.probe, samples_dir=args.samples,
                          protocol=args.protocol)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["command"] = "python -m infer.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(result, to_markdown(result), args.out)
    return 0


def write_report(result: dict, md: str, out: str | Path | None) -> None:
    """Print the markdown table; with ``out``, write ``out`` (JSON) and ``out.md`` atomically (temp, then rename)."""
    print(md)
    if not out:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(result, indent=2)), (out.with_suffix(".md"), md + "\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
