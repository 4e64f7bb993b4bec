"""The 68-point iBUG / 300-W facial landmark layout and a few geometric read-outs.

Index ranges (0-based, as in dlib and AniPortrait's 2-D pose drawings). "Right" and "left" are the
subject's, so the right eye (36-41) appears on the image's left side in a frontal portrait:

    jaw          0-16   image-left ear level -> chin (8) -> image-right ear level
    right brow  17-21   outer -> inner
    left brow   22-26   inner -> outer
    nose bridge 27-30   between the eyes -> nose tip
    nose base   31-35   image-left nostril wing -> subnasale (33) -> image-right wing
    right eye   36-41   36 outer corner, 37-38 upper lid, 39 inner corner, 40-41 lower lid
    left eye    42-47   42 inner corner, 43-44 upper lid, 45 outer corner, 46-47 lower lid
    outer lips  48-59   48 image-left corner, 49-53 upper lip (51 top centre), 54 corner, 55-59 lower lip
    inner lips  60-67   60 corner, 61-63 upper inner edge, 64 corner, 65-67 lower inner edge

Landmarks are float arrays ``(..., 68, 2)`` holding ``(x, y)`` in pixels, origin at the image's
top-left corner, so pixel ``(row i, col j)`` covers ``[j, j+1) x [i, i+1)``.
"""

from __future__ import annotations

import numpy as np

NUM_LANDMARKS = 68

JAW = range(0, 17)
RIGHT_BROW = range(17, 22)
LEFT_BROW = range(22, 27)
NOSE_BRIDGE = range(27, 31)
NOSE_BASE = range(31, 36)
RIGHT_EYE = range(36, 42)
LEFT_EYE = range(42, 48)
OUTER_LIPS = range(48, 60)
INNER_LIPS = range(60, 68)

# name -> (indices, closed). Closed regions are drawn as polygons (the last point joins the first).
REGIONS: dict[str, tuple[range, bool]] = {
    "jaw": (JAW, False),
    "right_brow": (RIGHT_BROW, False),
    "left_brow": (LEFT_BROW, False),
    "nose_bridge": (NOSE_BRIDGE, False),
    "nose_base": (NOSE_BASE, False),
    "right_eye": (RIGHT_EYE, True),
    "left_eye": (LEFT_EYE, True),
    "outer_lips": (OUTER_LIPS, True),
    "inner_lips": (INNER_LIPS, True),
}

# Index pairs for lid / lip gaps: (upper point, lower point) facing each other across the opening.
_RIGHT_EYE_GAPS = ((37, 41), (38, 40))
_LEFT_EYE_GAPS = ((43, 47), (44, 46))
_INNER_LIP_GAPS = ((61, 67), (62, 66), (63, 65))


def _check(lmk: np.ndarray) -> np.ndarray:
    lmk = np.asarray(lmk, dtype=np.float64)
    if lmk.ndim < 2 or lmk.shape[-2:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"expected landmarks of shape (..., 68, 2), got {lmk.shape}")
    return lmk


def eye_centres(lmk: np.ndarray) -> np.ndarray:
    """Mean of each eye's six contour points.

    Args:
        lmk: ``(..., 68, 2)`` landmarks.
    Returns:
        ``(..., 2, 2)``: ``[..., 0]`` is the right eye (36-41, image left), ``[..., 1]`` the left eye.
    """
    lmk = _check(lmk)
    return np.stack([lmk[..., RIGHT_EYE, :].mean(-2), lmk[..., LEFT_EYE, :].mean(-2)], axis=-2)


def inter_ocular_distance(lmk: np.ndarray) -> np.ndarray:
    """Distance between the two eye centres, the usual scale normaliser for landmark errors (300-W).

    Eye centres rather than outer corners, so that blinks (which move the lids, not the centres much)
    barely change the normaliser.

    Args:
        lmk: ``(..., 68, 2)`` landmarks.
    Returns:
        ``(...)`` float64 distances in the landmarks' units.
    """
    c = eye_centres(lmk)
    return np.linalg.norm(c[..., 1, :] - c[..., 0, :], axis=-1)


def _mean_gap(lmk: np.ndarray, pairs: tuple[tuple[int, int], ...]) -> np.ndarray:
    # Distance rather than the y difference, so that head roll does not shrink the opening.
    return np.mean([np.linalg.norm(lmk[..., b, :] - lmk[..., a, :], axis=-1) for a, b in pairs], axis=0)


def mouth_opening(lmk: np.ndarray) -> np.ndarray:
    """Inner-lip gap divided by the inter-ocular distance (scale invariant; 0 = lips closed).

    Args:
        lmk: ``(..., 68, 2)`` landmarks.
    Returns:
        ``(...)`` float64, typically 0 (closed) to about 0.5 (wide open).
    """
    lmk = _check(lmk)
    return _mean_gap(lmk, _INNER_LIP_GAPS) / np.maximum(inter_ocular_distance(lmk), 1e-8)


def eye_opening(lmk: np.ndarray) -> np.ndarray:
    """Eye aspect ratio (Soukupova & Cech 2016), averaged over both eyes: lid gap / eye width.

    Args:
        lmk: ``(..., 68, 2)`` landmarks.
    Returns:
        ``(...)`` float64, about 0.25-0.4 for an open eye and near 0 for a closed one.
    """
    lmk = _check(lmk)
    right = _mean_gap(lmk, _RIGHT_EYE_GAPS) / np.maximum(
        np.linalg.norm(lmk[..., 39, :] - lmk[..., 36, :], axis=-1), 1e-8)
    left = _mean_gap(lmk, _LEFT_EYE_GAPS) / np.maximum(
        np.linalg.norm(lmk[..., 45, :] - lmk[..., 42, :], axis=-1), 1e-8)
    return 0.5 * (right + left)


def mouth_box(lmk: np.ndarray, size: int | tuple[int, int], margin: float = 0.25) -> tuple[int, int, int, int]:
    """Integer pixel box around the outer lips, grown by ``margin`` x mouth width on every side.

    Args:
        lmk: ``(68, 2)`` landmarks of one frame, in pixels.
        size: image size, ``S`` or ``(H, W)``; the box is clipped to it.
        margin: growth as a fraction of the outer-lip box width.
    Returns:
        ``(x0, y0, x1, y1)`` with exclusive ``x1, y1``, so ``image[y0:y1, x0:x1]`` is the crop.
        Never empty: at least one pixel wide and high.
    """
    lmk = _check(lmk)
    if lmk.ndim != 2:
        raise ValueError(f"mouth_box takes one frame's landmarks (68, 2), got {lmk.shape}")
    h, w = (size, size) if isinstance(size, (int, np.integer)) else size
    lips = lmk[OUTER_LIPS]
    lo, hi = lips.min(0), lips.max(0)
    pad = margin * (hi[0] - lo[0])
    x0 = int(np.clip(np.floor(lo[0] - pad), 0, w - 1))
    y0 = int(np.clip(np.floor(lo[1] - pad), 0, h - 1))
    x1 = int(np.clip(np.ceil(hi[0] + pad), x0 + 1, w))
    y1 = int(np.clip(np.ceil(hi[1] + pad), y0 + 1, h))
    return x0, y0, x1, y1
