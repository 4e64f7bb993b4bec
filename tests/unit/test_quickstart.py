"""scripts/quickstart.sh (the README's main command): which teacher and interpolator it picks, checked in dry-run mode
(QS_DRY_RUN=1 prints every stage's command instead of running it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _quickstart(tmp_path, **env):
    return subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QS_DRY_RUN": "1", "QS_RUN": str(tmp_path / "qs"), "QS_THREADS": "1", **env})


def test_dry_run_uses_the_shipped_teacher_and_interpolator(tmp_path):
    r = _quickstart(tmp_path, QS_TEACHER="portrait/assets/tiny_teacher")
    assert r.returncode == 0, r.stderr
    assert "tiny teacher: using portrait/assets/tiny_teacher" in r.stdout
    assert "keyframe interpolator: using portrait/assets/tiny_fast_interpolator" in r.stdout
    assert "train/interpolator.py" not in r.stdout  # nothing to train when the interpolator is shipped
    bench = [line for line in r.stdout.splitlines() if "infer.benchmark" in line]
    assert len(bench) == 1 and "interpolator=portrait/assets/tiny_fast_interpolator" in bench[0]
    assert (ROOT / "portrait/assets/tiny_fast_interpolator/config.json").is_file()


def test_an_interpolator_that_is_not_a_folder_stops_the_quickstart(tmp_path):
    r = _quickstart(tmp_path, QS_TEACHER="portrait/assets/tiny_teacher", QS_INTERP=str(tmp_path / "nope"))
    assert r.returncode == 2 and "is not an interpolator folder" in r.stderr


def test_dry_run_uses_the_shipped_decoder_only_with_the_shipped_teacher(tmp_path):
    r = _quickstart(tmp_path, QS_TEACHER="portrait/assets/tiny_teacher")
    assert r.returncode == 0, r.stderr
    assert "tiny VAE decoder: using portrait/assets/tiny_decoder" in r.stdout and "train/decoder.py" not in r.stdout
    bench = [line for line in r.stdout.splitlines() if "infer.benchmark" in line]
    assert "decoder=portrait/assets/tiny_decoder" in "".join(bench)
    # another teacher has another VAE: the shipped decoder would decode its latents wrongly, so a short one is distilled
    other = tmp_path / "teacher"
    other.mkdir()
    (other / "fastportrait.json").write_text("{}")
    r = _quickstart(tmp_path, QS_TEACHER=str(other))
    assert r.returncode == 0, r.stderr
    assert f"train/decoder.py --config configs/decoder/tiny.yaml vae_model={other}" in r.stdout
    assert f"decoder={tmp_path / 'qs' / 'decoder' / 'model'}" in r.stdout
