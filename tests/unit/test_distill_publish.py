"""`python -m portrait.checkpoint.publish`: validates the folder, then refuses clearly without a token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _publish(*args, hf_home):
    env = dict(os.environ, HF_TOKEN="", HF_HOME=str(hf_home), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "portrait.checkpoint.publish", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_publish_without_token_fails_before_any_work(tiny_model_dir, tmp_path):
    r = _publish(tiny_model_dir, "--repo-id", "someone/fastportrait-test", "--private", hf_home=tmp_path / "hf")
    assert r.returncode == 2
    assert "no Hugging Face token" in r.stderr and "hf auth login" in r.stderr and "HF_TOKEN" in r.stderr
    assert "Traceback" not in r.stderr


def test_publish_checks_the_model_folder_first(tmp_path, monkeypatch):
    from portrait.checkpoint import publish

    monkeypatch.setattr(publish, "find_token", lambda: "hf_not_used")  # a token would be there: the folder check still wins
    (tmp_path / "empty").mkdir()
    assert publish.main([str(tmp_path / "empty"), "--repo-id", "a/b"]) == 2
    assert publish.main([str(tmp_path / "missing"), "--repo-id", "a/b"]) == 2
