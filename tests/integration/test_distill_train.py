"""train/distill.py end to end at a minimal size: runs, resumes exactly, exports a student that infer/ runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_cli import component_weights, run_train_script

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(train_dataset):
    return train_dataset


def _distill(run_dir, teacher, data, *overrides, module=False, check=True):
    args = [f"teacher={teacher}", f"train.run_dir={run_dir}", f"export_dir={run_dir}/model", f"data.path={data}", "data.generate_clips=0",
            "train.tracker=none", "train.log_every=1", "train.batch_size=2", "num_frames=4", "data.strides=[1]", "teacher_sample_steps=2",
            "train.lr_warmup_steps=0", "train.lr=1e-4", *overrides]
    return run_train_script("distill", args, module=module, check=check, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_lcm_two_steps_resume_one_step_equals_three_and_exports(tmp_path, dataset, tiny_model_dir):
    common = ("train.checkpoint_every=1", "train.threads=1")
    _distill(tmp_path / "a", tiny_model_dir, dataset, *common, "train.max_steps=2")
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    first = component_weights(tmp_path / "a" / "model")
    r = _distill(tmp_path / "a", tiny_model_dir, dataset, *common, "train.max_steps=3")  # same command, longer: resumes
    assert "resumed from" in r.stderr + r.stdout
    _distill(tmp_path / "b", tiny_model_dir, dataset, *common, "train.max_steps=3")
    a, b = component_weights(tmp_path / "a" / "model"), component_weights(tmp_path / "b" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume is exact (EMA target included)
    assert any(not torch.equal(first[k], a[k]) for k in a)
    ta = torch.load(tmp_path / "a" / "checkpoints" / "step-0000003" / "custom_checkpoint_0.pkl")
    tb = torch.load(tmp_path / "b" / "checkpoints" / "step-0000003" / "custom_checkpoint_0.pkl")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (tmp_path / "a" / "samples" / "step-0000003.gif").is_file()

    # the export: a model folder infer/ reads, and plain diffusers reads its UNet
    from diffusers import UNetMotionModel

    from portrait.models import Pose2VideoModel

    student = Pose2VideoModel.from_pretrained(tmp_path / "a" / "model")
    assert student.config.time_cond_proj_dim == 256
    meta = student.metadata
    assert meta["sampler"] == "lcm" and meta["default_steps"] == 4 and meta["sampler_options"]["solver_steps"] == 50
    assert meta["distillation"]["mode"] == "lcm" and meta["distillation"]["guidance_range"] == [2.0, 5.0]
    assert meta["distillation"]["teacher"] == str(tiny_model_dir) and meta["train_steps"] == 3 and "metrics" in meta
    assert UNetMotionModel.from_pretrained(tmp_path / "a" / "model" / "denoising_unet").config.time_cond_proj_dim == 256
    card = (tmp_path / "a" / "model" / "README.md").read_text()
    assert "## Distillation" in card and "--steps 4" in card
    for comp in ("reference_unet", "pose_guider", "vae"):  # the frozen parts are the teacher's, untouched
        t = load_file(str(next((Path(tiny_model_dir) / comp).glob("*.safetensors"))))
        s = load_file(str(next((tmp_path / "a" / "model" / comp).glob("*.safetensors"))))
        assert all(torch.equal(t[k], s[k]) for k in t)

    # python -m infer.animate --model STUDENT --steps 4 --guidance 3.5 uses the folder's sampler
    from PIL import Image

    from infer.io import read_video, write_video

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "ref.png")
    write_video(tmp_path / "pose.mp4", (rng.random((5, 64, 64, 3)) * 255).astype(np.uint8), fps=10)
    out = tmp_path / "out.mp4"
    r = subprocess.run([sys.executable, "-m", "infer.animate", "--model", str(tmp_path / "a" / "model"), "--ref", str(tmp_path / "ref.png"),
                        "--pose", str(tmp_path / "pose.mp4"), "--out", str(out), "--steps", "4", "--guidance", "3.5"],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sampler lcm, 4 steps" in r.stdout
    assert read_video(out)[0].shape == (5, 64, 64, 3)


@pytest.mark.slow
@pytest.mark.parametrize("mode,sampler,steps", [("phased", "phased", 2), ("guidance", "ddim", 25)])
def test_phased_and_guidance_modes_run_as_module(tmp_path, dataset, tiny_model_dir, mode, sampler, steps):
    _distill(tmp_path / "run", tiny_model_dir, dataset, f"mode={mode}", f"num_steps={steps}", "train.max_steps=1", "train.threads=1", module=True)
    info = json.loads((tmp_path / "run" / "model" / "fastportrait.json").read_text())
    assert info["metadata"]["sampler"] == sampler and info["metadata"]["default_steps"] == steps
    assert info["model_config"]["time_cond_proj_dim"] == 256
    r = _distill(tmp_path / "run", tiny_model_dir, dataset, f"mode={mode}", f"num_steps={steps}", "train.max_steps=1", "train.threads=1", module=True)
    assert "already finished" in r.stderr + r.stdout  # re-running a finished command does nothing


def test_missing_teacher_is_a_clear_error(tmp_path, dataset):
    r = _distill(tmp_path / "run", tmp_path / "nope", dataset, "train.max_steps=1", check=False)
    assert r.returncode == 1
    assert "teacher model folder" in r.stderr and "launch.sh teacher" in r.stderr
    assert "Traceback" not in r.stderr
