"""Procedural talking portraits with exact 68-point landmarks, deterministic by seed.

Why: the landmark probe, the pose-conditioned diffusion models and their distilled students need
data whose landmarks are exactly right and whose identities can be held out, with no download.
Every shape is a polygon in a canonical head frame; the 68 landmarks are vertices of those same
polygons, and one transform (yaw, roll, scale, translation) maps both to pixels, so the rendered
mouth/eyes/brows agree with the landmarks by construction.

Canonical head frame (units ~ face half-width, y down): origin at the centre of the ear line,
eyes near y=-0.1, nose tip ~0.45, mouth ~0.8, chin ~1.2, z towards the camera. Yaw is approximated
as ``x' = x cos(yaw) + z sin(yaw)`` with a per-point depth ``z`` (face surface ~ half-ellipsoid,
nose in front, ears and back hair behind): the face compresses horizontally and its features shift.

Rendering: PIL polygons/lines on a ``supersample`` x larger canvas, box-filtered down
(``Image.reduce``), i.e. anti-aliasing by area coverage. About 1.5 ms per 64x64 frame incl. pose.

CLI::

    python -m portrait.data.synthetic --out data/synthetic64 --clips 1000 --size 64
    python -m portrait.data.synthetic --out data/syn256 --clips 200 --size 256 --frames 32 --seed 1
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from portrait.data.dataset import SPLITS, atomic_output_dir, clip_features, save_splits, split_counts, stable_id, write_arrow_file
from portrait.data.landmarks import NUM_LANDMARKS
from portrait.data.pose import draw_pose_sequence

FPS = 25.0
HAIR_STYLES = ("bald", "buzz", "short", "spiky", "fringe", "bob", "long", "afro", "bun")
BACKGROUNDS = ("flat", "vgrad", "hgrad", "radial", "stripes", "checker", "blobs")
BEARDS = ("none", "stubble", "moustache", "beard")
_MOTION_KEYS = ("mouth_open", "mouth_width", "eye_open", "brow_raise", "gaze_x", "gaze_y", "tx", "ty", "roll", "yaw",
                "scale")

Colour = tuple[int, int, int]

_SKIN_ANCHORS = np.array([(255, 226, 204), (241, 194, 160), (224, 172, 128), (198, 134, 90),
                          (160, 100, 62), (120, 74, 44), (82, 52, 34)], np.float64)
_HAIR = {  # colour -> weight; mostly natural shades
    (25, 20, 20): 5, (55, 38, 28): 5, (100, 66, 40): 4, (140, 72, 38): 2, (205, 170, 105): 3,
    (230, 215, 180): 1, (150, 148, 145): 2, (170, 55, 30): 1, (45, 75, 170): 0.5,
    (200, 80, 150): 0.5, (60, 140, 90): 0.5,
}
_IRIS: tuple[Colour, ...] = ((92, 56, 30), (45, 30, 22), (70, 120, 180), (80, 130, 85), (120, 130, 140),
                             (130, 100, 50))


def _clip_colour(c) -> Colour:
    return tuple(int(v) for v in np.clip(np.round(c), 0, 255))


def _mix(a, b, t: float) -> Colour:
    return _clip_colour((1 - t) * np.asarray(a, np.float64) + t * np.asarray(b, np.float64))


def _rgba(c: Colour, alpha: float) -> tuple[int, int, int, int]:
    return (*c, int(round(255 * alpha)))


@dataclass(frozen=True)
class Identity:
    """Everything about a person that stays fixed across their clips (canonical units, RGB colours)."""

    # head shape
    face_w: float       # half-width a of the face at the ear line
    face_up: float      # crown height above the ear line
    chin: float         # chin depth below the ear line
    jaw_n: float        # superellipse exponent of the jaw (2 = round, 3.5 = square)
    jaw_taper: float    # narrowing of the lower jaw
    depth: float        # face-surface depth, scales the yaw parallax
    # eyes and brows
    eye_sep: float
    eye_y: float
    eye_w: float
    eye_h: float        # upper-lid height of an open eye
    eye_low: float      # lower-lid depth
    eye_tilt: float     # outer-corner lift
    iris_r: float
    brow_y: float
    brow_in: float
    brow_len: float
    brow_thick: float
    brow_arch: float
    # nose and mouth
    nose_tip_y: float
    nose_base_y: float
    nose_w: float
    nose_depth: float
    mouth_y: float
    mouth_w: float
    lip_up: float
    lip_low: float
    smile: float
    max_open: float
    # colours
    skin: Colour
    lip: Colour
    iris: Colour
    hair: Colour
    brow: Colour
    clothes: Colour
    # hair
    hair_style: str
    hair_thick: float
    hairline_y: float
    parting: float
    hair_len: float
    # scene and accessories
    background: str
    bg_colours: tuple[Colour, Colour]
    bg_param: float
    bg_seed: int
    neckline: str
    glasses: str        # "none", "round", "square"
    glasses_colour: Colour
    earrings: str       # "none", "stud", "hoop"
    earring_colour: Colour
    beard: str
    blush: float
    light: float        # -1..1, side the light comes from (x)
    head_scale: float   # pixels per canonical unit, as a fraction of the image size


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw a random identity. All randomness comes from ``rng``."""
    u = rng.uniform

    def pick(options, weights=None):
        if weights is not None:
            w = np.asarray(weights, np.float64)
            return options[rng.choice(len(options), p=w / w.sum())]
        return options[rng.integers(len(options))]

    face_w = u(0.86, 1.0)
    skin_t = u(0, 1) * (len(_SKIN_ANCHORS) - 1)
    k = int(min(skin_t, len(_SKIN_ANCHORS) - 2))
    skin = _clip_colour(_mix(_SKIN_ANCHORS[k], _SKIN_ANCHORS[k + 1], skin_t - k) + rng.normal(0, 6, 3))
    hair_options = list(_HAIR)
    hair = _clip_colour(np.asarray(pick(hair_options, list(_HAIR.values()))) + rng.normal(0, 8, 3))
    lipstick = rng.random() < 0.2
    lip = (pick([(170, 25, 45), (200, 80, 110), (120, 40, 70)]) if lipstick
           else _mix(skin, (185, 75, 80), u(0.3, 0.6)))
    hue_rgb = rng.uniform(20, 235, 3)
    bg_a = _clip_colour(rng.uniform(10, 245, 3))
    bg_b = _clip_colour(np.asarray(bg_a) * u(0.3, 0.8) + rng.uniform(0, 100, 3)) if rng.random() < 0.5 \
        else _clip_colour(rng.uniform(10, 245, 3))
    eye_w = u(0.14, 0.19)
    style = pick(HAIR_STYLES, [0.6, 0.6, 1.5, 0.6, 1.0, 1.0, 1.6, 0.6, 0.6])
    brow_y = u(-0.42, -0.34)
    mouth_y, lip_up = u(0.74, 0.86), u(0.04, 0.08)
    # The nose base sits between the tip and the upper lip; derived so that the three stay ordered.
    nose_base_y = min(u(0.38, 0.5) + 0.07, mouth_y - lip_up - 0.08)
    return Identity(
        face_w=face_w, face_up=u(1.05, 1.25), chin=u(1.05, 1.3), jaw_n=u(2.0, 3.4), jaw_taper=u(0.05, 0.35),
        depth=u(0.5, 0.7),
        eye_sep=face_w * u(0.38, 0.45), eye_y=u(-0.14, -0.06), eye_w=eye_w, eye_h=u(0.065, 0.1),
        eye_low=u(0.035, 0.06), eye_tilt=u(-0.015, 0.035), iris_r=eye_w * u(0.4, 0.5),
        brow_y=brow_y, brow_in=u(0.1, 0.18), brow_len=u(0.42, 0.6), brow_thick=u(0.045, 0.1),
        brow_arch=u(0.02, 0.08),
        nose_tip_y=nose_base_y - 0.07, nose_base_y=nose_base_y, nose_w=u(0.1, 0.17), nose_depth=u(0.25, 0.4),
        mouth_y=mouth_y, mouth_w=u(0.3, 0.42), lip_up=lip_up, lip_low=u(0.05, 0.1),
        smile=u(-0.02, 0.05), max_open=u(0.3, 0.42),
        skin=skin, lip=lip, iris=pick(_IRIS), hair=hair, brow=_mix(hair, (40, 30, 25), u(0.2, 0.6)),
        clothes=_clip_colour(hue_rgb),
        hair_style=style, hair_thick=u(0.06, 0.16), hairline_y=u(-0.95, -0.7), parting=u(-0.45, 0.45),
        hair_len=u(1.8, 3.0),
        background=pick(BACKGROUNDS), bg_colours=(bg_a, bg_b), bg_param=u(0, 1),
        bg_seed=int(rng.integers(1 << 31)), neckline=pick(("crew", "v", "round")),
        glasses=pick(("none", "round", "square"), [6, 1, 1]), glasses_colour=pick(
            [(20, 20, 20), (120, 80, 30), (200, 170, 60), (150, 30, 30), (60, 60, 150)]),
        earrings=pick(("none", "stud", "hoop"), [6, 1, 1]), earring_colour=pick([(230, 190, 60), (210, 210, 215)]),
        beard=pick(BEARDS, [7, 1, 1, 1]), blush=u(0, 0.25), light=u(-1, 1), head_scale=u(0.21, 0.26),
    )


