"""Video folders -> dataset: decoding, precomputed landmarks, skip reports, the mediapipe subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from portrait.data import landmarks_mediapipe as lmp
from portrait.data.dataset import ClipDataset, load_split
from portrait.data.landmarks import inter_ocular_distance
from portrait.data.pose import draw_pose_sequence
from portrait.data.synthetic import generate_clip
from portrait.data.videos import (
    MEDIAPIPE_ENV,
    VideoConfig,
    build_dataset,
    clip_starts,
    decode_video,
    find_videos,
    identity_key,
    main,
)

SIZE = 64


def write_mp4(path: Path, frames: np.ndarray, fps: float = 25) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w = imageio_ffmpeg.write_frames(str(path), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264",
                                    output_params=["-crf", "12"], macro_block_size=1, ffmpeg_log_level="error")
    w.send(None)
    for f in frames:
        w.send(np.ascontiguousarray(f))
    w.close()


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """A folder of real and broken mp4s plus precomputed landmarks (normalised, NaN = no face)."""
    root = tmp_path_factory.mktemp("videos")
    src, lm = root / "src", root / "lm"
    clips = {}
    a = generate_clip(1, 1, num_frames=40, size=SIZE)                 # 2 clips
    b = generate_clip(1, 2, num_frames=20, size=SIZE)                 # same person, 1 clip
    c = generate_clip(2, 3, num_frames=36, size=SIZE)                 # face lost in frames 10-12
    for rel, clip, fps in (("alice/a.mp4", a, 25), ("alice/b.mp4", b, 25), ("carol.mp4", c, 30)):
        write_mp4(src / rel, clip["frames"], fps)
        norm = clip["landmarks"] / SIZE
        if rel == "carol.mp4":
            norm = norm.copy()
            norm[10:13] = np.nan
        (lm / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(lm / Path(rel).with_suffix(".npy"), norm)
        clips[rel] = clip
    write_mp4(src / "faceless.mp4", a["frames"][:20])
    np.save(lm / "faceless.npy", np.full((20, 68, 2), np.nan, np.float32))
    write_mp4(src / "short.mp4", a["frames"][:5])
    np.save(lm / "short.npy", a["landmarks"][:5] / SIZE)
    write_mp4(src / "nolandmarks.mp4", a["frames"][:20])
    (src / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    data = (src / "alice" / "a.mp4").read_bytes()
    (src / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (src / "notes.txt").write_text("not a video")
    return src, lm, clips


@pytest.fixture(scope="module")
def built(video_folder, tmp_path_factory):
    src, lm, clips = video_folder
    out = tmp_path_factory.mktemp("out") / "real"
    report = build_dataset(src, out, VideoConfig(size=SIZE, frames_per_clip=16, landmarks_from=str(lm)),
                           split_fractions=(0.5, 0.5, 0.0), workers=2)
    return out, report, clips


def test_find_videos_and_identities(video_folder):
    src, _, _ = video_folder
    rels = [p.as_posix() for p in find_videos(src)]
    assert "notes.txt" not in rels and "alice/a.mp4" in rels and len(rels) == 8
    assert identity_key(Path("alice/a.mp4")) == identity_key(Path("alice/b.mp4")) == "alice"
    assert identity_key(Path("carol.mp4")) == "carol"


def test_decode_keeps_fps_and_pixels(video_folder):
    src, _, clips = video_folder
    frames, fps = decode_video(src / "carol.mp4", SIZE)
    assert fps == pytest.approx(30.0) and frames.shape == (36, SIZE, SIZE, 3) and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - clips["carol.mp4"]["frames"]).mean() < 4
    small, _ = decode_video(src / "carol.mp4", 32, max_frames=7)
    assert small.shape == (7, 32, 32, 3)


def test_report_lists_every_video(built):
    out, report, _ = built
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["ok_videos"] == report["ok_videos"] == 3
    status = {e["path"]: e for e in on_disk["videos"]}
    assert {p for p, e in status.items() if e["status"] == "ok"} == {"alice/a.mp4", "alice/b.mp4", "carol.mp4"}
    assert "unreadable" in status["corrupt.mp4"]["reason"]
    assert "unreadable" in status["truncated.mp4"]["reason"]
    assert "too short" in status["short.mp4"]["reason"]
    assert "no face" in status["faceless.mp4"]["reason"]
    assert "no landmarks file" in status["nolandmarks.mp4"]["reason"]
    assert status["carol.mp4"]["fps"] == pytest.approx(30.0)
    assert [status[p]["clips"] for p in ("alice/a.mp4", "alice/b.mp4", "carol.mp4")] == [2, 1, 1]


def test_dataset_content_and_identity_split(built):
    out, report, clips = built
    rows = {}
    for split in ("train", "val", "test"):
        ds = load_split(out, split)
        for r in ds.with_format("numpy"):
            rows[str(r["source"])] = (split, r)
    assert len(rows) == 4
    assert rows["video:alice/a.mp4:start=0"][0] == rows["video:alice/b.mp4:start=0"][0]  # one person, one split
    assert rows["video:alice/a.mp4:start=0"][0] != rows["video:carol.mp4:start=13"][0]
    # carol loses her face at frames 10-12, so her only clip starts at 13.
    split, r = rows["video:carol.mp4:start=13"]
    np.testing.assert_allclose(r["landmarks"], clips["carol.mp4"]["landmarks"][13:29], atol=1e-4)
    assert np.abs(r["frames"].astype(int) - clips["carol.mp4"]["frames"][13:29]).mean() < 4
    np.testing.assert_array_equal(r["pose"], draw_pose_sequence(r["landmarks"].astype(np.float32), SIZE))
    assert float(r["fps"]) == pytest.approx(30.0)
    _, r = rows["video:alice/a.mp4:start=16"]
    np.testing.assert_allclose(r["landmarks"], clips["alice/a.mp4"]["landmarks"][16:32], atol=1e-4)
    # The loader reads it like the synthetic data.
    sample = ClipDataset(out, split, num_frames=4, strides=(1, 4))[0]
    assert sample["target"].dtype.itemsize == 1 and sample["target"].shape == (4, 3, SIZE, SIZE)


def test_segmented_decoding_bounds_memory(video_folder, tmp_path):
    """Decoding in 20-frame segments: clips never straddle a segment, offsets stay global."""
    src, lm, clips = video_folder
    only = tmp_path / "src" / "alice"
    only.mkdir(parents=True)
    (only / "a.mp4").write_bytes((src / "alice" / "a.mp4").read_bytes())
    report = build_dataset(tmp_path / "src", tmp_path / "out",
                           VideoConfig(size=SIZE, frames_per_clip=16, landmarks_from=str(lm), segment_frames=20),
                           split_fractions=(1, 0, 0))
    assert report["videos"][0]["clips"] == 2
    rows = {r["source"]: r for r in load_split(tmp_path / "out", "train").with_format("numpy")}
    assert set(rows) == {"video:alice/a.mp4:start=0", "video:alice/a.mp4:start=20"}
    np.testing.assert_allclose(rows["video:alice/a.mp4:start=20"]["landmarks"],
                               clips["alice/a.mp4"]["landmarks"][20:36], atol=1e-4)
    with pytest.raises(ValueError, match="segment_frames"):
        build_dataset(tmp_path / "src", tmp_path / "o2",
                      VideoConfig(frames_per_clip=16, landmarks_from=str(lm), segment_frames=8))


def test_clip_starts():
    v = np.ones(40, bool)
    assert clip_starts(v, 16, 16) == [0, 16]
    assert clip_starts(v, 16, 8) == [0, 8, 16, 24]
    assert clip_starts(v, 16, 16, max_clips=1) == [0]
    v[5] = False
    assert clip_starts(v, 16, 16) == [6, 22]
    assert clip_starts(v[:37], 16, 16) == [6]
    assert clip_starts(np.zeros(40, bool), 4, 4) == []


def test_cli_all_bad_and_missing_landmarks(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.mp4").write_bytes(b"\x00" * 100)
    lm = tmp_path / "lm"
    lm.mkdir()
    code = main(["--src", str(src), "--out", str(tmp_path / "out"), "--landmarks-from", str(lm)])
    err = capsys.readouterr().err
    assert code == 1 and "skipped bad.mp4" in err and "no usable video" in err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped_videos"] == 1
    if not lmp.mediapipe_available():
        monkeypatch.delenv(MEDIAPIPE_ENV, raising=False)
        code = main(["--src", str(src), "--out", str(tmp_path / "out2")])
        assert code == 2 and "--landmarks-from" in capsys.readouterr().err
    assert main(["--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "o3"),
                 "--landmarks-from", str(lm)]) == 2


# ------------------------------------------------------------------------------------------------
# MediaPipe: the index map, the subprocess protocol with a stand-in module, and the real thing.
# ------------------------------------------------------------------------------------------------

FAKE_MEDIAPIPE = textwrap.dedent('''
    """Stand-in for mediapipe: a face (a fixed 468-point grid) in any frame that is not black."""
    import numpy as np
    __version__ = "fake"

    class _Point:
        def __init__(self, x, y):
            self.x, self.y = x, y

    class _Face:
        def __init__(self, pts):
            self.landmark = [_Point(float(x), float(y)) for x, y in pts]

    class _Result:
        def __init__(self, faces):
            self.multi_face_landmarks = faces

    def grid():
        i = np.arange(468)
        return np.stack([(i % 20) / 20 + 0.01, (i // 20) / 25 + 0.01], 1)

    class FaceMesh:
        def __init__(self, **kwargs):
            pass
        def __enter__(self):
            return self
        def __exit__(self, *args):
            return False
        def process(self, frame):
            return _Result(None if frame.mean() < 5 else [_Face(grid())])

    class _NS:
        pass

    solutions = _NS()
    solutions.face_mesh = _NS()
    solutions.face_mesh.FaceMesh = FaceMesh
''')


def _fake_grid() -> np.ndarray:
    i = np.arange(468)
    return np.stack([(i % 20) / 20 + 0.01, (i // 20) / 25 + 0.01], 1)


@pytest.fixture
def fake_mediapipe(tmp_path, monkeypatch):
    pkg = tmp_path / "fakemp" / "mediapipe"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_MEDIAPIPE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fakemp"))
    monkeypatch.syspath_prepend(str(tmp_path / "fakemp"))
    monkeypatch.delitem(sys.modules, "mediapipe", raising=False)
    yield tmp_path / "fakemp"
    # detect() imported the stand-in; drop it so later tests see the real environment.
    if getattr(sys.modules.get("mediapipe"), "__version__", None) == "fake":
        del sys.modules["mediapipe"]


def test_index_map():
    m = np.array(lmp.MEDIAPIPE_TO_IBUG68)
    assert len(m) == 68 and len(set(m.tolist())) == 68 and m.min() >= 0 and m.max() < 468
    # Known anchors: chin, nose tip, the eye-aspect-ratio corners, the lip corners.
    assert m[8] == 152 and m[30] == 1 and (m[36], m[39], m[42], m[45]) == (33, 133, 362, 263)
    assert (m[48], m[54], m[60], m[64]) == (61, 291, 78, 308)
    mesh = np.random.default_rng(0).random((3, 468, 2))
    np.testing.assert_array_equal(lmp.mesh_to_ibug68(mesh), mesh[:, m])


def test_detect_with_stand_in(fake_mediapipe):
    frames = np.full((3, 32, 32, 3), 128, np.uint8)
    frames[1] = 0
    out = lmp.detect(frames)
    assert out.shape == (3, 68, 2) and out.dtype == np.float32
    assert np.isnan(out[1]).all()
    np.testing.assert_allclose(out[0], _fake_grid()[list(lmp.MEDIAPIPE_TO_IBUG68)], atol=1e-6)


def test_subprocess_pipeline_with_stand_in(fake_mediapipe, tmp_path):
    """The whole --mediapipe-python path: preflight, .npy handoff, NaN frames, pixel scaling."""
    src = tmp_path / "src"
    frames = generate_clip(4, 4, num_frames=24, size=SIZE)["frames"].copy()
    frames[:3] = 0  # black: the stand-in finds no face there
    write_mp4(src / "dave.mp4", frames)
    out = tmp_path / "out"
    report = build_dataset(src, out, VideoConfig(size=SIZE, frames_per_clip=16, mediapipe_python=sys.executable,
                                                 detect_size=128), split_fractions=(1, 0, 0))
    entry = report["videos"][0]
    assert entry["status"] == "ok", entry
    assert entry["face_frames"] == 21 and entry["clips"] == 1
    row = load_split(out, "train").with_format("numpy")[0]
    assert row["source"] == "video:dave.mp4:start=3"
    expected = _fake_grid()[list(lmp.MEDIAPIPE_TO_IBUG68)] * SIZE
    np.testing.assert_allclose(row["landmarks"][0], expected, atol=1e-3)
    assert row["frames"].shape == (16, SIZE, SIZE, 3)


def test_mediapipe_check_reports_missing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "portrait.data.landmarks_mediapipe", "--check"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=60)
    assert proc.returncode == (0 if lmp.mediapipe_available() else 3)
    if proc.returncode:
        assert "mediapipe is not installed" in proc.stderr


def _real_mediapipe_python() -> str | None:
    if lmp.mediapipe_available():
        return sys.executable
    py = os.environ.get(MEDIAPIPE_ENV)
    if py and Path(py).exists():
        return py
    return None


@pytest.mark.skipif(_real_mediapipe_python() is None,
                    reason=f"mediapipe is not importable here and ${MEDIAPIPE_ENV} is not set")
def test_real_mediapipe_on_synthetic_face(tmp_path):
    """Real Face Mesh on a 256 px synthetic face: detected, and the mapped points near the true ones."""
    clip = generate_clip(5, 5, num_frames=4, size=256)
    np.save(tmp_path / "f.npy", clip["frames"])
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([_real_mediapipe_python(), "-m", "portrait.data.landmarks_mediapipe", "--frames",
                           str(tmp_path / "f.npy"), "--out", str(tmp_path / "l.npy"), "--static"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lmk = np.load(tmp_path / "l.npy") * 256
    found = np.isfinite(lmk).all(axis=(1, 2))
    assert found.any(), "mediapipe found no face in the synthetic render"
    err = np.linalg.norm(lmk[found] - clip["landmarks"][found], axis=-1).mean(-1)
    assert (err / inter_ocular_distance(clip["landmarks"][found]) < 0.3).all(), err
