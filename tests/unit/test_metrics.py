"""Unit tests of infer.metrics: analytic values and the invariances each metric promises."""

import math

import numpy as np
import pytest
import torch

from infer.metrics import (
    PSNR_CAP_DB,
    flicker,
    landmark_error,
    landmark_error_per_frame,
    mouth_psnr,
    psnr,
    psnr_per_frame,
    ssim,
    ssim_per_frame,
    to_video_tensor,
    video_metrics,
)
from portrait.data.landmarks import inter_ocular_distance, mouth_box


def _video(seed=0, frames=4, size=32):
    return torch.rand(frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _face_landmarks(frames=4, size=64, seed=0):
    """A plausible (F, 68, 2) layout: jaw arc, brows, nose, eyes, lips, scaled into the frame."""
    rng = np.random.default_rng(seed)
    t = np.linspace(np.pi, 2 * np.pi, 17)
    jaw = np.stack([0.5 + 0.35 * np.cos(t), 0.45 - 0.4 * np.sin(t)], -1)
    brows = np.stack([np.linspace(0.25, 0.75, 10), np.full(10, 0.3)], -1)
    nose = np.stack([np.full(9, 0.5), np.linspace(0.35, 0.6, 9)], -1)
    eye_ring = np.stack([np.cos(np.linspace(0, 2 * np.pi, 7)[:-1]) * 0.06,
                         np.sin(np.linspace(0, 2 * np.pi, 7)[:-1]) * 0.02], -1)
    eyes = np.concatenate([eye_ring + [0.35, 0.4], eye_ring + [0.65, 0.4]])
    lip_ring = np.stack([np.cos(np.linspace(0, 2 * np.pi, 13)[:-1]) * 0.12,
                         np.sin(np.linspace(0, 2 * np.pi, 13)[:-1]) * 0.04], -1)
    inner = lip_ring[::3][:4].repeat(2, 0) * 0.6
    lips = np.concatenate([lip_ring, inner]) + [0.5, 0.72]
    base = np.concatenate([jaw, brows, nose, eyes, lips]) * size
    assert base.shape == (68, 2)
    jitter = rng.normal(0, 0.5, (frames, 68, 2))
    return (base[None] + jitter).astype(np.float32)


# --- conversion -----------------------------------------------------------------------------------

def test_to_video_tensor_uint8_channels_last():
    u8 = np.random.default_rng(0).integers(0, 256, (3, 8, 9, 3), dtype=np.uint8)
    v = to_video_tensor(u8)
    assert v.shape == (3, 3, 8, 9) and v.dtype == torch.float32
    assert float(v[1, 2, 4, 5]) == pytest.approx(u8[1, 4, 5, 2] / 255.0)
    with pytest.raises(ValueError):
        to_video_tensor(torch.rand(3, 8, 9, 3))  # float must be channels-first


# --- PSNR -----------------------------------------------------------------------------------------

def test_psnr_identical_is_cap():
    v = _video()
    assert psnr(v, v) == PSNR_CAP_DB
    assert psnr(v, v, cap=60.0) == 60.0
    assert torch.all(psnr_per_frame(v, v) == PSNR_CAP_DB)


@pytest.mark.parametrize("offset, expected_db", [(0.1, 20.0), (0.01, 40.0), (0.5, 20 * math.log10(2))])
def test_psnr_constant_offset_analytic(offset, expected_db):
    target = torch.full((3, 3, 16, 16), 0.25)
    assert psnr(target + offset, target) == pytest.approx(expected_db, abs=1e-4)
    assert psnr_per_frame(target + offset, target) == pytest.approx([expected_db] * 3, abs=1e-4)


def test_psnr_pools_mse_over_frames():
    target = torch.zeros(2, 3, 8, 8)
    pred = target.clone()
    pred[1] += 0.1  # frame 0 exact, frame 1 at 20 dB -> pooled MSE 0.005 -> 23.01 dB, not (100 + 20) / 2
    assert psnr(pred, target) == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-4)


def test_psnr_accepts_uint8_and_max_val():
    a = np.full((2, 8, 8, 3), 100, np.uint8)
    b = np.full((2, 8, 8, 3), 110, np.uint8)
    assert psnr(a, b) == pytest.approx(20 * math.log10(255 / 10), abs=1e-4)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(_video(size=16), _video(size=32))


# --- SSIM -----------------------------------------------------------------------------------------

def test_ssim_identical_noise_symmetry():
    v = _video(size=32)
    noisy = lambda s: (v + s * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)  # noqa: E731
    assert ssim(v, v) == pytest.approx(1.0, abs=1e-12)
    s1, s2, s3 = ssim(noisy(0.02), v), ssim(noisy(0.1), v), ssim(noisy(0.3), v)
    assert 1.0 > s1 > s2 > s3
    assert ssim(v, noisy(0.1)) == pytest.approx(s2, abs=1e-12)


