"""train/interpolator.py end to end at a minimal size: runs by path and as a module, resume is exact, it exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_cli import run_train_script

REPO = Path(__file__).resolve().parents[2]


def _train(run_dir, data, vae_model, *overrides, module=False, check=True):
    args = [f"train.run_dir={run_dir}", f"export_dir={run_dir}/model", f"data.path={data}", "data.generate_clips=0",
            f"vae_model={vae_model}", "train.tracker=none", "train.log_every=1", "train.batch_size=4", "train.threads=1",
            "train.lr_schedule=constant", "train.lr_warmup_steps=0", "train.checkpoint_every=2", "val_triplets=4", *overrides]
    return run_train_script("interpolator", args, module=module, check=check, timeout=600)


@pytest.mark.slow  # three subprocess trainings, ~60-110 s on a busy 2-core CPU
def test_two_steps_resume_two_steps_equals_four_and_exports(tmp_path, train_dataset, tiny_model_dir):
    from portrait.models.interpolator import FrameInterpolator

    _train(tmp_path / "a", train_dataset, tiny_model_dir, "train.max_steps=2")
    first = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    assert (tmp_path / "a" / "checkpoints" / "step-0000002" / "COMPLETE").is_file()
    _train(tmp_path / "a", train_dataset, tiny_model_dir, "train.max_steps=4", module=True)  # same command, longer: resumes
    _train(tmp_path / "b", train_dataset, tiny_model_dir, "train.max_steps=4")
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(first[k], a[k]) for k in a)  # it trained on after resuming
    net = FrameInterpolator.from_pretrained(tmp_path / "a" / "model")
    assert net.metadata["steps"] == 4 and "val_psnr_landmarks_on" in net.metadata["metrics"]
    card = (tmp_path / "a" / "model" / "README.md").read_text()
    assert "frame interpolator" in card and "keyframes" in card
    assert (tmp_path / "a" / "config.yaml").is_file()


@pytest.mark.slow  # two subprocess launches
def test_bad_inputs_give_one_line_errors(tmp_path, train_dataset):
    r = _train(tmp_path / "c", train_dataset, tmp_path / "no_such_model", "train.max_steps=1", check=False)
    assert r.returncode == 1 and "model folder not found" in r.stderr
    r = _train(tmp_path / "c", train_dataset, tmp_path, "train.max_steps=1", "keyframe_source=vea", check=False)
    assert r.returncode == 1 and "keyframe_source" in r.stderr


@pytest.mark.parametrize("name", ["tiny", "tiny_fast"])
def test_config_file_validates(name):
    from portrait import config as config_lib
    from portrait.config_registry import SCHEMAS
    from portrait.models.interpolator import INTERPOLATOR_CONFIGS

    cfg = config_lib.load(SCHEMAS["interpolator"], REPO / "configs" / "interpolator" / f"{name}.yaml")
    assert cfg.gaps == [2, 3, 4] and cfg.keyframe_source == "vae"
    assert cfg.arch == name and name in INTERPOLATOR_CONFIGS and cfg.export_dir == f"runs/interpolator/{name}/model"
    # the schema's default is the CPU default the benchmark configs and the quickstart use
    assert SCHEMAS["interpolator"]().arch == "tiny_fast"
    with pytest.raises(config_lib.ConfigError, match="unknown config key"):
        config_lib.load(SCHEMAS["interpolator"], REPO / "configs" / "interpolator" / "tiny.yaml", ["loss.nope=1"])
