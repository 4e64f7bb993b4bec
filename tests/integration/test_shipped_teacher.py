"""The shipped embedded default (portrait/assets/tiny_teacher) loads, is what its card says, and has learned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "portrait" / "assets" / "tiny_teacher"


def test_shipped_teacher_loads_small_and_beats_an_untrained_model():
    from infer.metrics import psnr
    from infer.pipeline import GenerationConfig, Pose2VideoPipeline
    from portrait.data.synthetic import generate_clip
    from portrait.models import Pose2VideoModel

    size = sum(p.stat().st_size for p in SHIPPED.rglob("*.safetensors"))
    assert size < 20 * 2**20  # the budget for shipped weights
    model = Pose2VideoModel.from_pretrained(SHIPPED).eval()
    assert model.metadata.get("storage_dtype") == "float16" and model.dtype == torch.float32
    assert abs(model.config.latent_scale - 0.18215) > 0.05  # fitted to its VAE, not SD's constant
    untrained = Pose2VideoModel.from_config(model.config, seed=0).eval()

    clip = generate_clip(identity_seed=987654321, motion_seed=5, num_frames=4, size=64)  # an identity no split holds
    gt = torch.from_numpy(clip["frames"]).permute(0, 3, 1, 2).float() / 255
    gen = GenerationConfig(steps=4, guidance=1.0)
    scores = []
    for m in (model, untrained):
        out = Pose2VideoPipeline(m)(clip["frames"][0], clip["pose"], gen, torch.Generator().manual_seed(0))
        assert out.shape == gt.shape and torch.isfinite(out).all()
        scores.append(float(psnr(out, gt)))
    assert scores[0] > scores[1] + 5, scores  # an untrained model outputs noise
    assert np.isfinite(scores).all()
