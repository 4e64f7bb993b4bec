"""train/prune.py end to end at a minimal size: prune, 2 KD steps, resume exactly, export a folder infer/ runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_cli import component_weights, run_train_script

REPO = Path(__file__).resolve().parents[2]


def _prune(run_dir, model, data, *overrides, module=False, check=True):
    args = [f"model={model}", f"train.run_dir={run_dir}", f"export_dir={run_dir}/model", f"data.path={data}", "data.generate_clips=0",
            "train.tracker=none", "train.log_every=1", "train.batch_size=1", "num_frames=4", "data.strides=[1]", "train.threads=1",
            "train.lr_warmup_steps=0", "train.lr=1e-4", "importance=magnitude", "target_mac_reduction=0.4", "eval_clips=0",
            "count_frames=2", "count_repeats=1", "train.checkpoint_every=1", *overrides]
    return run_train_script("prune", args, module=module, check=check, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_two_kd_steps_resume_exact_export_and_animate(tmp_path, train_dataset, tiny_model_dir):
    _prune(tmp_path / "a", tiny_model_dir, train_dataset, "train.max_steps=2")
    assert sorted(p.name for p in (tmp_path / "a" / "round-1" / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    r = _prune(tmp_path / "a", tiny_model_dir, train_dataset, "train.max_steps=3")  # the same command, longer: resumes
    assert "resumed from" in r.stderr + r.stdout
    _prune(tmp_path / "b", tiny_model_dir, train_dataset, "train.max_steps=3", module=True)  # fresh, as a module
    a, b = component_weights(tmp_path / "a" / "model"), component_weights(tmp_path / "b" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # prune + resume is exact

    from portrait.models import Pose2VideoModel
    from prune.pruner import describe_widths

    info = json.loads((tmp_path / "a" / "model" / "fastportrait.json").read_text())
    cost = info["metadata"]["pruning"]["cost"]
    assert cost["mac_reduction"] == pytest.approx(0.4, abs=0.03) and cost["params_after"] < cost["params_before"]
    assert info["metadata"]["pruning"]["kd"] is True and info["metadata"]["train_steps"] == 3
    assert (tmp_path / "a" / "model" / "denoising_unet" / "widths.json").is_file()
    card = (tmp_path / "a" / "model" / "README.md").read_text()
    assert "## Pruning" in card and "MACs per UNet evaluation" in card
    pruned, source = Pose2VideoModel.from_pretrained(tmp_path / "a" / "model"), Pose2VideoModel.from_pretrained(tiny_model_dir)
    assert sum(describe_widths(pruned).values()) < sum(describe_widths(source).values())
    metrics = [json.loads(line) for line in (tmp_path / "a" / "round-1" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["prune/round-1/out_kd"]) and "prune/round-1/feat_kd" in m for m in metrics)
    r = _prune(tmp_path / "a", tiny_model_dir, train_dataset, "train.max_steps=3")
    assert "already finished" in r.stderr + r.stdout

    # python -m infer.animate runs the pruned folder
    from PIL import Image

    from infer.io import read_video, write_video

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "ref.png")
    write_video(tmp_path / "pose.mp4", (rng.random((5, 64, 64, 3)) * 255).astype(np.uint8), fps=10)
    out = tmp_path / "out.mp4"
    r = subprocess.run([sys.executable, "-m", "infer.animate", "--model", str(tmp_path / "a" / "model"), "--ref", str(tmp_path / "ref.png"),
                        "--pose", str(tmp_path / "pose.mp4"), "--out", str(out), "--steps", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_video(out)[0].shape == (5, 64, 64, 3)


@pytest.mark.slow
def test_iterative_rounds_without_kd(tmp_path, train_dataset, tiny_model_dir):
    _prune(tmp_path / "r", tiny_model_dir, train_dataset, "train.max_steps=2", "rounds=2", "kd=false")
    reports = json.loads((tmp_path / "r" / "model" / "fastportrait.json").read_text())["metadata"]["pruning"]["round_reports"]
    assert [r["round"] for r in reports] == [1, 2]
    assert reports[0]["mac_reduction"] == pytest.approx(0.2, abs=0.03)  # round k: k/K of the target, from the source
    assert reports[1]["mac_reduction_from_source"] == pytest.approx(0.4, abs=0.03)
    metrics = [json.loads(line) for line in (tmp_path / "r" / "round-2" / "metrics.jsonl").read_text().splitlines()]
    assert all("prune/round-2/out_kd" not in m for m in metrics)  # kd=false: task loss only


def test_bad_config_and_missing_model_are_clear_errors(tmp_path, train_dataset):
    r = _prune(tmp_path / "x", tmp_path / "nope", train_dataset, "train.max_steps=1", check=False)
    assert r.returncode == 1 and "model folder" in r.stderr and "Traceback" not in r.stderr
    r = _prune(tmp_path / "x", tmp_path / "nope", train_dataset, "ratio=1.5", check=False)
    assert r.returncode == 1 and "ratio" in r.stderr and "Traceback" not in r.stderr
