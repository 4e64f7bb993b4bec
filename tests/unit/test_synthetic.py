"""Synthetic talking portraits: determinism, landmark/image agreement, pose drawings, splits, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from portrait.data import landmarks as L
from portrait.data.dataset import load_split
from portrait.data.pose import POSE_COLOURS, draw_pose, draw_pose_sequence
from portrait.data.synthetic import (
    HAIR_STYLES,
    generate_clip,
    generate_dataset,
    main,
    plan_dataset,
    render_clip,
    sample_identity,
    sample_motion,
)

ROOT = Path(__file__).resolve().parents[2]
CAVITY = np.array([48, 14, 20])   # mouth-opening colour of the renderer
SCLERA = np.array([236, 232, 226])
TEETH = np.array([236, 232, 220])
TONGUE = np.array([120, 36, 48])


def _near(img: np.ndarray, colour: np.ndarray, tol: float) -> np.ndarray:
    return np.linalg.norm(img.astype(np.float64) - colour, axis=-1) < tol


def _polygon_mask(points: np.ndarray, size: int, grow: float = 1.0) -> np.ndarray:
    """Pixels whose centre lies in the polygon grown by ``grow`` px (PIL, centres at +0.5)."""
    c = points.mean(0)
    d = points - c
    n = np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
    pts = c + d * (n + grow) / n - 0.5
    im = Image.new("L", (size, size))
    ImageDraw.Draw(im).polygon(pts.ravel().tolist(), fill=1)
    return np.asarray(im, bool)


def test_clip_shapes_dtypes_and_bounds():
    c = generate_clip(1, 2, num_frames=8, size=48)
    assert c["frames"].shape == (8, 48, 48, 3) and c["frames"].dtype == np.uint8
    assert c["pose"].shape == (8, 48, 48, 3) and c["pose"].dtype == np.uint8
    assert c["landmarks"].shape == (8, 68, 2) and c["landmarks"].dtype == np.float32
    assert c["identity"] == 1
    lmk = c["landmarks"]
    assert np.isfinite(lmk).all()
    # Faces are framed inside the picture.
    assert (lmk > 0).all() and (lmk < 48).all()
    # Layout sanity: chin below the eyes, nose between, mouth below the nose, in every frame.
    eyes_y = L.eye_centres(lmk)[..., 1].mean(-1)
    assert (lmk[:, 8, 1] > lmk[:, 57, 1]).all() and (lmk[:, 57, 1] > lmk[:, 33, 1]).all()
    assert (lmk[:, 33, 1] > eyes_y).all() and (eyes_y > lmk[:, 19, 1]).all()
    # The right eye (36-41) is on the image left, as in iBUG.
    assert (lmk[:, 36:42, 0].mean(1) < lmk[:, 42:48, 0].mean(1)).all()


def test_same_seeds_identical_different_seeds_differ():
    a = generate_clip(11, 5, num_frames=6, size=32)
    b = generate_clip(11, 5, num_frames=6, size=32)
    for k in ("frames", "landmarks", "pose"):
        np.testing.assert_array_equal(a[k], b[k])
    other_motion = generate_clip(11, 6, num_frames=6, size=32)
    assert not np.allclose(a["landmarks"], other_motion["landmarks"])
    other_person = generate_clip(12, 5, num_frames=6, size=32)
    assert sample_identity(np.random.default_rng(11)) != sample_identity(np.random.default_rng(12))
    assert np.abs(a["frames"].astype(int) - other_person["frames"].astype(int)).mean() > 10


def test_identities_are_varied():
    ids = [sample_identity(np.random.default_rng(s)) for s in range(200)]
    assert {i.hair_style for i in ids} == set(HAIR_STYLES)
    assert len({i.background for i in ids}) >= 6
    assert any(i.glasses != "none" for i in ids) and any(i.beard != "none" for i in ids)
    skins = np.array([i.skin for i in ids], float).mean(1)
    assert skins.max() - skins.min() > 100  # light to dark


def _still_motion(n: int, **curves) -> dict:
    """Neutral motion of n frames (frontal, eyes open, mouth closed) with some curves overridden."""
    m = {"mouth_open": 0.0, "mouth_width": 1.0, "eye_open": 1.0, "brow_raise": 0.0, "gaze_x": 0.0, "gaze_y": 0.0,
         "tx": 0.0, "ty": 0.0, "roll": 0.0, "yaw": 0.0, "scale": 1.0}
    m.update(curves)
    return {k: np.broadcast_to(np.asarray(v, float), (n,)).copy() for k, v in m.items()}


def _mouth_interior(frame: np.ndarray, lmk: np.ndarray, size: int) -> np.ndarray:
    """Pixels of mouth-interior colour (dark opening, teeth, tongue) inside the mouth box."""
    x0, y0, x1, y1 = L.mouth_box(lmk, size, margin=0.2)
    m = _near(frame, CAVITY, 40) | _near(frame, TEETH, 25) | _near(frame, TONGUE, 25)
    box = np.zeros_like(m)
    box[y0:y1, x0:x1] = True
    return m & box


def test_mouth_sweep_image_matches_landmarks():
    """Controlled sweep of the mouth opening: the image's mouth interior grows with the landmark
    opening, and lies inside the landmarks' inner-lip polygon."""
    size = 128
    sweep = np.linspace(0.0, 1.0, 6)
    for seed in (3, 21, 40):
        idn = sample_identity(np.random.default_rng(seed))
        c = render_clip(idn, _still_motion(6, mouth_open=sweep, yaw=0.2, roll=0.1), size)
        opening = L.mouth_opening(c["landmarks"])
        assert np.all(np.diff(opening) > 0) and opening[0] < 0.01 and opening[-1] > 0.3
        counts, inside = [], []
        for f in range(6):
            interior = _mouth_interior(c["frames"][f], c["landmarks"][f], size)
            counts.append(interior.sum())
            if interior.sum():
                inner = _polygon_mask(c["landmarks"][f, 60:68], size, grow=1.0)
                inside.append((interior & inner).sum() / interior.sum())
        # Closed: at most the dark lip line; then monotone growth.
        assert np.all(np.diff(counts) >= 0) and counts[-1] > 5 * counts[0] + 40, counts
        assert min(inside[1:]) > 0.9, inside