# ----------------------------------------------------------------------------------------------
# Motion
# ----------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, t: np.ndarray, fmin: float = 0.15, fmax: float = 1.0,
                  terms: int = 3) -> np.ndarray:
    """Sum of random sinusoids, roughly unit amplitude: cheap band-limited motion."""
    f = rng.uniform(fmin, fmax, terms)
    ph = rng.uniform(0, 2 * np.pi, terms)
    a = rng.normal(0, 1, terms) / math.sqrt(terms)
    return (a[:, None] * np.sin(2 * np.pi * f[:, None] * t[None] + ph[:, None])).sum(0)


def _events(rng: np.random.Generator, rate: float, t0: float, t1: float) -> np.ndarray:
    """Poisson event times in [t0, t1)."""
    n = rng.poisson(rate * (t1 - t0))
    return np.sort(rng.uniform(t0, t1, n))


def _bump(t: np.ndarray, start: float, dur: float) -> np.ndarray:
    """Raised cosine, 0 outside [start, start + dur], 1 at its centre."""
    x = (t - start) / dur
    return np.where((x > 0) & (x < 1), 0.5 - 0.5 * np.cos(2 * np.pi * np.clip(x, 0, 1)), 0.0)


def sample_motion(rng: np.random.Generator, num_frames: int, fps: float = FPS) -> dict[str, np.ndarray]:
    """Per-frame expression and head-pose curves, each ``(F,)`` float64.

    mouth_open [0, 1] and mouth_width (x rest width) follow a syllable envelope: raised-cosine
    openings at 3-5 syllables/s, each with its own amplitude and vowel shape (spread / rounded /
    neutral), with pauses; eye_open [0, 1] has blinks; brow_raise [0, 1]; gaze_x/y [-1, 1];
    tx, ty (fraction of the image), roll and yaw (radians) and scale (x) move smoothly.
    """
    t = np.arange(num_frames) / fps
    dur_s = num_frames / fps
    u = rng.uniform

    # Speech: syllables at a random rate, ~15% silent; all talking clips start mid-sentence.
    rate = u(3.0, 5.0)
    intensity = u(0.6, 1.0) if rng.random() < 0.9 else u(0.0, 0.15)
    mouth_open = np.zeros(num_frames)
    width = np.zeros(num_frames)
    onset = -u(0, 1.0 / rate)
    while onset < dur_s + 0.3:
        period = u(0.7, 1.3) / rate
        dur = period * u(0.75, 1.0)
        if rng.random() > 0.15:
            b = _bump(t, onset, dur)
            vowel = rng.integers(3)
            amp = u(0.45, 1.0) * intensity
            wdelta = (u(0.04, 0.14), -u(0.12, 0.25), 0.0)[vowel]
            if vowel == 1:  # rounded vowels open less
                amp *= 0.75
            mouth_open += amp * b
            width += wdelta * b
        onset += period
    mouth_open = np.clip(mouth_open, 0.0, 1.0)
    mouth_width = 1.0 + np.clip(width, -0.3, 0.2)

    # Blinks: fast close, slower open (~0.25 s total).
    closure = np.zeros(num_frames)
    for tb in _events(rng, u(0.25, 1.0), -0.3, dur_s):
        close, hold, opening = u(0.05, 0.09), u(0.0, 0.05), u(0.1, 0.18)
        x = t - tb
        c = np.where(x < 0, 0.0, np.where(x < close, x / close, np.where(
            x < close + hold, 1.0, 1.0 - (x - close - hold) / opening)))
        closure = np.maximum(closure, np.clip(c, 0.0, 1.0))
    eye_open = u(0.8, 1.0) * (1.0 - closure)

    brow = 0.15 * mouth_open * u(0, 1)
    for tb in _events(rng, u(0.1, 0.8), -1.0, dur_s):
        brow += u(0.4, 1.0) * _bump(t, tb, u(0.4, 1.2))
    brow_raise = np.clip(brow, 0.0, 1.0)

    gaze_x = np.clip(u(-0.4, 0.4) + 0.35 * _smooth_noise(rng, t, 0.2, 1.5), -1, 1)
    gaze_y = np.clip(u(-0.3, 0.3) + 0.25 * _smooth_noise(rng, t, 0.2, 1.5), -1, 1)

    return {
        "mouth_open": mouth_open, "mouth_width": mouth_width, "eye_open": eye_open,
        "brow_raise": brow_raise, "gaze_x": gaze_x, "gaze_y": gaze_y,
        "tx": u(-0.04, 0.04) + 0.02 * _smooth_noise(rng, t),
        "ty": u(-0.03, 0.03) + 0.015 * _smooth_noise(rng, t),
        "roll": u(-0.12, 0.12) + 0.06 * _smooth_noise(rng, t),
        "yaw": np.clip(u(-0.35, 0.35) + 0.15 * _smooth_noise(rng, t), -0.55, 0.55),
        "scale": u(0.92, 1.08) * (1.0 + 0.03 * _smooth_noise(rng, t)),
    }


