"""The teacher objective's per-timestep weight: AniPortrait's min-SNR-gamma for v-prediction, and its floor."""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import compute_snr

from portrait.objectives import TeacherDiffusionLoss


def test_default_weight_is_min_snr_for_v_prediction_and_zero_at_terminal_step(tiny_model):
    loss = TeacherDiffusionLoss(tiny_model, snr_gamma=5.0)
    t = torch.tensor([0, 100, 500, 900, 999])
    snr = compute_snr(loss.noise_scheduler, t)
    torch.testing.assert_close(loss.loss_weight(t), torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1))
    # zero-terminal SNR (diffusers clamps the last alpha_bar to 2**-24): the last steps get almost no gradient
    assert loss.loss_weight(torch.tensor([999])).item() < 1e-3


def test_floor_lifts_high_noise_steps_only_and_one_means_plain_v_mse(tiny_model):
    t = torch.arange(0, 1000, 37)
    base = TeacherDiffusionLoss(tiny_model, min_weight=0.0).loss_weight(t)
    floored = TeacherDiffusionLoss(tiny_model, min_weight=0.2).loss_weight(t)
    assert torch.all(floored >= 0.2)
    keep = base >= 0.2
    assert keep.any() and (~keep).any()
    torch.testing.assert_close(floored[keep], base[keep])  # the floor leaves mid-SNR steps alone
    assert torch.all(TeacherDiffusionLoss(tiny_model, min_weight=1.0).loss_weight(t) == 1.0)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_floor_out_of_range_is_refused_with_the_key_name(tiny_model, bad):
    with pytest.raises(ValueError, match="objective.min_weight"):
        TeacherDiffusionLoss(tiny_model, min_weight=bad)
