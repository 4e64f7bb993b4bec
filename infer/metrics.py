"""Video quality metrics for generated talking portraits.

Every metric is a plain function of videos (DESIGN.md §3.6). The video convention is a float tensor
``(F, 3, H, W)`` in ``[0, 1]``; :func:`to_video_tensor` also accepts the generator's uint8
``(F, H, W, 3)`` arrays, and every public function runs its inputs through it.

Metrics, and what each one is for:

- :func:`psnr` / :func:`psnr_per_frame`: pixel fidelity to the ground truth (or to the teacher).
- :func:`ssim` / :func:`ssim_per_frame`: structural similarity, Wang et al. 2004.
- :func:`mouth_psnr`: PSNR inside a box around the mouth of the DRIVING landmarks; lip sync is where
  students and interpolators fail first, and a whole-frame PSNR hides it under the static background.
- :func:`flicker`: temporal flicker, the error of the frame-to-frame change against the ground truth's.
- :func:`landmark_error`: NME (300W) of predicted landmarks; with the landmark probe
  (``portrait.models.landmark_probe``) it measures whether a generated frame follows its pose.
- :func:`video_metrics`: all of the above in one dict, optionally on a subset of frames.

Example::

    from infer.metrics import video_metrics
    from portrait.models.landmark_probe import load_probe
    m = video_metrics(pred, clip["frames"], clip["landmarks"], probe=load_probe())
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from portrait.data.landmarks import inter_ocular_distance, mouth_box

# PSNR of identical videos is +inf; a finite cap keeps means over clips and JSON reports finite.
# 100 dB is an MSE of 1e-10 at max_val=1, far beyond anything a float32 generator distinguishes.
PSNR_CAP_DB = 100.0

# Mouth-box growth on every side, as a fraction of the outer-lip width (``landmarks.mouth_box``): a
# quarter of the width keeps the lip surroundings (chin, philtrum) that move with speech in the box.
MOUTH_MARGIN = 0.25


def to_video_tensor(video) -> torch.Tensor:
    """Bring a video into the metric convention.

    Args:
        video: one of
            - uint8 ``(F, H, W, 3)`` numpy array or tensor in [0, 255] (the generator's ``frames``);
            - float ``(F, 3, H, W)`` tensor or numpy array in [0, 1].

    Returns:
        float32 tensor ``(F, 3, H, W)`` in [0, 1] on the CPU if the input was numpy, else on the input's
        device, detached. Float inputs are not clamped: a metric must see what the model produced.
    """
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor video, got {type(video).__name__}")
    video = video.detach()
    if video.dim() != 4:
        raise ValueError(f"expected a 4-D video, got shape {tuple(video.shape)}")
    if video.dtype == torch.uint8:
        if video.shape[-1] != 3:
            raise ValueError(f"uint8 videos are (F, H, W, 3); got shape {tuple(video.shape)}")
        return video.permute(0, 3, 1, 2).float().div_(255.0)
    if not video.is_floating_point():
        raise TypeError(f"video must be uint8 or floating point, got {video.dtype}")
    if video.shape[1] != 3:
        raise ValueError(f"float videos are (F, 3, H, W) in [0, 1]; got shape {tuple(video.shape)}")
    return video.float()


def _as_tensor(x) -> torch.Tensor:
    """A numpy array, sequence or tensor as a detached tensor (no copy where possible)."""
    return x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _pair(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert both videos and check they match; returns two ``(F, 3, H, W)`` float tensors."""
    pred, target = to_video_tensor(pred), to_video_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return pred, target.to(pred.device)


def _mse_to_psnr(mse: torch.Tensor, max_val: float, cap: float) -> torch.Tensor:
    """PSNR = 10 log10(max_val^2 / MSE), clamped to ``cap`` (which also covers MSE == 0)."""
    psnr_db = 10.0 * torch.log10(max_val**2 / mse.double())  # MSE 0 -> +inf -> cap
    return psnr_db.clamp(max=cap)


def psnr_per_frame(pred, target, max_val: float = 1.0, cap: float = PSNR_CAP_DB) -> torch.Tensor:
    """PSNR of each frame, in dB.

    Args:
        pred, target: videos ``(F, 3, H, W)`` in [0, 1] (see :func:`to_video_tensor`).
        max_val: peak signal value (1.0 for [0, 1] videos).
        cap: value returned for a frame whose MSE is 0 (and upper bound of every frame).

    Returns:
        float64 tensor ``(F,)``.
    """
    pred, target = _pair(pred, target)
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return _mse_to_psnr(mse, max_val, cap)


def psnr(pred, target, max_val: float = 1.0, cap: float = PSNR_CAP_DB) -> float:
    """PSNR of a whole video, in dB, with the MSE pooled over all frames, pixels and channels.

    Pooling the MSE (rather than averaging per-frame PSNRs) keeps one perfect frame from dominating:
    the mean of per-frame PSNRs is +inf (here: pulled towards ``cap``) as soon as one frame is exact,
    e.g. a keyframe an interpolator copies through.

    Args:
        pred, target: videos ``(F, 3, H, W)`` in [0, 1].
        max_val: peak signal value.
        cap: returned when the MSE is 0, so identical videos give exactly ``cap`` (100 dB by default).

    Returns:
        PSNR in dB; a constant error of 0.1 on [0, 1] gives 20 dB.
    """
    pred, target = _pair(pred, target)
    mse = (pred.double() - target.double()).pow(2).mean()
    return float(_mse_to_psnr(mse, max_val, cap))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised separable Gaussian window, ``(size, size)`` float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_per_frame(
    pred,
    target,
    max_val: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """SSIM of each frame (Wang, Bovik, Sheikh, Simoncelli 2004, "Image quality assessment: from error
    visibility to structural similarity", eq. 13 with the paper's 11x11 Gaussian window, sigma 1.5,
    K1 = 0.01, K2 = 0.03).

    Local statistics are Gaussian-weighted means over 'valid' window positions only (no padding), as in
    the reference MATLAB ``ssim.m``; padding would invent structure at the borders. Each RGB channel is
    scored separately and the SSIM map is averaged over positions and channels.

    Args:
        pred, target: videos ``(F, 3, H, W)`` in [0, 1], with H, W >= ``window_size``.

    Returns:
        float64 tensor ``(F,)``; 1 for identical frames, symmetric in ``pred`` and ``target``.
    """
    pred, target = _pair(pred, target)
    _, channels, height, width = pred.shape
    if height < window_size or width < window_size:
        raise ValueError(f"SSIM needs frames of at least {window_size}x{window_size}; got {height}x{width}")
    # float64: sigma^2 = E[x^2] - mu^2 cancels badly in float32 for flat regions.
    x, y = pred.double(), target.double()
    window = _gaussian_window(window_size, sigma).to(x.device)
    window = window.expand(channels, 1, window_size, window_size)  # depthwise: one window per channel

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def ssim(pred, target, max_val: float = 1.0) -> float:
    """Mean SSIM over frames (see :func:`ssim_per_frame`). ``pred, target``: ``(F, 3, H, W)`` in [0, 1]."""
    return float(ssim_per_frame(pred, target, max_val=max_val).mean())


def _as_landmarks(landmarks, num_frames: int | None = None) -> torch.Tensor:
    """Landmarks as a float64 ``(F, 68, 2)`` tensor in pixels (x, y)."""
    lmk = _as_tensor(landmarks).double().cpu()
    if lmk.dim() != 3 or lmk.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must be (F, 68, 2); got shape {tuple(lmk.shape)}")
    if num_frames is not None and lmk.shape[0] != num_frames:
        raise ValueError(f"{lmk.shape[0]} landmark frames for a {num_frames}-frame video")
    return lmk


def _mouth_mask(landmarks: torch.Tensor, height: int, width: int, margin: float) -> torch.Tensor:
    """Per-frame boolean mask ``(F, H, W)`` of the mouth box of each frame's landmarks ``(F, 68, 2)``."""
    mask = torch.zeros(landmarks.shape[0], height, width, dtype=torch.bool)
    for f in range(landmarks.shape[0]):
        x0, y0, x1, y1 = mouth_box(landmarks[f].numpy(), (height, width), margin)
        mask[f, y0:y1, x0:x1] = True
    return mask


def mouth_psnr(pred, target, landmarks, margin: float = MOUTH_MARGIN, max_val: float = 1.0,
               cap: float = PSNR_CAP_DB) -> float:
    """PSNR inside the mouth box of the driving landmarks, pooled over all frames.

    The box of frame t comes from ``landmarks[t]`` (the pose the model was asked to follow), not from
    the prediction, so a model that opens the mouth at the wrong time is scored on the right pixels.
    The squared error is summed over every in-box pixel of every frame and divided by the total in-box
    pixel count, so frames with a wider-open mouth weigh more (they hold more of the lip motion).

    Args:
        pred, target: videos ``(F, 3, H, W)`` in [0, 1].
        landmarks: driving landmarks ``(F, 68, 2)`` in pixels (x, y) of these frames.
        margin: growth of the outer-lip box on every side, as a fraction of the lip width
            (``portrait.data.landmarks.mouth_box``); the box is clipped to the frame.
        max_val, cap: as in :func:`psnr`.

    Returns:
        PSNR in dB over the mouth boxes.
    """
    pred, target = _pair(pred, target)
    num_frames, _, height, width = pred.shape
    mask = _mouth_mask(_as_landmarks(landmarks, num_frames), height, width, margin).to(pred.device)
    sq_err = (pred.double() - target.double()).pow(2).sum(1)  # (F, H, W), summed over RGB
    count = mask.sum() * pred.shape[1]
    mse = sq_err[mask].sum() / count
    return float(_mse_to_psnr(mse, max_val, cap))


def _pair_mask(frame_mask, num_frames: int) -> torch.Tensor:
    """Which consecutive pairs (t-1, t), t = 1..F-1, touch a selected frame: ``(F-1,)`` bool."""
    mask = _as_tensor(frame_mask).bool().cpu()
    if mask.shape != (num_frames,):
        raise ValueError(f"frame_mask must be ({num_frames},) bool; got shape {tuple(mask.shape)}")
    return mask[1:] | mask[:-1]


def flicker(pred, target=None, frame_mask=None) -> float:
    """Temporal flicker, in 8-bit intensity levels (x 255 for readability).

    With a target, the mean absolute difference between the temporal differences of the prediction
    and those of the ground truth::

        flicker = 255 * mean_{t, c, y, x} | (pred_t - pred_{t-1}) - (target_t - target_{t-1}) |

    Equivalently, the frame-to-frame change of the error image ``pred_t - target_t``: an error that
    stays put (a colour bias, a slightly wrong face) scores 0, an error that moves or blinks scores.
    The ground truth's own frame-to-frame change is real motion, so only change it does not have counts:
    a static video against a static target scores 0 however wrong its pixels are (that is PSNR's job),
    and a video that alternates between two images scores high. This is the pixel-space form of the
    temporal metrics of TecoGAN (Chu et al. 2020, "Learning temporal coherence via self-supervision for
    GAN-based video generation", tOF / tLP), which compare the temporal change of the output with that of
    the ground truth instead of scoring the output's change alone; we skip optical flow because our
    ground truth is pixel-aligned with the prediction.

    Without a target: ``255 * mean |pred_t - pred_{t-1}|``, the raw temporal change, which also counts
    real motion; only compare it between models driven by the same poses.

    Args:
        pred: video ``(F, 3, H, W)`` in [0, 1], F >= 2.
        target: optional ground-truth video of the same shape.
        frame_mask: optional ``(F,)`` bool. Differences are always taken between consecutive frames of the
            full video; a pair (t-1, t) counts when either frame is selected, so for in-between frames
            the jumps into and out of the neighbouring keyframes are both scored.

    Returns:
        mean absolute error in [0, 255] units.
    """
    if target is None:
        pred = to_video_tensor(pred)
        diff = (pred[1:] - pred[:-1]).double()
    else:
        pred, target = _pair(pred, target)
        diff = (pred[1:] - pred[:-1]).double() - (target[1:] - target[:-1]).double()
    if pred.shape[0] < 2:
        raise ValueError("flicker needs at least 2 frames")
    if frame_mask is not None:
        pairs = _pair_mask(frame_mask, pred.shape[0]).to(diff.device)
        if not pairs.any():
            raise ValueError("frame_mask selects no consecutive pair")
        diff = diff[pairs]
    return float(255.0 * diff.abs().mean())


def landmark_error_per_frame(pred_landmarks, gt_landmarks) -> torch.Tensor:
    """Normalised mean error (NME) of each frame, as in 300W (Sagonas et al. 2016).

    NME = mean over the 68 points of ||pred_i - gt_i||_2, divided by the ground truth's inter-ocular
    distance, so it does not depend on face size or resolution: shifting every point by one IOD gives
    1.0. The IOD is ``portrait.data.landmarks.inter_ocular_distance``, between the eye CENTRES (the
    "inter-pupil" normalisation of 300W results), which is smaller than the outer-corner distance, so
    our NMEs read higher than outer-corner NMEs of the same error (x1.44 on the synthetic faces).

    Args:
        pred_landmarks, gt_landmarks: ``(F, 68, 2)`` (or any ``(..., 68, 2)``) in pixels (x, y).

    Returns:
        float64 tensor of the leading shape, e.g. ``(F,)``.
    """
    pred = _as_tensor(pred_landmarks).double().cpu()
    gt = _as_tensor(gt_landmarks).double().cpu()
    if pred.shape != gt.shape or pred.shape[-2:] != (68, 2):
        raise ValueError(f"landmarks must both be (..., 68, 2); got {tuple(pred.shape)} and {tuple(gt.shape)}")
    iod = torch.as_tensor(inter_ocular_distance(gt.numpy())).double()
    return (pred - gt).norm(dim=-1).mean(-1) / iod


def landmark_error(pred_landmarks, gt_landmarks) -> float:
    """Mean NME over frames (see :func:`landmark_error_per_frame`); inputs ``(F, 68, 2)`` pixels."""
    return float(landmark_error_per_frame(pred_landmarks, gt_landmarks).mean())


def video_metrics(pred, target, driving_landmarks, probe=None, teacher=None, frame_mask=None) -> dict:
    """All metrics of one generated clip.

    Args:
        pred: generated video ``(F, 3, H, W)`` in [0, 1] (or uint8 ``(F, H, W, 3)``).
        target: ground-truth video, same shape.
        driving_landmarks: ``(F, 68, 2)`` landmarks in pixels that the pose images were drawn from.
        probe: optional :class:`portrait.models.landmark_probe.LandmarkProbe`; adds ``landmark_error``, the
            NME of the landmarks it reads off ``pred`` against ``driving_landmarks``.
        teacher: optional teacher video, same shape; adds ``psnr_teacher`` (how close a student stays
            to what it was distilled from, independent of how good the teacher is).
        frame_mask: optional ``(F,)`` bool; every metric is restricted to the selected frames (e.g. the
            in-between frames of an interpolator), except flicker, which uses consecutive pairs of the
            full video that touch a selected frame (see :func:`flicker`).

    Returns:
        dict of floats: ``psnr_gt``, ``ssim_gt``, ``mouth_psnr``, ``flicker``, plus ``landmark_error``
        and ``psnr_teacher`` when ``probe`` / ``teacher`` are given.
    """
    pred, target = _pair(pred, target)
    lmk = _as_landmarks(driving_landmarks, pred.shape[0])
    teacher = None if teacher is None else _pair(pred, teacher)[1]
    out = {"flicker": flicker(pred, target, frame_mask=frame_mask)}
    if frame_mask is not None:
        keep = _as_tensor(frame_mask).bool().cpu()
        if keep.shape != (pred.shape[0],) or not keep.any():
            raise ValueError(f"frame_mask must be a ({pred.shape[0]},) bool selecting at least one frame")
        pred, target, lmk = pred[keep.to(pred.device)], target[keep.to(pred.device)], lmk[keep]
        teacher = None if teacher is None else teacher[keep.to(teacher.device)]
    out["psnr_gt"] = psnr(pred, target)
    out["ssim_gt"] = ssim(pred, target)
    out["mouth_psnr"] = mouth_psnr(pred, target, lmk)
    if probe is not None:
        # Lazy: the probe module imports this one for its training metrics.
        from portrait.models.landmark_probe import predict_video_landmarks

        out["landmark_error"] = landmark_error(predict_video_landmarks(probe, pred), lmk)
    if teacher is not None:
        out["psnr_teacher"] = psnr(pred, teacher)
    return out


__all__ = [
    "PSNR_CAP_DB",
    "flicker",
    "landmark_error",
    "landmark_error_per_frame",
    "mouth_psnr",
    "psnr",
    "psnr_per_frame",
    "ssim",
    "ssim_per_frame",
    "to_video_tensor",
    "video_metrics",
]
