"""Real talking-head videos -> the fastportrait clip dataset (same schema as the synthetic one).

Per video: decode with the ffmpeg bundled by imageio-ffmpeg (centre square crop, area resize,
rgb24, source fps kept), get 68-point landmarks, cut non-overlapping ``--frames-per-clip`` windows
in which every frame has a face, draw their pose images. Landmarks come either from
``--landmarks-from DIR`` (precomputed ``.npy`` per video) or from MediaPipe Face Mesh run by
``python -m portrait.data.landmarks_mediapipe`` under a separate interpreter (mediapipe needs
protobuf<5, which conflicts with wandb): ``--mediapipe-python PATH`` or env
``FASTPORTRAIT_MEDIAPIPE_PYTHON``.

Identities: a video in a subfolder of ``--src`` belongs to the person named by its top-level
subfolder (``src/alice/*.mp4``); a video directly in ``--src`` is its own identity. Splits are by
identity. Videos that cannot be used (corrupt, unreadable, too short, no face, landmark problems)
are skipped and listed with the reason in ``<out>/report.json``; they never stop the job.

Precomputed landmarks: ``DIR/<path relative to --src, suffix .npy>`` (or ``DIR/<stem>.npy``), shape
``(T, 68, 2)``, ``(x, y)`` normalised to ``[0, 1]`` of the centre square crop, NaN rows = no face,
``T`` = number of decoded frames.

CLI::

    python -m portrait.data.videos --src videos/ --out data/real64 --size 64 --frames-per-clip 16 \\
        --mediapipe-python ~/.venvs/mediapipe/bin/python
    python -m portrait.data.videos --src videos/ --out data/real64 --landmarks-from landmarks/
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image
from tqdm import tqdm

from portrait.data.dataset import SPLITS, ClipFileWriter, atomic_output_dir, clip_features, save_splits, split_counts, stable_id
from portrait.data.landmarks import NUM_LANDMARKS
from portrait.data.pose import draw_pose_sequence

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
REPO_ROOT = Path(__file__).resolve().parents[2]
MEDIAPIPE_ENV = "FASTPORTRAIT_MEDIAPIPE_PYTHON"
DEFAULT_FPS = 25.0


class SkipVideo(Exception):
    """A video that cannot be used; the message is the reason written to the report."""


@dataclass(frozen=True)
class VideoConfig:
    size: int = 64
    frames_per_clip: int = 16
    clip_hop: int | None = None              # frames between clip starts; None = frames_per_clip
    max_clips_per_video: int | None = None
    max_frames: int | None = None            # decode at most this many frames per video
    landmarks_from: str | None = None
    mediapipe_python: str | None = None
    detect_size: int = 256                   # decode size for mediapipe (it is poor on tiny frames)
    segment_frames: int = 1024               # frames decoded/annotated at a time (bounds memory)
    timeout_s: float = 600.0


def find_videos(src: str | os.PathLike) -> list[Path]:
    """Video files under ``src`` (recursive, sorted), as paths relative to ``src``."""
    root = Path(src)
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def identity_key(rel: Path) -> str:
    """Person of a video: its top-level subfolder, or the file stem for a video directly in ``--src``."""
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _ffmpeg_cmd(path: str | os.PathLike, size: int, max_frames: int | None) -> list[str]:
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-i", str(path),
           "-map", "0:v:0", "-vf", f"crop='min(iw,ih)':'min(iw,ih)',scale={size}:{size}:flags=area",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-an", "-sn"]
    if max_frames:
        cmd += ["-frames:v", str(int(max_frames))]
    return cmd + ["pipe:1"]


def _parse_fps(log: str) -> float | None:
    # The input stream line reads e.g. "Stream #0:0(und): Video: h264 ..., 25 fps, 25 tbr, ...".
    for line in log.splitlines():
        if "Stream #0" in line and "Video:" in line:
            m = re.search(r"([\d.]+) fps", line) or re.search(r"([\d.]+)k? tbr", line)
            return float(m.group(1)) if m else None
    return None


class VideoReader:
    """Decodes a video in segments with the bundled ffmpeg, so long videos need bounded memory.

    Frames are centre-cropped to a square (``min(w, h)``) and area-resized to ``size``, rgb24.
    After iterating ``segments()``: ``fps`` (the source's; ``DEFAULT_FPS`` if ffmpeg reports none),
    ``num_frames``, ``warning`` (ffmpeg's complaint if it failed after decoding some frames).

    Raises ``SkipVideo`` (from ``segments``) if ffmpeg decodes no frame at all.
    """

    def __init__(self, path: str | os.PathLike, size: int, max_frames: int | None = None,
                 segment_frames: int = 1024, timeout_s: float = 600.0):
        self.path, self.size, self.max_frames = path, size, max_frames
        self.segment_frames, self.timeout_s = segment_frames, timeout_s
        self.fps: float = DEFAULT_FPS
        self.num_frames = 0
        self.warning: str | None = None

    def segments(self) -> Iterator[np.ndarray]:
        """Yield consecutive ``(n, size, size, 3)`` uint8 segments of at most ``segment_frames`` frames."""
        frame_bytes = self.size * self.size * 3
        # stderr goes to a file: a pipe could fill up with decode warnings and deadlock ffmpeg.
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(_ffmpeg_cmd(self.path, self.size, self.max_frames),
                                    stdout=subprocess.PIPE, stderr=log)
            try:
                while True:
                    buf = proc.stdout.read(frame_bytes * self.segment_frames)
                    n = len(buf) // frame_bytes
                    if self.num_frames == 0 and n:
                        log.seek(0)
                        self.fps = _parse_fps(log.read().decode(errors="replace")) or DEFAULT_FPS
                    if n:
                        self.num_frames += n
                        yield np.frombuffer(buf, np.uint8, count=n * frame_bytes).reshape(n, self.size, self.size, 3)
                    if len(buf) < frame_bytes * self.segment_frames:
                        break
                rc = proc.wait(timeout=self.timeout_s)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            log.seek(0)
            lines = [ln.strip() for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
        detail = " / ".join(lines[-2:]) if lines else f"exit code {rc}"
        if self.num_frames == 0:
            raise SkipVideo(f"unreadable video (ffmpeg: {detail})" if rc != 0 else "no decodable video frames")
        if rc != 0:
            self.warning = f"ffmpeg stopped after {self.num_frames} frames: {detail}"


def decode_video(path: str | os.PathLike, size: int, max_frames: int | None = None,
                 timeout_s: float = 600.0) -> tuple[np.ndarray, float]:
    """Decode a whole video: frames ``(T, size, size, 3)`` uint8 and fps (see ``VideoReader``)."""
    reader = VideoReader(path, size, max_frames, timeout_s=timeout_s)
    frames = np.concatenate(list(reader.segments()), axis=0)
    return frames, reader.fps


def precomputed_landmarks(landmarks_dir: str | os.PathLike, rel: Path) -> np.ndarray:
    """Load ``(T, 68, 2)`` normalised landmarks for video ``rel`` from a precomputed folder (SkipVideo if absent/bad)."""
    d = Path(landmarks_dir)
    for cand in (d / rel.with_suffix(".npy"), d / f"{rel.stem}.npy"):
        if cand.is_file():
            try:
                lmk = np.load(cand)
            except Exception as e:
                raise SkipVideo(f"unreadable landmarks file {cand.name}: {e}") from e
            if lmk.ndim != 3 or lmk.shape[1:] != (NUM_LANDMARKS, 2):
                raise SkipVideo(f"landmarks file {cand.name} has shape {lmk.shape}, expected (T, 68, 2)")
            return lmk.astype(np.float32)
    raise SkipVideo(f"no landmarks file for {rel} in {d}")


def _mediapipe_cmd(python: str, *args: str) -> tuple[list[str], dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return [python, "-m", "portrait.data.landmarks_mediapipe", *args], env


def check_mediapipe(python: str) -> None:
    """Raise ``RuntimeError`` with the reason unless ``python`` can run the mediapipe landmark step."""
    cmd, env = _mediapipe_cmd(python, "--check")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"cannot run mediapipe interpreter {python!r}: {e}") from e
    if proc.returncode != 0:
        raise RuntimeError(f"mediapipe interpreter {python!r} failed its check: "
                           f"{(proc.stderr or proc.stdout).strip()[-500:]}")


def mediapipe_landmarks(frames: np.ndarray, python: str, timeout_s: float = 600.0) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 -> ``(T, 68, 2)`` normalised landmarks via the mediapipe subprocess."""
    with tempfile.TemporaryDirectory(prefix="fastportrait-mp-") as tmp:
        fin, fout = os.path.join(tmp, "frames.npy"), os.path.join(tmp, "landmarks.npy")
        np.save(fin, frames)
        cmd, env = _mediapipe_cmd(python, "--frames", fin, "--out", fout)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise SkipVideo(f"landmark extraction timed out after {timeout_s:.0f} s") from e
        if proc.returncode != 0 or not os.path.isfile(fout):
            raise SkipVideo(f"landmark extraction failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
        lmk = np.load(fout)
    if lmk.shape != (len(frames), NUM_LANDMARKS, 2):
        raise SkipVideo(f"landmark extraction returned shape {lmk.shape} for {len(frames)} frames")
    return lmk.astype(np.float32)


def clip_starts(valid: np.ndarray, frames_per_clip: int, hop: int, max_clips: int | None = None) -> list[int]:
    """Start frames of windows of ``frames_per_clip`` frames that are all ``valid`` (have a face).

    Greedy left to right: a window starts at the next valid run with room; after a clip the next
    starts ``hop`` frames later.
    """
    starts: list[int] = []
    t, n = 0, len(valid)
    # bad[t] = number of invalid frames before t, to test a window in O(1).
    bad = np.concatenate([[0], np.cumsum(~valid)])
    while t + frames_per_clip <= n and (max_clips is None or len(starts) < max_clips):
        if bad[t + frames_per_clip] - bad[t] == 0:
            starts.append(t)
            t += hop
        else:
            t += 1
    return starts


def process_video(src: Path, rel: Path, cfg: VideoConfig, out_path: str | os.PathLike, identity: int) -> dict:
    """Decode, annotate and cut one video, writing its clips to ``out_path`` (an Arrow file).

    Works segment by segment (``cfg.segment_frames``), so memory does not grow with the video's
    length; clip windows do not straddle segments.

    Returns:
        info for the report: frames, fps, face_frames, clips (and warning, if ffmpeg complained).
    Raises:
        SkipVideo: the video is not usable; the message says why. ``out_path`` is removed then.
    """
    use_mp = cfg.landmarks_from is None
    decode_size = max(cfg.size, cfg.detect_size) if use_mp else cfg.size
    pre = None  # precomputed landmarks, loaded once the video proves readable (the likelier problem)
    reader = VideoReader(src / rel, decode_size, cfg.max_frames, cfg.segment_frames, cfg.timeout_s)
    hop = cfg.clip_hop or cfg.frames_per_clip
    face_frames = 0
    try:
        with ClipFileWriter(out_path, clip_features(cfg.frames_per_clip, cfg.size, cfg.size)) as writer:
            for seg in reader.segments():
                t0 = reader.num_frames - len(seg)
                if use_mp:
                    lmk = mediapipe_landmarks(seg, cfg.mediapipe_python, cfg.timeout_s)
                else:
                    if pre is None:
                        pre = precomputed_landmarks(cfg.landmarks_from, rel)
                    lmk = pre[t0:t0 + len(seg)]
                    if len(lmk) < len(seg):
                        raise SkipVideo(f"landmarks have {len(pre)} frames, the video has more")
                if decode_size != cfg.size:
                    seg = np.stack([np.asarray(Image.fromarray(f).resize((cfg.size, cfg.size), Image.BOX)) for f in seg])
                valid = np.all(np.isfinite(lmk), axis=(1, 2))
                face_frames += int(valid.sum())
                left = None if cfg.max_clips_per_video is None else cfg.max_clips_per_video - writer.count
                if left == 0:
                    continue
                lmk_px = lmk * np.float32(cfg.size)
                clips = []
                for s in clip_starts(valid, cfg.frames_per_clip, hop, left):
                    w = slice(s, s + cfg.frames_per_clip)
                    clips.append({"frames": seg[w], "landmarks": lmk_px[w], "identity": identity,
                                  "pose": draw_pose_sequence(lmk_px[w], cfg.size), "fps": float(reader.fps),
                                  "source": f"video:{rel.as_posix()}:start={t0 + s}"})
                writer.write(clips)
        n = reader.num_frames
        if pre is not None and len(pre) != n and not (cfg.max_frames and n == cfg.max_frames):
            raise SkipVideo(f"landmarks have {len(pre)} frames, the video decoded to {n}")
        if n < cfg.frames_per_clip:
            raise SkipVideo(f"too short: {n} frames < {cfg.frames_per_clip} frames per clip")
        if face_frames == 0:
            raise SkipVideo(f"no face found in any of {n} frames")
        if writer.count == 0:
            raise SkipVideo(f"no {cfg.frames_per_clip}-frame window with a face in every frame "
                            f"(face in {face_frames}/{n} frames)")
    except BaseException:
        Path(out_path).unlink(missing_ok=True)
        raise
    info = {"frames": reader.num_frames, "fps": reader.fps, "face_frames": face_frames, "clips": writer.count}
    if reader.warning:
        info["warning"] = reader.warning
    return info


def _video_job(job: tuple[str, str, int, str, VideoConfig]) -> dict:
    """Process one video and write its clips to an Arrow file (runs in a worker). Never raises."""
    src, rel, identity, path, cfg = job
    entry = {"path": rel, "identity": identity_key(Path(rel))}
    try:
        info = process_video(Path(src), Path(rel), cfg, path, identity)
        entry.update(status="ok", file=path, **info)
    except SkipVideo as e:
        entry.update(status="skipped", reason=str(e))
    except Exception as e:  # a bug or an odd file must not take the whole job down
        entry.update(status="skipped", reason=f"error: {type(e).__name__}: {e}")
    return entry


def assign_splits(keys: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Identity key -> split, by a seeded shuffle of the sorted keys and ``split_counts``."""
    uniq = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(uniq))
    bounds = np.cumsum(split_counts(len(uniq), fractions))
    return {uniq[i]: SPLITS[int(np.searchsorted(bounds, rank, side="right"))] for rank, i in enumerate(order)}


def build_dataset(src: str | os.PathLike, out_dir: str | os.PathLike, cfg: VideoConfig,
                  split_fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, workers: int = 1,
                  overwrite: bool = False, progress: bool = False) -> dict:
    """Build a DatasetDict from a folder of videos at ``out_dir`` (atomic), with ``report.json``.

    Returns:
        the report: ``{"videos": [{path, identity, split, status, reason | frames/fps/clips}], "splits": ...}``.
    Raises:
        FileNotFoundError: ``src`` is missing or has no videos. ValueError: bad configuration.
    """
    t0 = time.perf_counter()
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a directory")
    videos = find_videos(src)
    if not videos:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {src}")
    if cfg.frames_per_clip < 1 or cfg.size < 8:
        raise ValueError(f"need frames_per_clip >= 1 and size >= 8, got {cfg.frames_per_clip}, {cfg.size}")
    if cfg.segment_frames < cfg.frames_per_clip:
        raise ValueError(f"segment_frames ({cfg.segment_frames}) must be >= frames_per_clip ({cfg.frames_per_clip})")
    if cfg.landmarks_from is None:
        if not cfg.mediapipe_python:
            raise ValueError(f"need --landmarks-from DIR or a mediapipe interpreter (--mediapipe-python PATH "
                             f"or ${MEDIAPIPE_ENV})")
        check_mediapipe(cfg.mediapipe_python)
    elif not Path(cfg.landmarks_from).is_dir():
        raise FileNotFoundError(f"--landmarks-from {cfg.landmarks_from} is not a directory")
    features = clip_features(cfg.frames_per_clip, cfg.size, cfg.size)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        scratch = tmp / "_scratch"
        scratch.mkdir()
        jobs = [(str(src), v.as_posix(), stable_id("fastportrait/videos/identity", identity_key(v)), str(scratch / f"{i:06d}.arrow"), cfg)
                for i, v in enumerate(videos)]
        bar = tqdm(total=len(jobs), unit="video", desc="videos", disable=not progress)
        if workers > 1 and len(jobs) > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(min(workers, len(jobs))) as pool:
                entries = []
                for e in pool.imap(_video_job, jobs):
                    entries.append(e)
                    bar.update(1)
        else:
            entries = []
            for job in jobs:
                entries.append(_video_job(job))
                bar.update(1)
        bar.close()
        # Splits are drawn among the identities that kept at least one clip, so that skipped videos
        # cannot leave a split empty.
        split_of = assign_splits([e["identity"] for e in entries if e["status"] == "ok"], split_fractions, seed)
        files: dict[str, list[str]] = {s: [] for s in SPLITS}
        for e in entries:
            e["split"] = split_of.get(e["identity"]) if e["status"] == "ok" else None
            if e["status"] == "ok":
                files[e["split"]].append(e.pop("file"))
        save_splits(tmp, files, features)
        shutil.rmtree(scratch, ignore_errors=True)
        ok = [e for e in entries if e["status"] == "ok"]
        report = {
            "videos": entries,
            "splits": {s: {"clips": sum(e["clips"] for e in ok if e["split"] == s),
                           "identities": len({e["identity"] for e in ok if e["split"] == s}),
                           "videos": sum(1 for e in ok if e["split"] == s)} for s in SPLITS},
            "ok_videos": len(ok), "skipped_videos": len(entries) - len(ok),
            "config": {**cfg.__dict__, "split_fractions": list(split_fractions), "seed": seed},
            "seconds": round(time.perf_counter() - t0, 3), "src": str(src.absolute()),
            "out": str(Path(out_dir).absolute()),
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portrait.data.videos", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--src", required=True, help="folder of videos (subfolder per person optional)")
    parser.add_argument("--out", required=True, help="output directory (DatasetDict + report.json)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames-per-clip", type=int, default=16)
    parser.add_argument("--clip-hop", type=int, default=None, help="frames between clip starts (default: no overlap)")
    parser.add_argument("--max-clips-per-video", type=int, default=None)
    parser.add_argument("--max-frames", type=int, default=None, help="decode at most this many frames per video")
    parser.add_argument("--landmarks-from", default=None, help="folder of precomputed (T, 68, 2) normalised .npy")
    parser.add_argument("--mediapipe-python", default=os.environ.get(MEDIAPIPE_ENV),
                        help=f"interpreter with mediapipe (default ${MEDIAPIPE_ENV})")
    parser.add_argument("--detect-size", type=int, default=256, help="decode size for mediapipe")
    parser.add_argument("--split", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the identity -> split shuffle")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    for name in ("size", "frames_per_clip", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.mediapipe_python is None and args.landmarks_from is None:
        from portrait.data.landmarks_mediapipe import mediapipe_available
        if mediapipe_available():
            args.mediapipe_python = sys.executable
    cfg = VideoConfig(size=args.size, frames_per_clip=args.frames_per_clip, clip_hop=args.clip_hop,
                      max_clips_per_video=args.max_clips_per_video, max_frames=args.max_frames,
                      landmarks_from=args.landmarks_from, mediapipe_python=args.mediapipe_python,
                      detect_size=args.detect_size)
    try:
        report = build_dataset(args.src, args.out, cfg, tuple(args.split), args.seed, args.workers, args.overwrite,
                               progress=True)
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for e in report["videos"]:
        if e["status"] != "ok":
            print(f"skipped {e['path']}: {e['reason']}", file=sys.stderr)
    for s, v in report["splits"].items():
        print(f"{s:>5}: {v['clips']:6d} clips, {v['identities']:4d} identities, {v['videos']:4d} videos")
    print(f"{report['ok_videos']} videos used, {report['skipped_videos']} skipped (see {args.out}/report.json); "
          f"{report['seconds']:.1f} s")
    if report["ok_videos"] == 0:
        print("error: no usable video; the dataset is empty", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
