"""Keyframe selection for keyframed generation: diffusion on the keyframes only, an interpolator in between.

    from infer.keyframes import parse_keyframes, select_keyframes
    spec = parse_keyframes("adaptive:0.05")          # or "none", "fixed:3", "adaptive:0.05:max_gap=4"
    keys = select_keyframes(spec, num_frames=16, landmarks=lmk)   # sorted frame indices, first and last included

Spec strings:

* ``none``: every frame is a keyframe (plain full-rate diffusion).
* ``fixed:K``: every K-th frame, plus the last frame (so N not divisible by K works: the last gap is shorter).
* ``adaptive:EPS[:max_gap=G]``: from the landmarks alone, no model. Start from the first and last frame and
  greedily add keyframes where linear interpolation of the landmarks between the chosen keyframes misses a skipped
  frame by more than EPS (weighted mean point error over the 68 points divided by the inter-ocular distance, with
  lips and eyes weighted ``REGION_WEIGHT`` x more, as they move most and matter most for lip sync and blinks);
  keyframes are always forced at local extremes of mouth and eye opening (a closing mouth whose apex falls between
  keyframes cannot be recovered by any interpolator that only sees the keyframes, a landmark-conditioned one
  included, without large warps); and no gap may exceed ``max_gap`` frames (default ``DEFAULT_MAX_GAP``).

:func:`keyframes_for_budget` is the same criterion with a keyframe budget instead of EPS (for comparing adaptive and
fixed selection at an equal number of keyframes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from portrait.data.landmarks import INNER_LIPS, LEFT_EYE, OUTER_LIPS, RIGHT_EYE, eye_opening, inter_ocular_distance, mouth_opening

DEFAULT_MAX_GAP = 4
REGION_WEIGHT = 3.0  # weight of lip and eye points in the interpolation error, relative to the other points
# Extremes of mouth / eye opening smaller than this (prominence, in the units of landmarks.mouth_opening /
# eye_opening) are jitter, not speech or blinks, and force nothing.
MIN_PROMINENCE = 0.03


class KeyframeSpecError(ValueError):
    """A keyframe spec string is malformed; the message shows the accepted forms."""


@dataclass(frozen=True)
class KeyframeSpec:
    mode: str  # "none" | "fixed" | "adaptive"
    interval: int = 1  # fixed: K
    eps: float = 0.0  # adaptive: error threshold in inter-ocular units
    max_gap: int = DEFAULT_MAX_GAP  # adaptive: largest allowed gap between keyframes

    def __str__(self) -> str:
        if self.mode == "fixed":
            return f"fixed:{self.interval}"
        if self.mode == "adaptive":
            return f"adaptive:{self.eps:g}" + (f":max_gap={self.max_gap}" if self.max_gap != DEFAULT_MAX_GAP else "")
        return "none"

    @property
    def needs_landmarks(self) -> bool:
        return self.mode == "adaptive"


_FORMS = "'none', 'fixed:K' (K >= 1, e.g. fixed:3) or 'adaptive:EPS[:max_gap=G]' (EPS >= 0, e.g. adaptive:0.05)"


def parse_keyframes(spec: str | KeyframeSpec | None) -> KeyframeSpec:
    """Parse ``"none"``, ``"fixed:3"``, ``"adaptive:0.05"`` or ``"adaptive:0.05:max_gap=4"``."""
    if isinstance(spec, KeyframeSpec):
        return spec
    if spec is None:
        return KeyframeSpec("none")
    s = str(spec).strip().lower()
    if s in ("none", "", "fixed:1"):
        return KeyframeSpec("none")
    m = re.fullmatch(r"fixed:(\d+)", s)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise KeyframeSpecError(f"keyframe spec {spec!r}: K must be >= 1; use {_FORMS}")
        return KeyframeSpec("none") if k == 1 else KeyframeSpec("fixed", interval=k)
    m = re.fullmatch(r"adaptive:([0-9]*\.?[0-9]+(?:e-?\d+)?)(?::max_gap=(\d+))?", s)
    if m:
        gap = int(m.group(2)) if m.group(2) else DEFAULT_MAX_GAP
        if gap < 1:
            raise KeyframeSpecError(f"keyframe spec {spec!r}: max_gap must be >= 1")
        return KeyframeSpec("adaptive", eps=float(m.group(1)), max_gap=gap)
    raise KeyframeSpecError(f"cannot parse keyframe spec {spec!r}; use {_FORMS}")


def fixed_keyframes(num_frames: int, interval: int) -> list[int]:
    """``[0, K, 2K, ..., N-1]``: every K-th frame and always the last one."""
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    keys = list(range(0, num_frames, max(1, interval)))
    if keys[-1] != num_frames - 1:
        keys.append(num_frames - 1)
    return keys


def _point_weights() -> np.ndarray:
    w = np.ones(68)
    for r in (OUTER_LIPS, INNER_LIPS, LEFT_EYE, RIGHT_EYE):
        w[list(r)] = REGION_WEIGHT
    return w / w.sum()


def interpolation_error(landmarks: np.ndarray, a: int, b: int) -> np.ndarray:
    """Error of linearly interpolating the landmarks of frames ``a`` and ``b`` at each frame strictly between.

    Args:
        landmarks: ``(F, 68, 2)`` pixels.
    Returns:
        ``(b - a - 1,)``: weighted mean point distance / inter-ocular distance of each skipped frame.
    """
    if b - a < 2:
        return np.zeros(0)
    j = np.arange(a + 1, b)
    t = ((j - a) / (b - a))[:, None, None]
    lin = (1 - t) * landmarks[a] + t * landmarks[b]
    d = np.linalg.norm(lin - landmarks[j], axis=-1)  # (n, 68)
    iod = np.maximum(inter_ocular_distance(landmarks[j]), 1e-6)
    return (d * _point_weights()).sum(-1) / iod


def opening_extremes(landmarks: np.ndarray, min_prominence: float = MIN_PROMINENCE) -> list[int]:
    """Frames at local maxima / minima of mouth opening and of eye opening (interior frames only).

    A frame counts when its opening is a strict-or-plateau extreme of its neighbours and differs from the lowest
    (for maxima; highest for minima) value reached before the curve turns again on each side by at least
    ``min_prominence`` on one side (a simple prominence test that ignores jitter).
    """
    out: set[int] = set()
    for curve in (mouth_opening(landmarks), eye_opening(landmarks)):
        n = len(curve)
        for i in range(1, n - 1):
            for sign in (1.0, -1.0):
                c = sign * curve
                if not (c[i] >= c[i - 1] and c[i] >= c[i + 1] and (c[i] > c[i - 1] or c[i] > c[i + 1])):
                    continue
                left = c[: i + 1][::-1]
                right = c[i:]
                # descend on each side until the curve rises above c[i] again (or the ends)
                lmin = np.min(left[: np.argmax(np.append(left[1:] > c[i], True)) + 1])
                rmin = np.min(right[: np.argmax(np.append(right[1:] > c[i], True)) + 1])
                if c[i] - min(lmin, rmin) >= min_prominence or c[i] - max(lmin, rmin) >= min_prominence:
                    out.add(i)
    return sorted(out)


def adaptive_keyframes(landmarks: np.ndarray, eps: float, max_gap: int = DEFAULT_MAX_GAP,
                       force_extremes: bool = True) -> list[int]:
    """Keyframes from the landmarks alone (see the module docstring).

    Args:
        landmarks: ``(F, 68, 2)`` pixels.
        eps: largest allowed interpolation error of a skipped frame, in inter-ocular units.
        max_gap: largest allowed distance between consecutive keyframes (>= 1).
        force_extremes: force keyframes at local extremes of mouth and eye opening.
    Returns:
        sorted frame indices; always holds 0 and F-1; consecutive keyframes are at most ``max_gap`` apart.
    """
    lmk = np.asarray(landmarks, dtype=np.float64)
    if lmk.ndim != 3 or lmk.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must be (F, 68, 2), got {lmk.shape}")
    n = lmk.shape[0]
    if n < 1:
        raise ValueError("no frames")
    if max_gap < 1:
        raise ValueError("max_gap must be >= 1")
    keys = {0, n - 1}
    if force_extremes:
        keys.update(opening_extremes(lmk))
    # Greedy refinement (Ramer-Douglas-Peucker on the landmark trajectory): while some skipped frame is off by more
    # than eps, add the worst one; then, while some gap exceeds max_gap, split it at its worst frame (the middle when
    # the error is flat). Each pass adds a key, so this ends.
    while True:
        ks = sorted(keys)
        segs = [(a, b, interpolation_error(lmk, a, b)) for a, b in zip(ks[:-1], ks[1:]) if b - a >= 2]
        over = [(float(e.max()), a + 1 + int(np.argmax(e))) for a, b, e in segs if e.max() > eps]
        if over:
            keys.add(max(over)[1])
            continue
        long = [(a, b, e) for a, b, e in segs if b - a > max_gap]
        if not long:
            break
        for a, b, e in long:
            keys.add(a + 1 + int(np.argmax(e)) if e.max() > 1e-9 else (a + b) // 2)
    return sorted(keys)


def select_keyframes(spec: str | KeyframeSpec | None, num_frames: int, landmarks: np.ndarray | None = None) -> list[int]:
    """Keyframe indices of a video of ``num_frames`` frames under ``spec`` (sorted, first and last included).

    ``landmarks`` ``(F, 68, 2)`` are needed for ``adaptive`` specs; a clear error says so when they are missing.
    """
    spec = parse_keyframes(spec)
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    if spec.mode == "none":
        return list(range(num_frames))
    if spec.mode == "fixed":
        return fixed_keyframes(num_frames, spec.interval)
    if landmarks is None:
        raise KeyframeSpecError(f"keyframes {str(spec)!r} selects from landmarks, but none were given: pass the pose as a "
                                ".npy of landmarks (F, 68, 2), or use fixed:K")
    lmk = np.asarray(landmarks)
    if lmk.shape[0] != num_frames:
        raise ValueError(f"{lmk.shape[0]} landmark frames for {num_frames} pose frames")
    return adaptive_keyframes(lmk, spec.eps, spec.max_gap)


def keyframes_for_budget(landmarks: np.ndarray, count: int, max_gap: int | None = None) -> list[int]:
    """Adaptive selection with exactly ``count`` keyframes (to compare with ``fixed:K`` at equal cost).

    Greedy: start from the first and last frame; while a gap exceeds ``max_gap`` split it at its worst frame; then
    add the frame with the largest landmark interpolation error (the criterion of :func:`adaptive_keyframes`) until
    there are ``count`` keyframes. Extremes of mouth / eye opening are not forced here (they would fix the count),
    but they are where the interpolation error peaks, so the greedy choice lands on them first.
    """
    lmk = np.asarray(landmarks, dtype=np.float64)
    n = lmk.shape[0]
    count = max(min(count, n), min(n, 2))
    keys = {0, n - 1}

    def worst(pred) -> tuple[float, int] | None:
        ks = sorted(keys)
        cands = []
        for a, b in zip(ks[:-1], ks[1:]):
            if b - a >= 2 and pred(a, b):
                e = interpolation_error(lmk, a, b)
                cands.append((float(e.max()), a + 1 + int(np.argmax(e)) if e.max() > 1e-9 else (a + b) // 2))
        return max(cands) if cands else None

    while len(keys) < count:
        w = worst(lambda a, b: max_gap is not None and b - a > max_gap) or worst(lambda a, b: True)
        if w is None:
            break
        keys.add(w[1])
    return sorted(keys)
