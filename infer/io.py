"""Reading inputs (images, pose videos, pose folders, landmark arrays) and writing videos, with clear errors.

Video I/O uses the ffmpeg binary bundled with imageio-ffmpeg (no system ffmpeg needed). Outputs are written
to a temporary file in the destination folder and renamed into place, so a failed run leaves nothing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif"}


class InputError(ValueError):
    """An input file is missing, unreadable, or has the wrong shape; the message names it."""


def read_image(path: str | Path) -> np.ndarray:
    """-> uint8 (H, W, 3)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read image {p}: {e}") from None


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """-> (uint8 (F, H, W, 3), fps). Corrupt or empty videos raise :class:`InputError`."""
    import imageio_ffmpeg

    p = Path(path)
    if not p.is_file():
        raise InputError(f"video not found: {p}")
    if p.stat().st_size == 0:
        raise InputError(f"video {p} is empty (0 bytes)")
    try:
        reader = imageio_ffmpeg.read_frames(str(p), pix_fmt="rgb24")
        meta = reader.__next__()
        w, h = meta["size"]
        fps = float(meta.get("fps") or 25.0)
        frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    except (RuntimeError, OSError, StopIteration, KeyError, ValueError) as e:
        raise InputError(f"cannot decode video {p}: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}") from None
    if not frames:
        raise InputError(f"video {p} has no decodable frames")
    return np.stack(frames), fps


def read_pose(path: str | Path, size: int, fps: float | None = None) -> tuple[np.ndarray, float]:
    """A pose video, a folder of pose images, or a ``.npy`` of landmarks (F, 68, 2) in pixels of a ``size`` frame.

    Returns (uint8 (F, H, W, 3) pose images, fps). Landmarks are drawn with the project's pose renderer.
    """
    p = Path(path)
    default_fps = fps or 25.0
    if not p.exists():
        raise InputError(f"pose input not found: {p}")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"pose folder {p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        frames = [read_image(f) for f in files]
        shapes = {f.shape for f in frames}
        if len(shapes) > 1:
            raise InputError(f"pose images in {p} have different sizes {sorted(shapes)}")
        return np.stack(frames), default_fps
    if p.suffix.lower() == ".npy":
        try:
            lmk = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"cannot read landmarks {p}: {e}") from None
        if lmk.ndim != 3 or lmk.shape[1:] != (68, 2):
            raise InputError(f"landmarks {p} must have shape (F, 68, 2), got {lmk.shape}")
        if lmk.shape[0] == 0:
            raise InputError(f"landmarks {p} hold zero frames")
        if not np.isfinite(lmk).all():
            raise InputError(f"landmarks {p} contain NaN or inf")
        from portrait.data.pose import draw_pose_sequence

        return draw_pose_sequence(lmk.astype(np.float32), size), default_fps
    if p.suffix.lower() in VIDEO_SUFFIXES:
        frames, vfps = read_video(p)
        return frames, fps or vfps
    raise InputError(f"unsupported pose input {p}: give a video ({', '.join(sorted(VIDEO_SUFFIXES))}), a folder of images, or a .npy of landmarks")


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Write uint8 (F, H, W, 3) frames as h264 mp4 (yuv420p) atomically."""
    import imageio_ffmpeg

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=p.suffix or ".mp4", dir=p.parent)
    os.close(fd)
    try:
        h, w = frames.shape[1:3]
        writer = imageio_ffmpeg.write_frames(tmp, (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                             quality=None, bitrate=None, macro_block_size=1,
                                             output_params=["-crf", "18"], ffmpeg_log_level="error")
        writer.send(None)
        for f in frames:
            writer.send(np.ascontiguousarray(f))
        writer.close()
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_gif(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=".gif", dir=p.parent)
    os.close(fd)
    try:
        images = [Image.fromarray(f) for f in frames]
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
