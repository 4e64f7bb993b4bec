"""`python -m infer.animate` end to end on a freshly initialised tiny model, plus its bad-input handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infer.io import read_video, write_video

REPO = Path(__file__).resolve().parents[2]


def _run(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "infer.animate", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture()
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.png"
    Image.fromarray((rng.random((90, 70, 3)) * 255).astype(np.uint8)).save(ref)  # another size: resized
    pose = tmp_path / "pose.mp4"
    write_video(pose, (rng.random((7, 64, 64, 3)) * 255).astype(np.uint8), fps=12)
    return ref, pose


def test_animate_writes_mp4_with_source_fps(tiny_model_dir, inputs, tmp_path):
    ref, pose = inputs
    out = tmp_path / "out" / "video.mp4"
    r = _run("--model", tiny_model_dir, "--ref", ref, "--pose", pose, "--out", out, "--steps", "2", "--seed", "1")
    assert r.returncode == 0, r.stderr
    frames, fps = read_video(out)
    assert frames.shape == (7, 64, 64, 3)
    assert fps == pytest.approx(12.0)


def test_animate_from_pose_folder_and_landmarks(tiny_model_dir, inputs, tmp_path):
    from infer import animate

    ref, _ = inputs
    folder = tmp_path / "poses"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(folder / f"{i:04d}.png")
    out = tmp_path / "a.mp4"
    assert animate.main(["--model", str(tiny_model_dir), "--ref", str(ref), "--pose", str(folder), "--out", str(out), "--steps", "1", "--fps", "10"]) == 0
    frames, fps = read_video(out)
    assert frames.shape[0] == 3 and fps == pytest.approx(10.0)
    from portrait.data.synthetic import generate_clip

    lmk = generate_clip(1, 2, num_frames=5, size=64)["landmarks"]
    np.save(tmp_path / "lmk.npy", lmk)
    out2 = tmp_path / "b.mp4"
    assert animate.main(["--model", str(tiny_model_dir), "--ref", str(ref), "--pose", str(tmp_path / "lmk.npy"), "--out", str(out2), "--steps", "1"]) == 0
    assert read_video(out2)[0].shape[0] == 5


@pytest.mark.parametrize("case", ["missing_ref", "corrupt_ref", "corrupt_pose", "empty_pose", "zero_frames", "wrong_model", "bad_landmarks",
                                  "wrong_decoder"])
def test_bad_inputs_fail_clearly_and_write_nothing(case, tiny_model_dir, inputs, tmp_path):
    from infer import animate

    ref, pose = inputs
    model = tiny_model_dir
    expect = {
        "missing_ref": "image not found", "corrupt_ref": "cannot read image", "corrupt_pose": "cannot decode video",
        "empty_pose": "empty", "zero_frames": "zero frames", "wrong_model": "not a fastportrait model folder",
        "bad_landmarks": "(F, 68, 2)", "wrong_decoder": "is a Pose2Video model folder, not a tiny decoder",
    }[case]
    extra = []
    if case == "missing_ref":
        ref = tmp_path / "nope.png"
    elif case == "corrupt_ref":
        ref = tmp_path / "bad.png"
        ref.write_bytes(b"\x89PNG garbage")
    elif case == "corrupt_pose":
        pose = tmp_path / "bad.mp4"
        pose.write_bytes(np.random.default_rng(0).bytes(5000))
    elif case == "empty_pose":
        pose = tmp_path / "empty.mp4"
        pose.write_bytes(b"")
    elif case == "zero_frames":
        pose = tmp_path / "zero.npy"
        np.save(pose, np.zeros((0, 68, 2), np.float32))
    elif case == "wrong_model":
        model = tmp_path / "not_a_model"
        (model / "unet").mkdir(parents=True)
    elif case == "bad_landmarks":
        pose = tmp_path / "bad.npy"
        np.save(pose, np.zeros((4, 5, 2), np.float32))
    elif case == "wrong_decoder":
        extra = ["--decoder", str(tiny_model_dir)]
    out = tmp_path / "out.mp4"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = animate.main(["--model", str(model), "--ref", str(ref), "--pose", str(pose), "--out", str(out), "--steps", "1", *extra])
    assert code == 2
    assert expect in err.getvalue()
    assert "Traceback" not in err.getvalue()
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_animate_reduced_precision_runs(tiny_model_dir, inputs, tmp_path, dtype):
    from infer import animate

    ref, pose = inputs
    out = tmp_path / f"{dtype}.mp4"
    assert animate.main(["--model", str(tiny_model_dir), "--ref", str(ref), "--pose", str(pose), "--out", str(out), "--steps", "1", "--dtype", dtype]) == 0
    frames, _ = read_video(out)
    assert frames.shape == (7, 64, 64, 3)
