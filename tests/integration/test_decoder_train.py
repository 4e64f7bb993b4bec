"""train/decoder.py end to end at a minimal size: it exports a folder the pipeline uses, resume is exact, errors are clear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_cli import run_train_script

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _train(run_dir, data, vae_model, *overrides, module=False, check=True):
    args = [f"train.run_dir={run_dir}", f"export_dir={run_dir}/model", f"data.path={data}", "data.generate_clips=0",
            f"vae_model={vae_model}", "train.tracker=none", "train.log_every=1", "train.batch_size=2", "frames_per_clip=2",
            "train.threads=1", "train.lr_schedule=constant", "train.lr_warmup_steps=0", "train.checkpoint_every=2",
            "val_frames=4", *overrides]
    return run_train_script("decoder", args, module=module, check=check, timeout=600)


def test_trains_exports_and_the_pipeline_uses_it(tmp_path, train_dataset, tiny_model_dir, tiny_model):
    from infer.pipeline import Pose2VideoPipeline
    from portrait.models.tiny_decoder import load_tiny_decoder

    _train(tmp_path / "a", train_dataset, tiny_model_dir, "train.max_steps=2")
    dec = load_tiny_decoder(tmp_path / "a" / "model")
    meta = dec.fastportrait
    assert meta["steps"] == 2 and meta["arch"] == "tiny" and meta["vae_model"] == str(tiny_model_dir)
    assert {"val_psnr_tiny_vs_kl", "val_psnr_tiny_vs_frame", "val_psnr_kl_vs_frame"} <= set(meta["metrics"])
    assert "tiny VAE decoder" in (tmp_path / "a" / "model" / "README.md").read_text()
    assert (tmp_path / "a" / "config.yaml").is_file()
    frames = Pose2VideoPipeline(tiny_model, decoder=tmp_path / "a" / "model").decode(torch.randn(1, 4, 2, 16, 16), 16)
    assert frames.shape == (2, 3, 64, 64)


@pytest.mark.slow  # two more subprocess trainings
def test_two_steps_resume_two_steps_equals_four(tmp_path, train_dataset, tiny_model_dir):
    _train(tmp_path / "a", train_dataset, tiny_model_dir, "train.max_steps=2")
    first = load_file(str(tmp_path / "a" / "model" / WEIGHTS))
    assert (tmp_path / "a" / "checkpoints" / "step-0000002" / "COMPLETE").is_file()
    _train(tmp_path / "a", train_dataset, tiny_model_dir, "train.max_steps=4", module=True)  # same command, longer: resumes
    _train(tmp_path / "b", train_dataset, tiny_model_dir, "train.max_steps=4")
    a = load_file(str(tmp_path / "a" / "model" / WEIGHTS))
    b = load_file(str(tmp_path / "b" / "model" / WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(first[k], a[k]) for k in a)  # it trained on after resuming


@pytest.mark.slow  # three subprocess launches, ~35 s
def test_bad_inputs_give_one_line_errors(tmp_path, train_dataset, tiny_model_dir):
    r = _train(tmp_path / "c", train_dataset, tmp_path / "no_such_model", "train.max_steps=1", check=False)
    assert r.returncode == 1 and "model folder not found" in r.stderr
    r = _train(tmp_path / "c", train_dataset, tiny_model_dir, "train.max_steps=1", "arch=taesd", check=False)
    assert r.returncode == 1 and "upsamples 8x but the VAE" in r.stderr
    r = _train(tmp_path / "c", train_dataset, tiny_model_dir, "latent_nois=0.1", check=False)
    assert r.returncode != 0 and "latent_nois" in r.stderr


@pytest.mark.parametrize("name", ["tiny", "taesd_aniportrait"])
def test_config_files_validate(name):
    from portrait import config as config_lib
    from portrait.config_registry import SCHEMAS
    from portrait.models.tiny_decoder import TINY_DECODER_CONFIGS

    cfg = config_lib.load(SCHEMAS["decoder"], REPO / "configs" / "decoder" / f"{name}.yaml")
    assert cfg.arch in TINY_DECODER_CONFIGS and cfg.export_dir == f"runs/decoder/{name}/model"
    assert SCHEMAS["decoder"]().arch == "tiny"  # the schema's default is the CPU default
