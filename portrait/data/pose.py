"""Pose images: the landmark drawings the pose guider reads (AniPortrait's conditioning signal).

Each facial region of the 68-point layout (see ``portrait.data.landmarks``) is drawn as an
anti-aliased polyline in its own colour on black; eyes and lips are closed outlines. Colours are
fixed (``POSE_COLOURS``) so that the guider can tell regions apart, as in AniPortrait where the
mesh parts are colour coded.

Anti-aliasing is by supersampling: lines are drawn with PIL at ``supersample`` x the resolution and
box-filtered down (``Image.reduce``), which is exact area coverage up to the supersampling grid and
costs about 0.1 ms per 64x64 image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from portrait.data.landmarks import NUM_LANDMARKS, REGIONS

# Region -> RGB. Saturated, pairwise distinct hues; drawn in this order (later wins where lines cross).
POSE_COLOURS: dict[str, tuple[int, int, int]] = {
    "jaw": (255, 255, 255),
    "right_brow": (255, 0, 0),
    "left_brow": (0, 255, 0),
    "nose_bridge": (0, 0, 255),
    "nose_base": (0, 255, 255),
    "right_eye": (255, 255, 0),
    "left_eye": (255, 0, 255),
    "outer_lips": (255, 128, 0),
    "inner_lips": (128, 0, 255),
}


def default_line_width(size: int) -> float:
    """Line width in output pixels: 1 px up to 160 px images, then growing with the size (3.2 px at 512)."""
    return max(1.0, size / 160.0)


def _as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def draw_pose(
    landmarks: np.ndarray,
    size: int | tuple[int, int],
    line_width: float | None = None,
    supersample: int = 4,
) -> np.ndarray:
    """Draw one pose image.

    Args:
        landmarks: ``(68, 2)`` float ``(x, y)`` pixels, origin at the top-left image corner. A frame whose
            landmarks contain NaN (no face found) gives an all-black image.
        size: output size, ``S`` or ``(H, W)``.
        line_width: in output pixels; ``None`` -> ``default_line_width(max(H, W))``.
        supersample: drawing resolution factor for anti-aliasing (1 = aliased).
    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    lmk = np.asarray(landmarks, dtype=np.float64)
    if lmk.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"draw_pose expects landmarks of shape (68, 2), got {lmk.shape}")
    h, w = _as_hw(size)
    s = int(supersample)
    if s < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    if not np.all(np.isfinite(lmk)):
        return np.zeros((h, w, 3), np.uint8)
    canvas = Image.new("RGB", (w * s, h * s))
    width = line_width if line_width is not None else default_line_width(max(h, w))
    width_ss = max(1, int(round(width * s)))
    # PIL puts pixel centres at integer coordinates, so continuous x maps to x * s - 0.5.
    pts = lmk * s - 0.5
    draw = ImageDraw.Draw(canvas)
    for name, (idx, closed) in REGIONS.items():
        seq = pts[list(idx)]
        if closed:
            seq = np.concatenate([seq, seq[:1]], axis=0)
        colour = POSE_COLOURS[name]
        draw.line(seq.ravel().tolist(), fill=colour, width=width_ss, joint="curve")
        # Round caps: PIL's wide lines have square-cut ends, which look chopped after downsampling.
        if width_ss > 2 and not closed:
            r = width_ss / 2.0
            for x, y in (seq[0], seq[-1]):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    if s > 1:
        canvas = canvas.reduce(s)
    return np.asarray(canvas, dtype=np.uint8)


def draw_pose_sequence(
    landmarks: np.ndarray,
    size: int | tuple[int, int],
    line_width: float | None = None,
    supersample: int = 4,
) -> np.ndarray:
    """Draw a pose image per frame.

    Args:
        landmarks: ``(F, 68, 2)`` pixels (see ``draw_pose``).
        size, line_width, supersample: as in ``draw_pose``.
    Returns:
        ``(F, H, W, 3)`` uint8.
    """
    lmk = np.asarray(landmarks)
    if lmk.ndim != 3 or lmk.shape[1:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"draw_pose_sequence expects (F, 68, 2), got {lmk.shape}")
    h, w = _as_hw(size)
    out = np.empty((lmk.shape[0], h, w, 3), np.uint8)
    for f in range(lmk.shape[0]):
        out[f] = draw_pose(lmk[f], (h, w), line_width, supersample)
    return out