def test_mouth_pixels_follow_landmarks_in_clips():
    """In natural clips the widest-open frame (by landmarks) shows more mouth interior than the most closed."""
    size = 96
    checked = 0
    for ident in range(8):
        c = generate_clip(100 + ident, 200 + ident, num_frames=16, size=size)
        opening = L.mouth_opening(c["landmarks"])
        if opening.max() < 0.2:
            continue
        hi, lo = int(opening.argmax()), int(opening.argmin())
        n_hi = _mouth_interior(c["frames"][hi], c["landmarks"][hi], size).sum()
        n_lo = _mouth_interior(c["frames"][lo], c["landmarks"][lo], size).sum()
        assert n_hi > n_lo + 10, (ident, n_hi, n_lo)
        checked += 1
    assert checked >= 4, "too few talking clips"


def test_blink_visible_in_image():
    """Eye whites shrink with the landmark eye opening (controlled sweep), and a natural blink shows."""
    size = 256

    def white(clip, f):
        lmk = clip["landmarks"][f]
        m = _polygon_mask(lmk[36:42], size, 2.0) | _polygon_mask(lmk[42:48], size, 2.0)
        return (_near(clip["frames"][f], SCLERA, 20) & m).sum()

    for seed in (7, 8):
        idn = sample_identity(np.random.default_rng(seed))
        c = render_clip(idn, _still_motion(4, eye_open=[1.0, 0.6, 0.3, 0.0]), size)
        eo = L.eye_opening(c["landmarks"])
        assert np.all(np.diff(eo) < 0) and eo[-1] < 0.03
        w = [white(c, f) for f in range(4)]
        assert w[0] > w[1] > w[2] >= w[3] and w[0] > 20 and w[3] <= 2, w
    # A natural blink: find one from the motion model alone, then render that clip.
    for motion in range(100):
        eo = sample_motion(np.random.default_rng(motion), 16)["eye_open"]
        if eo.min() < 0.05 and eo.max() > 0.8:
            break
    else:
        pytest.fail("no blink in 100 clips: blink rate broken")
    c = generate_clip(7, motion, num_frames=16, size=size)
    eo = L.eye_opening(c["landmarks"])
    assert white(c, int(eo.argmax())) > 5 * white(c, int(eo.argmin())) + 3


