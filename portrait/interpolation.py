"""Training pieces of the frame interpolator (``train/interpolator.py``): triplet sampling with augmentation, the
degradation round trip, and the losses. Plain functions (DESIGN §3.6).

Shapes: images ``(B, 3, H, W)`` in [0, 1]; landmarks ``(B, 68, 2)`` in pixels (corner convention,
``portrait.data.landmarks``); flows ``(B, 4, H, W)`` = F_t->0, F_t->1 in pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from portrait.data.landmarks import INNER_LIPS, LEFT_EYE, OUTER_LIPS, RIGHT_EYE, inter_ocular_distance

# iBUG-68 horizontal mirror permutation: after flipping the image, point i of the mirrored face is point
# MIRROR_68[i] of the original (jaw reversed, brows / eyes / nose wings / lip corners swapped left <-> right,
# centre-line points fixed). Right and left are the subject's (portrait.data.landmarks).
MIRROR_68 = np.array(
    list(range(16, -1, -1))  # jaw 0-16
    + list(range(26, 21, -1))  # right brow 17-21 <- left brow 26..22
    + list(range(21, 16, -1))  # left brow 22-26 <- right brow 21..17
    + [27, 28, 29, 30]  # nose bridge
    + [35, 34, 33, 32, 31]  # nose base
    + [45, 44, 43, 42, 47, 46]  # right eye 36-41 <- left eye
    + [39, 38, 37, 36, 41, 40]  # left eye 42-47 <- right eye
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips 48-59
    + [64, 63, 62, 61, 60, 67, 66, 65]  # inner lips 60-67
)
assert sorted(MIRROR_68.tolist()) == list(range(68)) and all(MIRROR_68[MIRROR_68] == np.arange(68))

REGION_POINTS = np.zeros(68, bool)
for _r in (OUTER_LIPS, INNER_LIPS, LEFT_EYE, RIGHT_EYE):
    REGION_POINTS[list(_r)] = True


def mirror_landmarks(lmk: torch.Tensor, width: int) -> torch.Tensor:
    """Landmarks ``(..., 68, 2)`` of the horizontally flipped image: x -> W - x (corner convention), then the
    iBUG mirror permutation so that index i still names the same facial part."""
    out = lmk[..., MIRROR_68, :].clone()
    out[..., 0] = width - out[..., 0]
    return out


def region_boxes_mask(lmk: torch.Tensor, size: tuple[int, int], margin: float = 0.25) -> torch.Tensor:
    """``(B, 1, H, W)`` 0/1 mask of the mouth box and both eye boxes of each frame's landmarks ``(B, 68, 2)``.

    Boxes are the points' bounding boxes grown by ``margin`` x their width (eyes: at least 1.5 px up and down, so a
    closed eye still gets a box)."""
    h, w = size
    b = lmk.shape[0]
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
    mask = torch.zeros(b, h, w)
    for idx in (list(OUTER_LIPS), list(RIGHT_EYE), list(LEFT_EYE)):
        pts = lmk[:, idx].float().cpu()
        lo, hi = pts.min(1).values, pts.max(1).values  # (B, 2)
        pad = margin * (hi[:, 0] - lo[:, 0])
        pady = torch.maximum(pad, torch.full_like(pad, 1.5))
        inside = ((xs >= (lo[:, 0] - pad).view(b, 1, 1)) & (xs <= (hi[:, 0] + pad).view(b, 1, 1))
                  & (ys >= (lo[:, 1] - pady).view(b, 1, 1)) & (ys <= (hi[:, 1] + pady).view(b, 1, 1)))
        mask = torch.maximum(mask, inside.float())
    return mask[:, None].to(lmk.device)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------


def _down(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


def laplacian_l1(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, levels: int = 4) -> torch.Tensor:
    """L1 between Laplacian pyramids (Bojanowski et al. 2018; RIFE's LapLoss), each band weighted by ``weight``
    ``(B, 1, H, W)`` box-filtered to the band's size. Sum over bands of the weighted mean absolute difference."""
    loss = pred.new_zeros(())
    x, y, w = pred, target, weight
    for lvl in range(levels):
        if lvl < levels - 1 and min(x.shape[-2:]) >= 2:
            xd, yd = _down(x), _down(y)
            bx = x - F.interpolate(xd, size=x.shape[-2:], mode="bilinear", align_corners=False)
            by = y - F.interpolate(yd, size=y.shape[-2:], mode="bilinear", align_corners=False)
        else:
            xd = yd = None
            bx, by = x, y
        d = (bx - by).abs()
        # per-sample weighted means, then the batch mean: the loss of a batch is the mean of its samples' losses,
        # so any DDP split of the batch takes the same step
        loss = loss + ((d * w).flatten(1).sum(1) / (w.flatten(1).sum(1) * d.shape[1])).mean() if w is not None else loss + d.mean()
        if xd is None:
            break
        x, y = xd, yd
        w = _down(w) if w is not None else None
    return loss


def census_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, patch: int = 7) -> torch.Tensor:
    """Soft census (ternary) loss (Meister et al. 2018, UnFlow; RIFE's ``Ternary``): compare the local ordering of
    each pixel against its ``patch x patch`` neighbours, robust to brightness and blur differences."""
    def transform(img):
        g = (0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]) * 255
        patches = F.unfold(g, patch, padding=patch // 2).view(g.shape[0], patch * patch, *g.shape[-2:])
        d = patches - g
        return d / torch.sqrt(0.81 + d * d)

    a, b = transform(pred), transform(target)
    d2 = (a - b) ** 2
    dist = (d2 / (0.1 + d2)).mean(1, keepdim=True)
    # ignore the zero-padded border
    valid = torch.zeros_like(dist)
    r = patch // 2
    valid[..., r:-r, r:-r] = 1
    w = valid if weight is None else valid * weight
    return ((dist * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1e-8)).mean()  # per sample, then mean


def flow_smoothness(flow: torch.Tensor, image: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    """Edge-aware first-order smoothness of the flows (Godard et al. 2017 style), in units of the frame size."""
    f = flow / max(flow.shape[-2:])
    dx = (f[..., :, 1:] - f[..., :, :-1]).abs()
    dy = (f[..., 1:, :] - f[..., :-1, :]).abs()
    ix = (image[..., :, 1:] - image[..., :, :-1]).abs().mean(1, keepdim=True)
    iy = (image[..., 1:, :] - image[..., :-1, :]).abs().mean(1, keepdim=True)
    return (dx * torch.exp(-alpha * ix)).mean() + (dy * torch.exp(-alpha * iy)).mean()


def sample_at_points(field: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Bilinear sample of ``field`` ``(B, C, H, W)`` at points ``(B, P, 2)`` (corner-convention pixels) -> ``(B, P, C)``."""
    h, w = field.shape[-2:]
    gx = (pts[..., 0] - 0.5) * (2.0 / max(w - 1, 1)) - 1
    gy = (pts[..., 1] - 0.5) * (2.0 / max(h - 1, 1)) - 1
    grid = torch.stack([gx, gy], -1)[:, None]  # (B, 1, P, 2)
    return F.grid_sample(field, grid.to(field.dtype), mode="bilinear", padding_mode="border", align_corners=True)[:, :, 0].transpose(1, 2)


def landmark_consistency(flow: torch.Tensor, lmk_t: torch.Tensor, lmk0: torch.Tensor, lmk1: torch.Tensor,
                         region_weight: float = 3.0) -> torch.Tensor:
    """The predicted flows must carry each target landmark onto the same landmark of each keyframe:
    ``lmk_t + F_t->0(lmk_t) = lmk0`` and ``lmk_t + F_t->1(lmk_t) = lmk1`` (backward warping samples keyframe 0 at
    p + F_t->0(p)). Mean point error over the 68 points / inter-ocular distance (NME), lips and eyes weighted
    ``region_weight`` x."""
    f = sample_at_points(flow, lmk_t)  # (B, 68, 4)
    e0 = (lmk_t + f[..., :2] - lmk0).norm(dim=-1)
    e1 = (lmk_t + f[..., 2:] - lmk1).norm(dim=-1)
    w = torch.ones(68, device=flow.device)
    w[torch.from_numpy(REGION_POINTS).to(flow.device)] = region_weight
    w = w / w.sum()
    iod = torch.from_numpy(inter_ocular_distance(lmk_t.detach().cpu().double().numpy())).float().to(flow.device).clamp(min=1.0)
    return (((e0 + e1) * 0.5 * w).sum(-1) / iod).mean()


# ------------------------------------------------------------------------------------------------
# Triplets
# ------------------------------------------------------------------------------------------------


def sample_triplets(batch: dict[str, torch.Tensor], gens: list[torch.Generator], gaps: list[int], flip_prob: float,
                    reverse_prob: float, landmark_dropout: float, prior_dropout: float) -> dict[str, torch.Tensor]:
    """One (keyframe 0, keyframe 1, target) triplet per clip window of ``batch`` (``ClipDataset`` items of
    ``max(gaps) + 1`` frames, stride 1), all randomness from the per-sample generators ``gens``.

    Per sample: a gap k from ``gaps``, a start s, an in-between j in 1..k-1 (t = j / k, so every t = j/k occurs);
    time reversal (swap the keyframes, t -> 1 - t) and a horizontal flip (images mirrored, landmarks mirrored with
    :data:`MIRROR_68`, pose images re-drawn from them so that the colour coding of left / right parts stays right);
    and the landmark / prior dropout switches.

    Returns dict of ``img0, img1, target, pose0, pose1, pose_t`` ``(B, 3, H, W)`` float in [0, 1], ``lmk0, lmk1,
    lmk_t`` ``(B, 68, 2)``, ``t``, ``k``, ``landmarks_on``, ``prior_keep`` ``(B,)``.
    """
    from portrait.data.pose import draw_pose

    frames, poses, lmks = batch["target"], batch["pose"], batch["landmarks"]
    n_frames, w = frames.shape[1], frames.shape[-1]
    out: dict[str, list] = {k: [] for k in ("img0", "img1", "target", "pose0", "pose1", "pose_t", "lmk0", "lmk1", "lmk_t",
                                            "t", "k", "landmarks_on", "prior_keep")}
    for i, g in enumerate(gens):
        r = torch.rand(5, generator=g)
        k = gaps[int(torch.randint(len(gaps), (1,), generator=g))]
        if k + 1 > n_frames:
            raise ValueError(f"gap {k} needs {k + 1} frames per window, the dataset gives {n_frames}")
        s = int(torch.randint(n_frames - k, (1,), generator=g))
        j = int(torch.randint(1, k, (1,), generator=g))
        a, b, c, t = s, s + k, s + j, j / k
        if r[0] < reverse_prob:
            a, b, t = b, a, 1 - t
        idx = [a, b, c]
        im = frames[i, idx].float() / 255
        po = poses[i, idx].float() / 255
        lm = lmks[i, idx].float()
        if r[1] < flip_prob:
            im = im.flip(-1)
            lm = mirror_landmarks(lm, w)
            po = torch.stack([torch.from_numpy(np.array(draw_pose(x.numpy(), frames.shape[-2:]))).permute(2, 0, 1).float() / 255 for x in lm])
        for key, v in zip(("img0", "img1", "target"), im):
            out[key].append(v)
        for key, v in zip(("pose0", "pose1", "pose_t"), po):
            out[key].append(v)
        for key, v in zip(("lmk0", "lmk1", "lmk_t"), lm):
            out[key].append(v)
        out["t"].append(torch.tensor(t))
        out["k"].append(torch.tensor(k))
        out["landmarks_on"].append(torch.tensor(float(r[2] >= landmark_dropout)))
        out["prior_keep"].append(torch.tensor(float(r[3] >= prior_dropout)))
    return {k: torch.stack(v) for k, v in out.items()}


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Encode (posterior mean) and decode ``(N, 3, H, W)`` [0, 1] images with a diffusers ``AutoencoderKL``: the
    degradation every diffusion output carries (the latent scale cancels, so any scale is fine)."""
    outs = []
    for x in images.split(batch_size):
        z = vae.encode((x * 2 - 1).to(vae.dtype)).latent_dist.mean
        outs.append(((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1))
    return torch.cat(outs)