# ----------------------------------------------------------------------------------------------
# Geometry: canonical (F, N, 3) point sets
# ----------------------------------------------------------------------------------------------


def _xyz(x, y, z) -> np.ndarray:
    """Broadcast x, y, z to a common (F, N) shape and stack -> (F, N, 3)."""
    x, y, z = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64), np.asarray(z, np.float64))
    return np.stack([x, y, z], axis=-1)


def _ellipse(cx, cy, rx, ry, n: int, start: float = 0.0, stop: float = 2 * np.pi) -> tuple[np.ndarray, np.ndarray]:
    th = np.linspace(start, stop, n, endpoint=stop - start < 2 * np.pi - 1e-9)
    return cx + rx * np.cos(th), cy + ry * np.sin(th)


class _Geometry:
    """Builds every shape of one clip in canonical coordinates, vectorised over frames."""

    def __init__(self, idn: Identity, m: dict[str, np.ndarray]):
        self.idn = idn
        self.F = len(m["mouth_open"])
        self.m = m
        self.head: dict[str, np.ndarray] = {}   # name -> (F or 1, N, 3), head frame
        self.body: dict[str, np.ndarray] = {}   # name -> (N, 2), body frame (no roll/yaw)
        self.flags: dict[str, np.ndarray] = {}  # name -> (F,) bool, shapes drawn only on some frames
        self.lmk = np.zeros((self.F, NUM_LANDMARKS, 3))

    def surface_z(self, x):
        a = self.idn.face_w
        return self.idn.depth * np.sqrt(np.clip(1.0 - (np.asarray(x) / a) ** 2, 0.0, 1.0))

    def build(self) -> _Geometry:
        self._face()
        self._eyes()
        self._brows()
        self._nose()
        self._mouth()
        self._hair()
        self._body()
        self._accessories()
        return self

    # -- face outline, ears ---------------------------------------------------------------
    def _face(self):
        idn, m = self.idn, self.m
        a = idn.face_w
        o = m["mouth_open"][:, None] * idn.max_open
        phi = np.linspace(-np.pi / 2, np.pi / 2, 33)
        s, c = np.sin(phi), np.abs(np.cos(phi))
        p = 2.0 / idn.jaw_n
        x = a * np.sign(s) * np.abs(s) ** p * (1.0 - idn.jaw_taper * c ** 1.5)
        # The jaw drops with the mouth (lower lip moves 0.72 o, chin ~0.6 o), most at the chin.
        y = idn.chin * c ** p + 0.6 * o * c ** 2
        jaw = _xyz(x[None], y, idn.depth * 0.8 * c[None] ** 2)
        self.head["jaw"] = jaw
        self.lmk[:, 0:17] = jaw[:, ::2]
        th = np.linspace(0, np.pi, 25)[1:-1]
        top = _xyz((a * np.cos(th))[None], (-idn.face_up * np.sin(th))[None], 0.0)
        top = np.broadcast_to(top, (self.F, *top.shape[1:]))
        self.head["face"] = np.concatenate([jaw, top], axis=1)
        for side, name in ((-1, "ear_r"), (1, "ear_l")):
            ex, ey = _ellipse(side * a * 0.97, idn.eye_y + 0.22, 0.13, 0.26, 16)
            self.head[name] = _xyz(ex[None], ey[None], np.full((1, 16), -0.25))
            ix, iy = _ellipse(side * a * 0.99, idn.eye_y + 0.22, 0.06, 0.15, 9,
                              np.pi / 2 - side * np.pi / 2 - 1.2, np.pi / 2 - side * np.pi / 2 + 1.2)
            self.head[name + "_in"] = _xyz(ix[None], iy[None], np.full((1, 9), -0.25))
        for side, name in ((-1, "blush_r"), (1, "blush_l")):
            bx, by = _ellipse(side * a * 0.55, idn.eye_y + 0.42, 0.15, 0.1, 12)
            self.head[name] = _xyz(bx, by, self.surface_z(bx))[None]

    # -- eyes ------------------------------------------------------------------------------
    def _lids(self, u, side: int, e):
        """Upper and lower lid y at eye parameter u in [-1, 1] (image left -> right); e (F, 1) openness."""
        idn = self.idn
        u = np.clip(u, -1.0, 1.0)
        y0 = idn.eye_y - idn.eye_tilt * u * side
        gu = (1.0 - u ** 2) ** 0.8 * (1.0 - 0.15 * u * side)
        gl = (1.0 - u ** 2) ** 0.9
        closed = y0 + 0.25 * idn.eye_low * gl
        upper = closed + (y0 - idn.eye_h * gu - closed) * e
        lower = closed + (y0 + idn.eye_low * gl - closed) * e
        return upper, lower

    def _clipped_disc(self, side, e, cx, cy, r, n=12):
        """A disc of radius r at (cx, cy) (F, 1) clipped to the eye opening -> (F, 2n, 2) x/y."""
        idn = self.idn
        ex = side * idn.eye_sep
        lo = np.maximum(cx - r, ex - idn.eye_w)
        hi = np.minimum(cx + r, ex + idn.eye_w)
        xs = lo + (hi - lo) * np.linspace(0, 1, n)[None]
        half = np.sqrt(np.clip(r ** 2 - (xs - cx) ** 2, 0.0, None))
        up, low = self._lids((xs - ex) / idn.eye_w, side, e)
        top = np.maximum(cy - half, up)
        bot = np.maximum(np.minimum(cy + half, low), top)
        x = np.concatenate([xs, xs[:, ::-1]], 1)
        y = np.concatenate([top, bot[:, ::-1]], 1)
        return x, y

    def _eyes(self):
        idn, m = self.idn, self.m
        e = m["eye_open"][:, None]
        u = np.linspace(-1, 1, 13)
        for side, name, lm0 in ((-1, "eye_r", 36), (1, "eye_l", 42)):
            ex = side * idn.eye_sep
            up, low = self._lids(u[None], side, e)
            x = np.broadcast_to(ex + idn.eye_w * u, up.shape)
            z = self.surface_z(x)
            upper = _xyz(x, up, z)
            lower = _xyz(x, low, z)
            self.head[name] = np.concatenate([upper, lower[:, 11:0:-1]], axis=1)
            self.head[name + "_lid"] = upper
            # iBUG order for both eyes: left corner, upper 1/3, upper 2/3, right corner, lower 2/3, lower 1/3.
            self.lmk[:, lm0:lm0 + 6] = np.stack(
                [upper[:, 0], upper[:, 4], upper[:, 8], upper[:, 12], lower[:, 8], lower[:, 4]], axis=1)
            icx = ex + m["gaze_x"][:, None] * idn.eye_w * 0.4
            icy = idn.eye_y - 0.2 * idn.eye_h + m["gaze_y"][:, None] * idn.eye_h * 0.25
            for part, r in (("iris", idn.iris_r), ("pupil", idn.iris_r * 0.45)):
                px, py = self._clipped_disc(side, e, icx, icy, r)
                self.head[f"{name}_{part}"] = _xyz(px, py, self.surface_z(px) + 0.02)
            # Catchlight, drawn only where it fits between the lids.
            gx, gy, gr = icx + 0.35 * idn.iris_r, icy - 0.35 * idn.iris_r, 0.2 * idn.iris_r
            cx, cy = _ellipse(0.0, 0.0, 1.0, 1.0, 8)
            hx, hy = gx + gr * cx[None], gy + gr * cy[None]
            self.head[name + "_glint"] = _xyz(hx, hy, self.surface_z(hx) + 0.03)
            gu_, gl_ = self._lids((gx[:, 0] - ex) / idn.eye_w, side, e[:, 0])
            self.flags[name + "_glint"] = (gy[:, 0] - gr > gu_) & (gy[:, 0] + gr < gl_)

    # -- brows -----------------------------------------------------------------------------
    def _brows(self):
        idn = self.idn
        raise_ = self.m["brow_raise"][:, None]
        t = np.linspace(0, 1, 9)[None]
        for side, name, lm0 in ((-1, "brow_r", 17), (1, "brow_l", 22)):
            x = side * (idn.brow_in + idn.brow_len * t)
            tt = t ** 1.3
            y = idn.brow_y - idn.brow_arch * 4 * tt * (1 - tt) + 0.03 * t - raise_ * (0.09 + 0.03 * (1 - t))
            th = idn.brow_thick * (1.0 - 0.55 * t)
            x = np.broadcast_to(x, y.shape)
            z = self.surface_z(x)
            centre = _xyz(x, y, z)
            poly = np.concatenate([_xyz(x, y - th / 2, z), _xyz(x, y + th / 2, z)[:, ::-1]], axis=1)
            self.head[name] = poly
            pts = centre[:, ::2]
            self.lmk[:, lm0:lm0 + 5] = pts[:, ::-1] if side < 0 else pts  # image left -> right

    # -- nose ------------------------------------------------------------------------------
    def _nose(self):
        idn = self.idn
        d = idn.depth
        t = np.linspace(0, 1, 4)
        bridge = _xyz(np.zeros(4), idn.eye_y - 0.02 + (idn.nose_tip_y - idn.eye_y + 0.02) * t,
                      d + idn.nose_depth * t ** 1.5)[None]
        self.lmk[:, 27:31] = bridge
        bx = idn.nose_w * np.array([-1, -0.5, 0, 0.5, 1])
        by = idn.nose_base_y + np.array([-0.02, 0.02, 0.035, 0.02, -0.02])
        bz = d + idn.nose_depth * np.array([0.25, 0.45, 0.55, 0.45, 0.25])
        self.lmk[:, 31:36] = _xyz(bx, by, bz)[None]
        # Drawn base: the landmark curve extended up the nostril wings.
        wing = idn.nose_base_y - 0.1
        cx = np.concatenate([[-idn.nose_w * 1.1], bx, [idn.nose_w * 1.1]])
        cy = np.concatenate([[wing], by, [wing]])
        cz = np.concatenate([[d + 0.1], bz, [d + 0.1]])
        self.head["nose_base"] = _xyz(cx, cy, cz)[None]
        sx = -0.06 * np.sign(idn.light or 1.0)
        self.head["nose_bridge"] = _xyz(np.full(4, sx), bridge[0, :, 1] + np.array([0.1, 0.05, 0, -0.05]),
                                        bridge[0, :, 2])[None]
        for side, name in ((-1, "nostril_r"), (1, "nostril_l")):
            nx, ny = _ellipse(side * idn.nose_w * 0.5, idn.nose_base_y - 0.005, 0.045, 0.022, 10)
            self.head[name] = _xyz(nx, ny, d + idn.nose_depth * 0.4)[None]
        hx, hy = _ellipse(0.0, idn.nose_tip_y - 0.02, 0.05, 0.035, 10)
        self.head["nose_tip"] = _xyz(hx, hy, d + idn.nose_depth)[None]

    # -- mouth -----------------------------------------------------------------------------
    def _mouth(self):
        idn, m = self.idn, self.m
        o = m["mouth_open"][:, None] * idn.max_open
        mw = idn.mouth_w * m["mouth_width"][:, None]
        u = np.linspace(-1, 1, 13)[None]

        def yc(xn):  # lip-corner line at normalised x (corners lifted by `smile`)
            return idn.mouth_y - idn.smile * xn ** 2

        # Inner lip edges span 0.9 of the mouth width; the gap opens 28% upwards, 72% with the jaw.
        ui = 0.9 * u
        gi = (1.0 - u ** 2) ** 0.8
        xi = mw * ui
        up_in = yc(ui) - 0.28 * o * gi
        lo_in = yc(ui) + 0.72 * o * gi
        # Outer edges at the same x follow the gap there, plus the lip thickness.
        g_at = (1.0 - np.clip((u / 0.9) ** 2, 0, 1)) ** 0.8
        bow = np.sqrt(1.0 - u ** 2) * (1.0 - 0.3 * np.exp(-(u / 0.2) ** 2))  # Cupid's bow dip
        xo = mw * u
        up_out = yc(u) - 0.28 * o * g_at - idn.lip_up * bow
        lo_out = yc(u) + 0.72 * o * g_at + idn.lip_low * (1.0 - u ** 2) ** 0.6
        zi, zo = self.surface_z(xi), self.surface_z(xo)
        upper_o, lower_o = _xyz(xo, up_out, zo), _xyz(xo, lo_out, zo)
        upper_i, lower_i = _xyz(xi, up_in, zi), _xyz(xi, lo_in, zi)
        self.head["lips"] = np.concatenate([upper_o, lower_o[:, 11:0:-1]], axis=1)
        self.head["mouth_in"] = np.concatenate([upper_i, lower_i[:, 11:0:-1]], axis=1)
        self.head["lip_line"] = upper_i
        self.lmk[:, 48:60] = np.concatenate([upper_o[:, 0:13:2], lower_o[:, 10:1:-2]], axis=1)
        self.lmk[:, 60:68] = np.concatenate([upper_i[:, [0, 3, 6, 9, 12]], lower_i[:, [9, 6, 3]]], axis=1)
        # Teeth hang from the upper inner edge, tongue rests on the lower; both stay inside the gap.
        ut = np.linspace(-0.8, 0.8, 9)[None]
        gt = (1.0 - ut ** 2) ** 0.8
        top = yc(0.9 * ut) - 0.28 * o * gt
        gap = o * gt
        bot = top + np.minimum(0.04, 0.3 * gap)
        xt = mw * 0.9 * ut
        self.head["teeth"] = np.concatenate([_xyz(xt, top, self.surface_z(xt)),
                                             _xyz(xt, bot, self.surface_z(xt))[:, ::-1]], axis=1)
        tl_ = yc(0.9 * ut) + 0.72 * o * gt
        self.head["tongue"] = np.concatenate([_xyz(xt * 0.8, tl_ - 0.25 * gap, self.surface_z(xt)),
                                              _xyz(xt * 0.8, tl_, self.surface_z(xt))[:, ::-1]], axis=1)
        self.flags["teeth"] = m["mouth_open"] > 0.15
        self.flags["tongue"] = m["mouth_open"] > 0.35
        self._mouth_info = (mw, yc, up_out, lo_out, u)

    # -- hair --------------------------------------------------------------------------------
    def _hair(self):
        idn = self.idn
        a, up, ht = idn.face_w, idn.face_up, idn.hair_thick
        style = idn.hair_style
        brow_top = idn.brow_y - idn.brow_arch - idn.brow_thick - 0.12 - 0.08  # fully raised brow + margin
        hairline = idn.hairline_y
        side_y = -0.05
        if style in ("fringe", "bob"):
            hairline = min(-0.5, brow_top - 0.02)
        if style == "afro":
            ht *= 1.5
        # Outer arc over the crown, left -> right.
        th = np.linspace(np.pi, 0, 31)
        r = np.ones_like(th)
        if style == "spiky":
            saw = np.abs(((th * 7 / np.pi) % 1.0) - 0.5) * 2  # triangle wave, 7 spikes
            r = 1.0 + 0.12 * saw * np.sin(th) ** 2
        ox = (a + ht) * np.cos(th) * r
        oy = -(up + ht) * np.sin(th) * r
        # Hairline right -> left: high at the temples' top, lowest mid-forehead, lifted at the parting.
        xs = np.linspace(a * 0.97, -a * 0.97, 21)
        expo = 4.0 if style in ("fringe", "bob") else 2.2
        temple = -0.3
        hy = hairline + (temple - hairline) * (np.abs(xs) / a) ** expo
        if style in ("fringe", "bob"):
            hy = hy + 0.025 * (np.arange(21) % 2)  # choppy fringe ends
        else:
            hy = hy - 0.08 * np.exp(-((xs - idn.parting * a) / 0.12) ** 2)
        # Never cover a (fully raised) brow: the image must show what the brow landmarks say.
        over_brow = np.abs(xs) < idn.brow_in + idn.brow_len + 0.08
        hy = np.where(over_brow, np.minimum(hy, brow_top - 0.02), hy)
        cap_x = np.concatenate([[-(a + ht * 0.5)], ox, [a + ht * 0.5, a * 0.97], xs, [-a * 0.97]])
        cap_y = np.concatenate([[side_y], oy, [side_y, side_y], hy, [side_y]])
        cap_z = np.concatenate([np.zeros(33), [0.0], self.surface_z(xs) * 0.9, [0.0]])
        if style != "bald":
            self.head["hair_cap"] = _xyz(cap_x, cap_y, cap_z)[None]
            # Strands: a few arcs from the parting towards the sides, darker.
            for k, frac in enumerate((-0.75, -0.4, 0.4, 0.75)):
                tt = np.linspace(0, 1, 7)
                sx = idn.parting * a * (1 - tt) + frac * a * tt
                sy = (-(up + ht * 0.5) * (1 - tt) + (hairline - 0.05 + 0.1 * abs(frac)) * tt
                      - 0.08 * np.sin(np.pi * tt))
                self.head[f"strand{k}"] = _xyz(sx, sy, self.surface_z(sx) * 0.5)[None]
        else:
            for side, name in ((-1, "side_hair_r"), (1, "side_hair_l")):
                sx = side * np.array([a * 0.96, a + 0.07, a + 0.08, a * 0.98])
                sy = np.array([-0.45, -0.42, 0.0, 0.02])
                self.head[name] = _xyz(sx, sy, 0.0)[None]
        # Behind the head.
        if style in ("long", "bob"):
            w = a + (0.3 if style == "long" else 0.24)
            length = idn.hair_len if style == "long" else 0.95 + 0.3 * (idn.hair_len - 1.8) / 1.2
            bth = np.linspace(np.pi, 0, 21)
            bx = w * np.cos(bth)
            by = -(up + ht + 0.04) * np.sin(bth)
            back_x = np.concatenate([[-w * 1.08, -w], bx, [w, w * 1.08, w * 0.6, 0, -w * 0.6]])
            back_y = np.concatenate([[length, 0.2], by, [0.2, length, length + 0.1, length + 0.15, length + 0.1]])
            self.head["hair_back"] = _xyz(back_x, back_y, -0.4)[None]
        elif style == "afro":
            bth = np.linspace(0, 2 * np.pi, 48, endpoint=False)
            rr = (a + 0.55) * (1.0 + 0.05 * np.sin(9 * bth + idn.parting * 10))
            self.head["hair_back"] = _xyz(rr * np.cos(bth), -0.45 + rr * 0.95 * np.sin(bth), -0.4)[None]
        elif style == "bun":
            bx, by = _ellipse(0.0, -up - ht - 0.18, 0.36, 0.3, 20)
            self.head["hair_back"] = _xyz(bx, by, -0.4)[None]

    # -- neck and body ------------------------------------------------------------------------
    def _body(self):
        idn = self.idn
        nw = idn.face_w * 0.42
        self.head["neck_top"] = _xyz(np.array([-nw, nw]), np.array([0.6, 0.6]), 0.0)[None]
        self.body["neck_bottom"] = np.array([[nw * 1.1, 2.0], [-nw * 1.1, 2.0]])
        neck = {"crew": [(-0.55, 1.55), (-0.3, 1.68), (0.0, 1.72), (0.3, 1.68), (0.55, 1.55)],
                "v": [(-0.5, 1.5), (-0.25, 1.75), (0.0, 2.0), (0.25, 1.75), (0.5, 1.5)],
                "round": [(-0.6, 1.55), (-0.35, 1.85), (0.0, 1.95), (0.35, 1.85), (0.6, 1.55)]}[idn.neckline]
        pts = [(-3.4, 5.0), (-3.2, 2.5), (-2.6, 1.85), (-1.6, 1.55), *neck, (1.6, 1.55), (2.6, 1.85),
               (3.2, 2.5), (3.4, 5.0)]
        self.body["clothes"] = np.array(pts, np.float64)
        self.body["clothes_shadow"] = np.array([(-3.4, 5.0), (-3.2, 2.5), (-2.6, 1.85), (-2.2, 5.0)], np.float64) \
            * np.array([-np.sign(idn.light or 1.0), 1.0])

    # -- accessories ---------------------------------------------------------------------------
    def _accessories(self):
        idn = self.idn
        a = idn.face_w
        if idn.glasses != "none":
            n = 24
            th = np.linspace(0, 2 * np.pi, n, endpoint=False)
            p = 0.5 if idn.glasses == "square" else 1.0  # superellipse exponent 2/p
            rx, ry = idn.eye_w * 1.5, max(idn.eye_h, 0.07) * 2.0
            cy = idn.eye_y - 0.01
            for side, name in ((-1, "glasses_r"), (1, "glasses_l")):
                cx = side * idn.eye_sep
                gx = cx + rx * np.sign(np.cos(th)) * np.abs(np.cos(th)) ** p
                gy = cy + ry * np.sign(np.sin(th)) * np.abs(np.sin(th)) ** p
                self.head[name] = _xyz(gx, gy, self.surface_z(gx) + 0.08)[None]
            inner = idn.eye_sep - rx
            bx = np.linspace(-inner, inner, 5)
            self.head["glasses_bridge"] = _xyz(bx, cy - 0.02 - 0.03 * np.cos(bx / inner * np.pi / 2),
                                               self.surface_z(bx) + 0.08)[None]
            for side, name in ((-1, "temple_r"), (1, "temple_l")):
                tx = side * np.array([idn.eye_sep + rx, a * 0.98])
                self.head[name] = _xyz(tx, np.array([cy - 0.02, cy + 0.02]), self.surface_z(tx) + 0.05)[None]
        if idn.earrings != "none":
            for side, name in ((-1, "earring_r"), (1, "earring_l")):
                r = 0.05 if idn.earrings == "stud" else 0.09
                ex, ey = _ellipse(side * a * 0.97, idn.eye_y + 0.5 + r, r, r, 12)
                self.head[name] = _xyz(ex, ey, -0.25)[None]
        if idn.beard != "none":
            mw, yc, up_out, lo_out, u = self._mouth_info
            jaw = self.head["jaw"]
            chin_lip = lo_out[:, 6:7] + 0.06
            under = np.concatenate([_xyz(mw * 1.45, yc(1.0) + 0.02, self.surface_z(mw * 1.45)),
                                    _xyz(mw * 0.5, chin_lip, self.surface_z(mw * 0.5)),
                                    _xyz(0 * mw, chin_lip + 0.01, self.surface_z(0.0)),
                                    _xyz(-mw * 0.5, chin_lip, self.surface_z(mw * 0.5)),
                                    _xyz(-mw * 1.45, yc(1.0) + 0.02, self.surface_z(mw * 1.45))], axis=1)
            self.head["beard"] = np.concatenate([jaw[:, 6:27], under], axis=1)
            # Moustache between the nose base and the upper lip, never covering the lip.
            xs = mw * 1.1 * u
            top = idn.nose_base_y + 0.06 + 0.06 * u ** 2
            bot = np.maximum(up_out - 0.015, top + 0.02)
            z = self.surface_z(xs)
            self.head["moustache"] = np.concatenate([_xyz(xs, top, z), _xyz(xs, bot, z)[:, ::-1]], axis=1)


