"""Animate a reference portrait with a pose sequence.

    python -m infer.animate --model MODEL_DIR --ref ref.png --pose pose.mp4 --out out.mp4
    python -m infer.animate --model MODEL_DIR --ref ref.png --pose poses/ --out out.mp4 --steps 25 --guidance 3.5
    python -m infer.animate --model MODEL_DIR --ref ref.png --pose landmarks.npy --out out.mp4 --fps 25 --seed 42
    python -m infer.animate --model STUDENT_DIR --ref ref.png --pose pose.mp4 --out out.mp4 --steps 4 --guidance 3.5
    python -m infer.animate --model MODEL_DIR --ref ref.png --pose landmarks.npy --out out.mp4 \
        --keyframes fixed:3 --interpolator runs/interpolator/tiny/model
    python -m infer.animate --model MODEL_DIR --ref ref.png --pose landmarks.npy --out out.mp4 \
        --keyframes adaptive:0.05 --interpolator blend
    python -m infer.animate --model STUDENT_DIR --ref ref.png --pose landmarks.npy --out out.mp4 \
        --keyframes fixed:3 --interpolator portrait/assets/tiny_fast_interpolator --decoder portrait/assets/tiny_decoder

A distilled student folder records its sampler (lcm / phased / ddim) and default step count; --sampler and
--steps override them.

POSE is a pose video, a folder of pose images, or a .npy of 68-point landmarks (F, 68, 2) in pixels of the
model resolution. The output is an h264 mp4 at the source fps. The device is cuda when available, else cpu.

--decoder DIR decodes with a distilled tiny (TAESD-architecture) decoder instead of the KL VAE's (`bash launch.sh decoder`).

--keyframes fixed:K | adaptive:EPS runs diffusion on the keyframes only (infer/keyframes.py) and fills the frames in
between with --interpolator (an interpolator folder from `bash launch.sh interpolator`, or "blend" for a linear blend).
The output has exactly the input's frame count and fps. adaptive needs landmarks (a .npy pose input); with a .npy
the interpolator also gets its landmark flow prior, with pose images/videos it reads the pose images only.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from infer.io import InputError, read_image, read_pose, write_video
from infer.keyframes import KeyframeSpecError, parse_keyframes
from infer.pipeline import GenerationConfig, Pose2VideoPipeline
from infer.samplers import SAMPLERS
from portrait.models.bundle import ModelFolderError, Pose2VideoModel
from portrait.models.interpolator import InterpolatorFolderError, load_interpolator
from portrait.models.tiny_decoder import DecoderFolderError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m infer.animate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (teacher, student or pruned)")
    ap.add_argument("--ref", required=True, help="reference portrait image (any size; resized)")
    ap.add_argument("--pose", required=True, help="pose video, folder of pose images, or .npy landmarks (F, 68, 2)")
    ap.add_argument("--out", required=True, help="output .mp4")
    ap.add_argument("--ref-pose", default=None, help="reference pose image (ignored by the faithful pose guider, as upstream)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, e.g. 4 for a 4-step student; 25 for the teacher)")
    ap.add_argument("--guidance", type=float, default=3.5, help="CFG scale; for guidance-distilled students the embedded w")
    ap.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="default: the model's own (students record theirs), else ddim")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--height", type=int, default=None, help="must equal the model resolution if given")
    ap.add_argument("--width", type=int, default=None, help="must equal the model resolution if given")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--fps", type=float, default=None, help="output fps (default: the pose video's, else 25)")
    ap.add_argument("--context-frames", type=int, default=16)
    ap.add_argument("--context-overlap", type=int, default=4)
    ap.add_argument("--legacy-loop", action="store_true", help="upstream's loop (for benchmarking)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--keyframes", default="none", help="none | fixed:K | adaptive:EPS[:max_gap=G]: diffuse only keyframes")
    ap.add_argument("--interpolator", default=None, help="interpolator folder, or 'blend', for --keyframes")
    ap.add_argument("--decoder", default=None, help="a distilled tiny VAE decoder folder (`bash launch.sh decoder`, or a diffusers "
                    "TAESD folder) in place of the KL VAE decoder")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_flush_denormal(True)  # denormals slow CPU maths 10-100x (see portrait/training.py)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.steps is not None and args.steps < 1:
        print("error: --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        t0 = time.time()
        model = Pose2VideoModel.from_pretrained(args.model, device=device, dtype=DTYPES[args.dtype])
        res = model.config.resolution
        for name, v in (("--height", args.height), ("--width", args.width)):
            if v is not None and v != res:
                raise InputError(f"{name} {v} differs from the model resolution {res}; this model generates {res}x{res}")
        ref = read_image(args.ref)
        if args.ref_pose:
            read_image(args.ref_pose)  # validated; the faithful pose guider ignores it, as upstream
        pose, fps = read_pose(args.pose, res, args.fps)
        landmarks = np.load(args.pose, allow_pickle=False).astype(np.float32) if str(args.pose).lower().endswith(".npy") else None
        spec = parse_keyframes(args.keyframes)
        interpolator = None
        if spec.mode != "none":
            if args.interpolator is None:
                raise InputError(f"--keyframes {args.keyframes} needs --interpolator DIR (an interpolator folder) or --interpolator blend")
            if spec.needs_landmarks and landmarks is None:
                raise InputError(f"--keyframes {args.keyframes} selects keyframes from landmarks: give --pose as a .npy of "
                                 "landmarks (F, 68, 2), or use --keyframes fixed:K")
            interpolator = load_interpolator(args.interpolator, device=device)
        elif args.interpolator is not None:
            print("note: --interpolator is ignored without --keyframes fixed:K|adaptive:EPS", file=sys.stderr)
        pipe = Pose2VideoPipeline(model, interpolator=interpolator, decoder=args.decoder)
        print(f"loaded {args.model} in {time.time() - t0:.1f} s; {pose.shape[0]} pose frames at {fps:g} fps on {device}")
    except (InputError, ModelFolderError, KeyframeSpecError, InterpolatorFolderError, DecoderFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = args.steps if args.steps is not None else int(model.metadata.get("default_steps", 25))
    gen = GenerationConfig(steps=steps, guidance=args.guidance, sampler=args.sampler, context_frames=args.context_frames,
                           context_overlap=args.context_overlap, legacy_loop=args.legacy_loop, keyframes=str(spec))
    print(f"sampler {pipe.sampler_name(gen)}, {steps} steps, guidance {args.guidance:g}")
    generator = torch.Generator().manual_seed(args.seed)
    t1 = time.time()
    try:
        frames = pipe(ref, pose, gen, generator, progress=lambda ts: tqdm(ts, desc="denoising", unit="step"), landmarks=landmarks)
    except KeyframeSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if spec.mode != "none":
        print(f"keyframes ({spec}): {len(pipe.last_keyframes)} of {pose.shape[0]} frames diffused {pipe.last_keyframes}; "
              f"{pose.shape[0] - len(pipe.last_keyframes)} interpolated")
    video = (frames.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    write_video(args.out, video, fps)
    dt = time.time() - t1
    print(f"wrote {args.out}: {video.shape[0]} frames {video.shape[2]}x{video.shape[1]} at {fps:g} fps in {dt:.1f} s ({dt / video.shape[0]:.3f} s/frame)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