def test_ssim_matches_single_window_formula():
    """11x11 frames have one valid window: SSIM is Wang et al. eq. 13 with Gaussian-weighted statistics."""
    rng = np.random.default_rng(3)
    x, y = rng.random((1, 3, 11, 11)), rng.random((1, 3, 11, 11))
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    expected = []
    for c in range(3):
        a, b = x[0, c], y[0, c]
        mx, my = (w * a).sum(), (w * b).sum()
        vx, vy = (w * (a - mx) ** 2).sum(), (w * (b - my) ** 2).sum()
        cxy = (w * (a - mx) * (b - my)).sum()
        expected.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    got = ssim_per_frame(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert got.item() == pytest.approx(np.mean(expected), abs=1e-5)


def test_ssim_rejects_tiny_frames():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(_video(size=8), _video(size=8))


# --- mouth PSNR -----------------------------------------------------------------------------------

def test_mouth_psnr_depends_only_on_the_box():
    size = 64
    lmk = _face_landmarks(frames=3, size=size)
    target = _video(seed=0, frames=3, size=size)
    pred = (target + 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    inside = torch.zeros(3, 1, size, size, dtype=torch.bool)
    for f in range(3):
        x0, y0, x1, y1 = mouth_box(lmk[f], size, 0.25)
        inside[f, :, y0:y1, x0:x1] = True
    assert 0.05 < inside.float().mean() < 0.5  # a real box, neither empty nor the whole frame
    base = mouth_psnr(pred, target, lmk)

    outside_changed = torch.where(inside, pred, torch.rand(pred.shape))
    assert mouth_psnr(outside_changed, target, lmk) == pytest.approx(base, abs=1e-9)
    inside_changed = torch.where(inside, (pred + 0.2).clamp(0, 1), pred)
    assert mouth_psnr(inside_changed, target, lmk) < base - 1.0
    # The box follows the DRIVING landmarks: moving them moves what is scored.
    assert mouth_psnr(outside_changed, target, lmk + np.float32([0, -20])) != pytest.approx(base, abs=0.1)


def test_mouth_psnr_identical_is_cap():
    v = _video(frames=2, size=64)
    assert mouth_psnr(v, v, _face_landmarks(frames=2)) == PSNR_CAP_DB


# --- flicker --------------------------------------------------------------------------------------

def test_flicker_static_and_alternating():
    frame = _video(frames=1, size=16)
    static = frame.expand(6, -1, -1, -1)
    other_static = _video(seed=5, frames=1, size=16).expand(6, -1, -1, -1)
    assert flicker(static, other_static) == 0.0  # wrong but stable: PSNR's problem, not flicker's
    assert flicker(static) == 0.0
    alternating = torch.where(torch.arange(6)[:, None, None, None] % 2 == 0, frame, frame + 0.1)
    assert flicker(alternating, static) == pytest.approx(0.1 * 255, rel=1e-5)
    assert flicker(alternating) == pytest.approx(0.1 * 255, rel=1e-5)


def test_flicker_does_not_count_true_motion():
    moving = _video(frames=5, size=16)
    assert flicker(moving, moving) == 0.0
    assert flicker(moving) > 0.0


def test_flicker_frame_mask_uses_pairs_touching_selected_frames():
    static = _video(frames=1, size=16).expand(7, -1, -1, -1).clone()
    pred = static.clone()
    pred[6] += 0.1  # only the pair (5, 6) differs
    mask = torch.tensor([False, True, False, False, False, False, False])  # pairs (0,1), (1,2)
    assert flicker(pred, static, frame_mask=mask) == 0.0
    mask[5] = True  # adds pairs (4,5) and (5,6): 1 of 4 selected pairs carries 0.1
    assert flicker(pred, static, frame_mask=mask) == pytest.approx(0.1 * 255 / 4, rel=1e-5)


# --- landmark error -------------------------------------------------------------------------------

def test_landmark_error_zero_and_iod_scaling():
    gt = _face_landmarks(frames=3)
    assert landmark_error(gt, gt) == 0.0
    iod = inter_ocular_distance(gt)  # (3,)
    direction = np.float32([0.6, 0.8])  # unit vector
    shifted = gt + (iod[:, None, None] * direction).astype(np.float32)
    assert landmark_error(shifted, gt) == pytest.approx(1.0, abs=1e-5)
    per_frame = landmark_error_per_frame(gt + (0.5 * iod[:, None, None]).astype(np.float32) * [1, 0], gt)
    assert per_frame.shape == (3,)
    assert per_frame.numpy() == pytest.approx([0.5] * 3, abs=1e-5)
    # scale invariance: the same relative error at twice the resolution
    assert landmark_error(2 * shifted, 2 * gt) == pytest.approx(1.0, abs=1e-5)


# --- all together ---------------------------------------------------------------------------------

def test_video_metrics_keys_and_frame_mask():
    lmk = _face_landmarks(frames=4)
    target = _video(frames=4, size=64)
    pred = target.clone()
    pred[2] = (pred[2] + 0.1).clamp(0, 1)
    out = video_metrics(pred, target, lmk)
    assert set(out) == {"psnr_gt", "ssim_gt", "mouth_psnr", "flicker"}
    out = video_metrics(pred, target, lmk, teacher=target)
    assert out["psnr_teacher"] == out["psnr_gt"]
    only_exact = video_metrics(pred, target, lmk, frame_mask=[True, False, False, True])
    assert only_exact["psnr_gt"] == PSNR_CAP_DB and only_exact["ssim_gt"] == pytest.approx(1.0)
    # Flicker still sees the full video: pair (2, 3) touches selected frame 3 and jumps out of frame 2.
    assert only_exact["flicker"] > 0.0
    assert video_metrics(pred, target, lmk, frame_mask=[True, False, False, False])["flicker"] == 0.0