def test_pose_image_regions_and_alignment():
    c = generate_clip(3, 4, num_frames=4, size=128)
    lmk = c["landmarks"][0]
    thick = draw_pose(lmk, 128, line_width=3)
    for name, colour in POSE_COLOURS.items():
        assert (thick == np.array(colour, np.uint8)).all(-1).sum() > 3, f"{name} colour missing"
    # Default pose of the clip: lines pass through the landmarks, background is black.
    pose = c["pose"][0]
    xi, yi = np.floor(lmk).astype(int).T
    lit = pose[yi, xi].max(-1) > 40
    assert lit.mean() > 0.95
    assert (pose.max(-1) == 0).mean() > 0.8
    np.testing.assert_array_equal(c["pose"], draw_pose_sequence(c["landmarks"], 128))
    # Moving the landmarks moves the drawing (not a fixed template).
    shifted = draw_pose(lmk + np.array([10.0, 0.0]), 128)
    assert not np.array_equal(shifted, pose)
    assert (draw_pose(np.full((68, 2), np.nan), 32) == 0).all()


def test_plan_splits_by_identity_and_seed():
    plan = plan_dataset(100, seed=0, clips_per_identity=4)
    by_split = {s: {p[1] for p in plan if p[0] == s} for s in ("train", "val", "test")}
    assert [len(v) for v in by_split.values()] == [20, 3, 2]
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    other = {p[1] for p in plan_dataset(100, seed=1, clips_per_identity=4)}
    assert not other & {p[1] for p in plan}
    assert len({p[2] for p in plan}) == 100  # every clip its own motion


def test_generate_dataset_splits_and_workers(tmp_path):
    s1 = generate_dataset(tmp_path / "a", num_clips=10, size=32, num_frames=4, clips_per_identity=2, workers=1)
    generate_dataset(tmp_path / "b", num_clips=10, size=32, num_frames=4, clips_per_identity=2, workers=2)
    assert {k: v["clips"] for k, v in s1["splits"].items()} == {"train": 6, "val": 2, "test": 2}
    ids = {}
    for split in ("train", "val", "test"):
        a, b = load_split(tmp_path / "a", split), load_split(tmp_path / "b", split)
        ids[split] = set(a["identity"])
        assert a["identity"] == b["identity"] and a["source"] == b["source"]
        fa = np.asarray(a.with_format("numpy")["frames"])
        fb = np.asarray(b.with_format("numpy")["frames"])
        np.testing.assert_array_equal(fa, fb)  # same data whatever the worker count
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert [len(v) for v in ids.values()] == [3, 1, 1]
    assert not list(tmp_path.glob("*.tmp-*"))  # atomic write left nothing behind
    assert (tmp_path / "a" / "report.json").is_file()


def test_cli_errors(tmp_path, capsys):
    assert _cli_code(["--out", str(tmp_path / "x"), "--clips", "0"]) == 2
    assert "--clips must be >= 1" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    assert main(["--out", str(blocker / "sub"), "--clips", "2", "--size", "16", "--frames", "2"]) == 2
    assert "cannot write" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert main(["--out", str(tmp_path / "full"), "--clips", "2", "--size", "16", "--frames", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


def _cli_code(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return e.code


def test_cli_module_run(tmp_path):
    out = tmp_path / "syn"
    proc = subprocess.run([sys.executable, "-m", "portrait.data.synthetic", "--out", str(out), "--clips", "6",
                           "--size", "16", "--frames", "3", "--workers", "1", "--clips-per-identity", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train:" in proc.stdout and "identities" in proc.stdout
    assert len(load_split(out, "train")) + len(load_split(out, "val")) + len(load_split(out, "test")) == 6
