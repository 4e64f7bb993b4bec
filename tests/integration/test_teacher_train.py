"""train/teacher.py end to end at a minimal size: stages run, resume is exact, NaN stops cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_cli import component_weights, run_train_script

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(train_dataset):
    return train_dataset


def _teacher(run_dir, data, *overrides, module=False, check=True):
    args = [f"train.run_dir={run_dir}", f"export_dir={run_dir}/model", f"data.path={data}", "data.generate_clips=0",
            "train.tracker=none", "train.log_every=1", "sample_steps=2", "vae.batch_size=4", "stage1.batch_size=4",
            "stage2.batch_size=2", "stage2.num_frames=4", "data.strides=[1]", *overrides]
    return run_train_script("teacher", args, module=module, check=check)


def test_vae_and_stage2_run_end_to_end_by_path(tmp_path, dataset):
    _teacher(tmp_path / "run", dataset, "stages=[vae,stage2]", "vae.max_steps=2", "stage2.max_steps=2", "train.checkpoint_every=1")
    from portrait.models import Pose2VideoModel

    model = Pose2VideoModel.from_pretrained(tmp_path / "run" / "model")
    assert model.config.name == "tiny"
    # the vae stage fitted latent_scale = 1 / std of the latents (not SD's 0.18215), and stage 2 kept it
    vae_model = Pose2VideoModel.from_pretrained(tmp_path / "run" / "vae" / "model")
    assert model.config.latent_scale == vae_model.config.latent_scale != 0.18215
    from portrait.data.dataset import ClipDataset
    from portrait.objectives import to_unit

    frames = torch.cat([to_unit(ClipDataset(dataset, "train", num_frames=8)[i]["target"]) for i in range(8)])
    with torch.no_grad():
        z = model.encode_images(frames)
    assert 0.7 < float(z.std()) < 1.4  # unit variance up to the frame sample
    assert (tmp_path / "run" / "stage2" / "samples").is_dir()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "stage2" / "checkpoints").iterdir())
    assert ckpts == ["step-0000001", "step-0000002"]  # keep_checkpoints=2 rotation; no .tmp left
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_stage1_runs_as_module_and_rotates(tmp_path, dataset):
    _teacher(tmp_path / "run", dataset, "stages=[stage1]", "stage1.max_steps=3", "train.checkpoint_every=1",
             "train.keep_checkpoints=1", module=True)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "stage1" / "checkpoints").iterdir())
    assert ckpts == ["step-0000003"]


def test_two_steps_resume_two_steps_equals_four(tmp_path, dataset):
    common = ("stages=[stage1]", "train.checkpoint_every=2", "train.lr_warmup_steps=0")
    _teacher(tmp_path / "a", dataset, *common, "stage1.max_steps=2")
    first = component_weights(tmp_path / "a" / "model")
    _teacher(tmp_path / "a", dataset, *common, "stage1.max_steps=4")  # same command, longer: resumes at step 2
    _teacher(tmp_path / "b", dataset, *common, "stage1.max_steps=4")
    a, b = component_weights(tmp_path / "a" / "model"), component_weights(tmp_path / "b" / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(first[k], a[k]) for k in a)  # it really trained on after resuming
    for comp in ("reference_unet", "pose_guider"):
        ra, rb = component_weights(tmp_path / "a" / "model", comp), component_weights(tmp_path / "b" / "model", comp)
        assert all(torch.equal(ra[k], rb[k]) for k in ra)


def test_nan_loss_stops_clearly_and_keeps_last_good_checkpoint(tmp_path, dataset):
    r = _teacher(tmp_path / "run", dataset, "stages=[stage1]", "stage1.max_steps=30", "stage1.lr=1e30", "train.max_grad_norm=0",
                 "train.checkpoint_every=1", "train.keep_checkpoints=50", check=False)
    assert r.returncode == 1
    assert "non-finite loss" in r.stderr and "last good checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    ckdir = tmp_path / "run" / "stage1" / "checkpoints"
    assert not [p for p in ckdir.iterdir() if p.name.endswith(".tmp")]
    assert not (tmp_path / "run" / "model").exists()
    for ck in ckdir.iterdir():  # every checkpoint on disk holds finite weights
        assert (ck / "COMPLETE").is_file()
        assert all(torch.isfinite(v).all() for v in load_file(str(ck / "model.safetensors")).values() if v.is_floating_point())


@pytest.mark.slow  # ~30 s; the reset itself is covered by test_models.py::test_reset_motion_modules_restores_identity_and_keeps_spatial_layers
def test_stage1_from_a_finished_teacher_resets_its_motion_modules(tmp_path, dataset, tiny_model_dir):
    # continuing stage 1 from a teacher whose motion modules stage 2 trained: they go back to identity
    from portrait.models import Pose2VideoModel
    from portrait.models.unets import motion_modules, motion_modules_are_identity

    trained = Pose2VideoModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for m in motion_modules(trained.denoising_unet):
            m.proj_out.weight.normal_(0, 0.05)
    trained.save_pretrained(tmp_path / "init")
    r = _teacher(tmp_path / "run", dataset, "stages=[stage1]", "stage1.max_steps=1", f"init_from={tmp_path / 'init'}")
    assert "re-initialised" in r.stdout + r.stderr
    out = Pose2VideoModel.from_pretrained(tmp_path / "run" / "model")
    assert motion_modules_are_identity(out.denoising_unet)