# ----------------------------------------------------------------------------------------------
# Transform and rasterisation
# ----------------------------------------------------------------------------------------------


def _head_transform(pts: np.ndarray, m: dict[str, np.ndarray], size: int, idn: Identity) -> np.ndarray:
    """Canonical ``(F, N, 3)`` -> pixel ``(F, N, 2)``: yaw parallax, then roll, scale, translation."""
    yaw, roll = m["yaw"][:, None], m["roll"][:, None]
    x1 = pts[..., 0] * np.cos(yaw) + pts[..., 2] * np.sin(yaw)
    y1 = pts[..., 1]
    s = (size * idn.head_scale * m["scale"])[:, None]
    ox = size * (0.5 + m["tx"])[:, None]
    oy = size * (0.43 + m["ty"])[:, None]
    cr, sr = np.cos(roll), np.sin(roll)
    return np.stack([ox + s * (cr * x1 - sr * y1), oy + s * (sr * x1 + cr * y1)], axis=-1)


def _body_transform(pts: np.ndarray, m: dict[str, np.ndarray], size: int, idn: Identity) -> np.ndarray:
    """Body ``(N, 2)`` -> pixel ``(F, N, 2)``: follows half the head translation, no roll or yaw."""
    s = size * idn.head_scale * float(np.mean(m["scale"]))
    ox = size * (0.5 + 0.5 * m["tx"] + 0.5 * float(np.mean(m["tx"])))[:, None]
    oy = size * (0.43 + 0.5 * m["ty"] + 0.5 * float(np.mean(m["ty"])))[:, None]
    return np.stack([ox + s * pts[None, :, 0], oy + s * pts[None, :, 1]], axis=-1)


