"""Shared fixtures: tiny models built on the fly (no network, no shipped weights needed)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_tiny_model(seed: int = 0, pose_scale: float = 0.3):
    """A fresh tiny Pose2VideoModel whose pose guider actually contributes.

    A freshly initialised pose guider has a zero ``final_proj`` (upstream init), so every pose test would
    pass trivially; we give it small random weights instead.
    """
    from portrait.models import ModelConfig, Pose2VideoModel

    model = Pose2VideoModel.from_config(ModelConfig(), seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        w = model.pose_guider.final_proj.weight
        w.copy_(torch.randn(w.shape, generator=g) * pose_scale / w.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("models") / "tiny"
    tiny_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory):
    """A minimal synthetic dataset for training smoke tests: 24 clips x 8 frames at 64x64 (2 per identity)."""
    from portrait.data.synthetic import generate_dataset

    path = tmp_path_factory.mktemp("train_data") / "syn"
    generate_dataset(path, 24, size=64, num_frames=8, seed=3, clips_per_identity=2, workers=1)
    return path