def _background(idn: Identity, h: int, w: int) -> np.ndarray:
    """``(h, w, 3)`` uint8 static background (the camera does not move)."""
    c0 = np.asarray(idn.bg_colours[0], np.float32)
    c1 = np.asarray(idn.bg_colours[1], np.float32)
    yy = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]
    xx = ((np.arange(w, dtype=np.float32) + 0.5) / w)[None, :]
    kind = idn.background
    if kind == "flat":
        t = np.zeros((h, w), np.float32)
    elif kind == "vgrad":
        t = np.broadcast_to(yy, (h, w))
    elif kind == "hgrad":
        t = np.broadcast_to(xx, (h, w))
    elif kind == "radial":
        t = np.clip(np.sqrt((xx - 0.5) ** 2 + (yy - 0.4) ** 2) / 0.75, 0, 1)
    elif kind == "stripes":
        ang = idn.bg_param * np.pi
        period = 0.08 + 0.15 * (idn.bg_seed % 7) / 7
        t = (((xx * np.cos(ang) + yy * np.sin(ang)) / period) % 1.0 < 0.5).astype(np.float32) * 0.7
    elif kind == "checker":
        n = 3 + idn.bg_seed % 6
        t = ((np.floor(xx * n) + np.floor(yy * n)) % 2) * 0.6
    else:  # "blobs": smooth value noise, a coarse random grid upsampled bicubically
        g = np.random.default_rng(idn.bg_seed).random((5, 5))
        t = np.asarray(Image.fromarray((g * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32) / 255
    return (c0 + (c1 - c0) * t[..., None]).clip(0, 255).astype(np.uint8)


def _shade(c: Colour, k: float) -> Colour:
    return _clip_colour(np.asarray(c, np.float64) * k)


def _program(geo: _Geometry) -> list[tuple]:
    """The clip's draw list in painter's order: ``(kind, shape, fill, width, flag)``.

    kind: "poly" fills a head-frame polygon, "line" strokes it (width in canonical units, "loop"
    closes it), "body" fills a body-frame polygon. flag: name of a per-frame bool in ``geo.flags``
    (None = every frame). Built once per clip so the per-frame loop only rasterises.
    """
    idn = geo.idn
    skin, hair = idn.skin, idn.hair
    ops: list[tuple] = []
    if "hair_back" in geo.head:
        ops.append(("poly", "hair_back", _shade(hair, 0.8), 0, None))
    ops += [("neck", "neck", _shade(skin, 0.82), 0, None),
            ("body", "clothes", idn.clothes, 0, None),
            ("body", "clothes_shadow", (0, 0, 0, 40), 0, None)]
    for ear in ("ear_r", "ear_l"):
        ops += [("poly", ear, _shade(skin, 0.9), 0, None),
                ("line", ear + "_in", _rgba(_shade(skin, 0.6), 0.6), 0.025, None)]
    if idn.earrings != "none":
        for er in ("earring_r", "earring_l"):
            ops.append(("poly", er, idn.earring_colour, 0, None) if idn.earrings == "stud"
                       else ("loop", er, idn.earring_colour, 0.025, None))
    # Face: darker base, the lit part shifted towards the light, a soft highlight.
    ops += [("poly", "face", _shade(skin, 0.88), 0, None),
            ("poly", "face_lit", skin, 0, None),
            ("poly", "face_highlight", _rgba(_shade(skin, 1.12), 0.35), 0, None)]
    if idn.blush > 0.05:
        ops += [("poly", b, (230, 90, 100, int(255 * idn.blush)), 0, None) for b in ("blush_r", "blush_l")]
    if idn.hair_style == "bald":
        ops += [("poly", sh, hair, 0, None) for sh in ("side_hair_r", "side_hair_l")]
    if idn.beard == "beard":
        ops.append(("poly", "beard", idn.brow, 0, None))
    elif idn.beard == "stubble":
        ops.append(("poly", "beard", _rgba(_shade(idn.brow, 0.8), 0.35), 0, None))
    ops += [("line", "nose_bridge", _rgba(_shade(skin, 0.6), 0.35), 0.04, None),
            ("poly", "nose_tip", _rgba(_shade(skin, 1.15), 0.45), 0, None),
            ("line", "nose_base", _rgba(_shade(skin, 0.55), 0.55), 0.03, None),
            ("poly", "nostril_r", (40, 20, 20, 140), 0, None),
            ("poly", "nostril_l", (40, 20, 20, 140), 0, None)]
    for eye in ("eye_r", "eye_l"):
        ops += [("poly", eye, (236, 232, 226), 0, None),
                ("poly", eye + "_iris", idn.iris, 0, None),
                ("poly", eye + "_pupil", (12, 8, 8), 0, None),
                ("poly", eye + "_glint", (255, 255, 255), 0, eye + "_glint"),
                ("line", eye + "_lid", (35, 22, 20), 0.035, None)]
    ops += [("poly", "brow_r", idn.brow, 0, None), ("poly", "brow_l", idn.brow, 0, None)]
    if idn.beard in ("moustache", "beard"):
        ops.append(("poly", "moustache", idn.brow, 0, None))
    ops += [("poly", "lips", idn.lip, 0, None),
            ("poly", "mouth_in", (48, 14, 20), 0, None),
            ("poly", "teeth", (236, 232, 220), 0, "teeth"),
            ("poly", "tongue", (120, 36, 48), 0, "tongue"),
            ("line", "lip_line", _shade(idn.lip, 0.45), 0.03, None)]
    if idn.hair_style == "buzz":
        ops.append(("poly", "hair_cap", _rgba(hair, 0.6), 0, None))
    elif idn.hair_style != "bald":
        ops.append(("poly", "hair_cap", hair, 0, None))
        ops += [("line", f"strand{k}", _rgba(_shade(hair, 0.6), 0.5), 0.025, None) for k in range(4)]
    if idn.glasses != "none":
        for g in ("glasses_r", "glasses_l"):
            ops += [("poly", g, (200, 220, 240, 30), 0, None), ("loop", g, idn.glasses_colour, 0.035, None)]
        ops += [("line", g, idn.glasses_colour, 0.035, None) for g in ("glasses_bridge", "temple_r", "temple_l")]
    return ops


def _render(geo: _Geometry, size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise all frames. Returns frames ``(F, S, S, 3)`` uint8 and landmarks ``(F, 68, 2)`` float32 px."""
    idn, m, F = geo.idn, geo.m, geo.F
    S = supersample
    names = list(geo.head)
    sizes = [geo.head[n].shape[1] for n in names]
    allpts = np.concatenate([np.broadcast_to(geo.head[n], (F, *geo.head[n].shape[1:])) for n in names]
                            + [geo.lmk], axis=1)
    px = _head_transform(allpts, m, size, idn)
    lmk_px = px[:, -NUM_LANDMARKS:].astype(np.float32)
    # PIL pixel centres sit at integer coordinates: continuous x maps to x * S - 0.5.
    pil = px[:, :-NUM_LANDMARKS] * S - 0.5
    shapes = dict(zip(names, np.split(pil, np.cumsum(sizes)[:-1], axis=1)))
    for n, p in geo.body.items():
        shapes[n] = _body_transform(p, m, size, idn) * S - 0.5
    shapes["neck"] = np.concatenate([shapes["neck_top"], shapes["neck_bottom"]], axis=1)
    # Shading layers are the face outline scaled about its centre and shifted towards the light.
    face = shapes["face"]
    centre = face.mean(1, keepdims=True)
    unit = (size * idn.head_scale * m["scale"] * S)[:, None, None]  # canonical unit in supersampled px
    shift = np.array([np.sign(idn.light) or 1.0, -0.45])[None, None] * 0.07 * unit
    shapes["face_lit"] = (face - centre) * np.array([0.9, 0.95]) + centre + shift
    shapes["face_highlight"] = (face - centre) * np.array([0.55, 0.6]) + centre + 2 * shift
    flat = {n: v.reshape(F, -1).tolist() for n, v in shapes.items()}  # PIL wants flat coordinate lists
    unit = unit[:, 0, 0]

    ops = _program(geo)
    if idn.background in ("stripes", "checker"):  # hard edges: render supersampled for anti-aliasing
        bg = Image.fromarray(_background(idn, size * S, size * S))
    else:  # smooth: render at output size, upsample
        bg = Image.fromarray(_background(idn, size, size)).resize((size * S, size * S), Image.BILINEAR)
    out = np.empty((F, size, size, 3), np.uint8)
    for f in range(F):
        im = bg.copy()
        d = ImageDraw.Draw(im, "RGBA")
        for kind, name, fill, width, flag in ops:
            if flag is not None and not geo.flags[flag][f]:
                continue
            xy = flat[name][f]
            if kind == "line" or kind == "loop":
                if kind == "loop":
                    xy = xy + xy[:2]
                d.line(xy, fill=fill, width=max(1, int(round(width * unit[f]))), joint="curve")
            else:
                d.polygon(xy, fill=fill)
        out[f] = np.asarray(im.reduce(S) if S > 1 else im)
    return out, lmk_px


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _supersample_for(size: int) -> int:
    # 4x keeps 1-px features (64 px eyes) smooth; large images have enough pixels with 2x.
    return 4 if size <= 128 else 2


def generate_clip(identity_seed: int, motion_seed: int, num_frames: int = 16, size: int = 64,
                  fps: float = FPS) -> dict:
    """Render one clip of one identity.

    Args:
        identity_seed: seeds the identity (face, colours, hair, accessories, background).
        motion_seed: seeds the motion (speech, blinks, brows, gaze, head pose).
        num_frames: ``F``.
        size: image side ``S`` (any size; 64 default, 128/256/512 fine).
        fps: frame rate the motion is sampled at.
    Returns:
        dict with ``frames`` ``(F, S, S, 3)`` uint8, ``landmarks`` ``(F, 68, 2)`` float32 pixels,
        ``pose`` ``(F, S, S, 3)`` uint8 (``draw_pose`` of the landmarks), ``identity`` int (= identity_seed),
        ``fps`` float.
    """
    if num_frames < 1:
        raise ValueError(f"need num_frames >= 1, got {num_frames}")
    idn = sample_identity(np.random.default_rng(identity_seed))
    motion = sample_motion(np.random.default_rng(motion_seed), num_frames, fps)
    clip = render_clip(idn, motion, size)
    return {**clip, "identity": int(identity_seed), "fps": float(fps)}


def render_clip(identity: Identity, motion: dict[str, np.ndarray], size: int = 64) -> dict[str, np.ndarray]:
    """Render given identity and motion curves (the keys of ``sample_motion``, each ``(F,)``).

    Useful for controlled probes, e.g. a mouth-opening sweep with everything else fixed.

    Returns:
        ``frames`` ``(F, S, S, 3)`` uint8, ``landmarks`` ``(F, 68, 2)`` float32 px, ``pose`` ``(F, S, S, 3)`` uint8.
    """
    if size < 8:
        raise ValueError(f"need size >= 8, got {size}")
    missing = set(_MOTION_KEYS) - set(motion)
    if missing:
        raise ValueError(f"motion lacks {sorted(missing)}")
    motion = {k: np.atleast_1d(np.asarray(motion[k], np.float64)) for k in _MOTION_KEYS}
    geo = _Geometry(identity, motion).build()
    frames, lmk = _render(geo, size, _supersample_for(size))
    return {"frames": frames, "landmarks": lmk, "pose": draw_pose_sequence(lmk, size)}


def identity_seed_for(seed: int, index: int) -> int:
    """Identity id of the ``index``-th identity of a dataset generated with ``seed`` (63-bit hash),
    so that datasets made with different seeds share no identities."""
    return stable_id("fastportrait/synthetic/identity", seed, index)


def motion_seed_for(seed: int, clip_index: int) -> int:
    return stable_id("fastportrait/synthetic/motion", seed, clip_index)


def plan_dataset(num_clips: int, seed: int = 0, clips_per_identity: int = 4,
                 split_fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[tuple[str, int, int, str]]:
    """``(split, identity_seed, motion_seed, source)`` per clip, in output order.

    Identities are consecutive groups of ``clips_per_identity`` clips; whole identities go to
    "train", then "val", then "test" in ``split_fractions`` proportion, so no identity spans splits.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if clips_per_identity < 1:
        raise ValueError(f"clips_per_identity must be >= 1, got {clips_per_identity}")
    if len(split_fractions) != len(SPLITS):
        raise ValueError(f"split_fractions needs {len(SPLITS)} values {SPLITS}, got {split_fractions}")
    num_ids = -(-num_clips // clips_per_identity)
    bounds = np.cumsum(split_counts(num_ids, split_fractions))
    plan = []
    for clip in range(num_clips):
        k = clip // clips_per_identity
        split = SPLITS[int(np.searchsorted(bounds, k, side="right"))]
        plan.append((split, identity_seed_for(seed, k), motion_seed_for(seed, clip),
                     f"synthetic:seed={seed}:clip={clip}"))
    return plan


def _chunk_job(job: tuple[str, list[tuple[int, int, str]], int, int, str]) -> tuple[str, str, list[int]]:
    """Render a chunk of same-split clips and write them to one Arrow file (runs in a worker)."""
    split, clips, num_frames, size, path = job
    rendered = []
    for ident, motion, source in clips:
        clip = generate_clip(ident, motion, num_frames, size)
        clip["source"] = source
        rendered.append(clip)
    write_arrow_file(path, rendered, clip_features(num_frames, size, size))
    return split, path, [c[0] for c in clips]


def generate_dataset(out_dir: str | os.PathLike, num_clips: int, size: int = 64, num_frames: int = 16, seed: int = 0,
                     clips_per_identity: int = 4, split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
                     workers: int | None = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Generate a synthetic DatasetDict ("train"/"val"/"test", split by identity) at ``out_dir``.

    Workers render chunks of clips and write them straight to Arrow files; the parent only stitches
    the files into a DatasetDict. The write is atomic (built in ``<out_dir>.tmp-*``, then renamed),
    and the output is identical for any ``workers`` (per-clip seeds, fixed order).

    Returns:
        summary dict ``{"splits": {split: {"clips": n, "identities": m}}, "seconds": s, "out": path, ...}``,
        also written to ``<out_dir>/report.json``.
    """
    t0 = time.perf_counter()
    if size < 8 or num_frames < 1:
        raise ValueError(f"need size >= 8 and num_frames >= 1, got {size}, {num_frames}")
    plan = plan_dataset(num_clips, seed, clips_per_identity, split_fractions)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, int(workers))
    # ~8 chunks per worker balance the load; chunks never straddle a split.
    chunk = int(np.clip(num_clips // (8 * workers), 1, 64))
    features = clip_features(num_frames, size, size)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        scratch = tmp / "_scratch"
        scratch.mkdir()
        jobs = []
        i = 0
        while i < num_clips:
            j = i
            while j < num_clips and j - i < chunk and plan[j][0] == plan[i][0]:
                j += 1
            jobs.append((plan[i][0], [p[1:] for p in plan[i:j]], num_frames, size,
                         str(scratch / f"{len(jobs):06d}.arrow")))
            i = j
        files: dict[str, list[str]] = {s: [] for s in SPLITS}
        identities: dict[str, set[int]] = {s: set() for s in SPLITS}
        counts = dict.fromkeys(SPLITS, 0)
        bar = tqdm(total=num_clips, unit="clip", desc="synthetic", disable=not progress)
        pool = None
        if workers == 1 or len(jobs) == 1:
            results = map(_chunk_job, jobs)
        else:
            # fork: workers inherit the imported modules instead of re-importing torch/datasets.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(min(workers, len(jobs)))
            results = pool.imap(_chunk_job, jobs)
        try:
            for split, path, idents in results:
                files[split].append(path)
                identities[split].update(idents)
                counts[split] += len(idents)
                bar.update(len(idents))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            bar.close()
        save_splits(tmp, files, features)
        shutil.rmtree(scratch, ignore_errors=True)
        summary = {
            "splits": {s: {"clips": counts[s], "identities": len(identities[s])} for s in SPLITS},
            "size": size, "num_frames": num_frames, "fps": FPS, "seed": seed,
            "clips_per_identity": clips_per_identity, "split_fractions": list(split_fractions),
            "seconds": round(time.perf_counter() - t0, 3), "out": str(Path(out_dir).absolute()),
        }
        (tmp / "report.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portrait.data.synthetic", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (DatasetDict)")
    parser.add_argument("--clips", type=int, required=True, help="number of clips")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (identities differ across seeds)")
    parser.add_argument("--clips-per-identity", type=int, default=4)
    parser.add_argument("--split", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                        help="identity fractions per split")
    parser.add_argument("--workers", type=int, default=None, help="processes; None = all cores")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.clips < 1:
        parser.error(f"--clips must be >= 1, got {args.clips}")
    if args.size < 8:
        parser.error(f"--size must be >= 8, got {args.size}")
    if args.frames < 1:
        parser.error(f"--frames must be >= 1, got {args.frames}")
    if args.clips_per_identity < 1:
        parser.error(f"--clips-per-identity must be >= 1, got {args.clips_per_identity}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        summary = generate_dataset(args.out, args.clips, args.size, args.frames, args.seed, args.clips_per_identity,
                                   tuple(args.split), args.workers, args.overwrite, progress=True)
    except (FileExistsError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s, v in summary["splits"].items():
        print(f"{s:>5}: {v['clips']:6d} clips, {v['identities']:5d} identities")
    print(f"wrote {summary['out']} ({args.size}x{args.size}, {args.frames} frames) in {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
