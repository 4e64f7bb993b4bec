"""A landmark-conditioned, IFNet-style frame interpolator (pure PyTorch).

It fills the in-between frames of a keyframed generation (``infer/keyframes.py``, ``infer/pipeline.py``):
diffusion runs on every k-th pose only and this network predicts frame ``t in (0, 1)`` directly from the two
keyframes, with no recursion (unlike FILM in AniPortrait's ``-acc`` mode, which bisects at t = 1/2 recursively and
never sees the landmarks).

Architecture (after RIFE's IFNet, Huang et al. 2022, "Real-Time Intermediate Flow Estimation for Video Frame
Interpolation", §3: a coarse-to-fine stack of IFBlocks that each refine the intermediate flows F_t->0, F_t->1 and a
fusion mask M, images backward-warped with ``grid_sample``, output = M * warp(I0, F_t->0) + (1 - M) * warp(I1, F_t->1)):

* ``len(widths)`` IFBlocks at input scales ``scales`` (e.g. 1/4, 1/2, 1/1). Block i sees both keyframes, both
  keyframes warped by the current flows, the current flows / mask, and the time ``t`` as a constant input channel,
  all resized to its scale; it downsamples 4x internally (two stride-2 convs), runs ``depth`` 3x3 convs with PReLU,
  and predicts residuals of the 4 flow channels and the mask logit. The residuals are summed on one coarse grid
  (the finest block's internal resolution) and upsampled to the frame once, for the final fusion.
* **Landmark conditioning.** Every block also reads the rendered pose images of both keyframes and of the target
  frame, both keyframe pose images warped by the current flows (their mismatch to the target pose image is a direct
  flow-error signal), and an optional *sparse landmark-displacement flow prior* (the displacements of the 68
  points from the target frame to each keyframe, splatted with a Gaussian, plus its confidence). These enter
  through a separate ``landmark_in`` conv per block whose weights and bias start at zero, and the prior also
  enters the flows through a scalar gain that starts at zero. So at initialisation the model with landmarks on
  equals the model with them off. ``use_landmarks=False`` zeroes the branch's inputs (pose images, warped pose
  images, prior), which is exactly how training's per-sample landmark dropout presents an "off" sample, so the
  landmark-blind mode is one the network was trained in (before 2026-12-07 it skipped the branch instead, a mode
  training never saw: 0.08 dB weaker on the 200 validation triplets, BENCHMARKS.md). ``InterpolatorConfig.use_landmarks=False``
  builds a network without the branch at all.
* **Exact keyframes.** The flows are parametrised as ``F_t->0 = t * f0 + g * prior_t->0`` and
  ``F_t->1 = (1 - t) * f1 + g * prior_t->1`` (a linear-motion parametrisation, as in Super SloMo, Jiang et al.
  2018, eq. 4), the fusion weight as ``w0 = (1-t) m / ((1-t) m + t (1-m))`` with ``m = sigmoid(logit)``, and the
  final residual is scaled by ``t (1 - t)``. At t = 0 the output is keyframe 0 and at t = 1 keyframe 1, exactly
  (the prior vanishes there because the target landmarks are the keyframe's); zero flow with ``m = 0.5`` is the
  linear blend ``(1 - t) I0 + t I1``.

Sizes (``count_flops`` MACs, one in-between frame; see ``INTERPOLATOR_CONFIGS``): ``base`` about 6 M params and
under 10 GMAC at 512x512; ``tiny`` for 64x64 on a CPU.

Save / load a folder (``save_pretrained`` / ``from_pretrained``)::

    INTERP_DIR/
      config.json          {"format": "fastportrait.interpolator", "format_version": 2, "config": {...}, "metadata": {...}}
      model.safetensors
      README.md            model card

Use::

    from portrait.models.interpolator import FrameInterpolator
    net = FrameInterpolator.from_pretrained("runs/interpolator/tiny/model")
    frame = net.interpolate(img0, img1, t, pose0, pose1, pose_t, lmk0, lmk1, lmk_t)   # (B, 3, H, W) in [0, 1]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "fastportrait.interpolator"
FORMAT_VERSION = 2  # 2: flows accumulated on a coarse grid (version 1 accumulated them at full resolution)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"

# Landmark-branch input channels: 3 pose images + 2 warped keyframe pose images (3 ch each) + flow prior (4 + 1).
POSE_CHANNELS = 15
PRIOR_CHANNELS = 5


class InterpolatorFolderError(ValueError):
    """An interpolator folder is missing, corrupt, or holds another kind of model."""


@dataclass
class InterpolatorConfig:
    widths: list[int] = field(default_factory=lambda: [32, 24, 16])  # IFBlock widths, coarse -> fine
    scales: list[int] = field(default_factory=lambda: [4, 2, 1])  # input downsampling of each block
    depth: int = 2  # 3x3 convs per block at the block's internal resolution
    use_landmarks: bool = True  # the landmark branch exists (False: a landmark-blind interpolator, like FILM)
    flow_prior: bool = True  # also feed the sparse landmark-displacement flow prior (needs landmarks)
    prior_sigma: float = 0.06  # Gaussian splat radius of the prior, as a fraction of the image size
    residual: bool = True  # the last block also predicts an RGB residual (scaled by t (1 - t))
    # internal downsampling of each block's input (2 or 4); None = 4 everywhere (RIFE's IFBlock). A block at input
    # scale 2 with down 2 works on the same grid as one at scale 1 with down 4 without any full-resolution pass.
    downs: list[int] | None = None


INTERPOLATOR_CONFIGS: dict[str, InterpolatorConfig] = {
    # 64x64 CPU model (the embedded default).
    "tiny": InterpolatorConfig(widths=[32, 24, 16], scales=[4, 2, 1], depth=2),
    # the tiny model without full-resolution blocks: the finest block reads the half-resolution frame and downsamples
    # it 2x, so only the final fusion touches 64^2 (same 16x16 coarse grid as tiny)
    "tiny_fast": InterpolatorConfig(widths=[32, 24, 16], scales=[4, 2, 2], depth=2, downs=[4, 4, 2]),
    # ~6 M params, < 10 GMAC at 512^2 (RIFE's IFNet uses widths 240/150/90 at scales 4/2/1; we go coarser because
    # our frames move little between keyframes and the landmark prior carries the large mouth motions).
    "base": InterpolatorConfig(widths=[224, 144, 96], scales=[8, 4, 2], depth=8),
}


# ------------------------------------------------------------------------------------------------
# Warping, fusion, landmark prior: plain functions (tested on their own)
# ------------------------------------------------------------------------------------------------

_GRID_CACHE: dict[tuple, torch.Tensor] = {}


def _base_grid(h: int, w: int, device, dtype) -> torch.Tensor:
    key = (h, w, str(device), dtype)
    if key not in _GRID_CACHE:
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype), indexing="ij")
        _GRID_CACHE.clear() if len(_GRID_CACHE) > 16 else None
        _GRID_CACHE[key] = torch.stack([xs, ys], 0)[None]  # (1, 2, H, W) pixel centres (x, y)
    return _GRID_CACHE[key]


def _sampling_grid(h: int, w: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``grid_sample``'s coordinates of the pixel centres ``(1, H, W, 2)`` and the pixel -> grid scale ``(2,)``.

    align_corners=True maps pixel centre 0 -> -1 and W-1 -> +1, so integer positions sample exactly."""
    key = ("sampling", h, w, str(device), dtype)
    if key not in _GRID_CACHE:
        scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=device, dtype=dtype)
        base = _base_grid(h, w, device, dtype)[0].permute(1, 2, 0) * scale - 1.0
        _GRID_CACHE.clear() if len(_GRID_CACHE) > 16 else None
        _GRID_CACHE[key] = (base[None].contiguous(), scale)
    return _GRID_CACHE[key]


def backward_warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``img`` at ``p + flow(p)`` for every output pixel p (backward warping).

    Args:
        img: ``(B, C, H, W)``.
        flow: ``(B, 2, H, W)`` (dx, dy) in pixels of this resolution.
    Returns:
        ``(B, C, H, W)``; border padding outside the frame. Zero flow returns ``img`` exactly.
    """
    _, _, h, w = flow.shape
    base, scale = _sampling_grid(h, w, flow.device, flow.dtype)
    grid = torch.addcmul(base, flow.permute(0, 2, 3, 1), scale)  # the normalised grid plus the scaled flow, one op
    return F.grid_sample(img, grid.to(img.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def fusion_weight(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Weight of keyframe 0 given the mask ``m`` in (0, 1) and time ``t`` ``(B, 1, 1, 1)``.

    ``w0 = (1-t) m / ((1-t) m + t (1-m))``: 1 at t = 0, 0 at t = 1, and ``1 - t`` for ``m = 0.5`` (the blend).
    It is RIFE's mask with the temporal-distance prior of Super SloMo (Jiang et al. 2018, eq. 1) built in.
    """
    a = (1 - t) * mask
    bb = t * (1 - mask)
    return a / (a + bb).clamp(min=1e-8)


def fuse(img0: torch.Tensor, img1: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Warp both keyframes by the intermediate flows and blend them.

    Args:
        img0, img1: keyframes ``(B, C, H, W)``.
        flow: ``(B, 4, H, W)``: F_t->0 (channels 0-1) and F_t->1 (2-3) in pixels.
        mask: ``(B, 1, H, W)`` in (0, 1); 0.5 is neutral.
        t: ``(B,)`` or ``(B, 1, 1, 1)`` time in [0, 1].
    Returns:
        ``(B, C, H, W)``.
    """
    t = t.view(-1, 1, 1, 1).to(img0.dtype)
    w0 = fusion_weight(mask, t)
    return w0 * backward_warp(img0, flow[:, :2]) + (1 - w0) * backward_warp(img1, flow[:, 2:])


def landmark_flow_prior(lmk_t: torch.Tensor, lmk0: torch.Tensor, lmk1: torch.Tensor, size: tuple[int, int],
                        sigma: float) -> torch.Tensor:
    """Dense flow prior from sparse landmark displacements: ``(B, 5, H, W)``.

    Each of the 68 points of the target frame carries its displacement to keyframe 0 and to keyframe 1; the
    displacements are splatted with a Gaussian of ``sigma * H`` pixels around the target point and normalised
    (Nadaraya-Watson), giving F^prior_t->0 (ch 0-1) and F^prior_t->1 (ch 2-3); ch 4 is the splat confidence
    ``1 - exp(-sum of weights)`` (0 far from the face). Exactly zero flow when the target landmarks equal the
    keyframe's.

    Args:
        lmk_t, lmk0, lmk1: ``(B, 68, 2)`` (x, y) in pixels with the corner convention (pixel (i, j) spans
            [j, j+1) x [i, i+1)), so the pixel centre is at +0.5.
        size: ``(H, W)``.
    """
    h, w = size
    dt = lmk_t.dtype if lmk_t.dtype in (torch.float32, torch.float64) else torch.float32
    pts = lmk_t.to(dt)
    # The isotropic Gaussian is separable, exp(-(dx^2 + dy^2) / 2s^2) = exp(-dx^2 / 2s^2) exp(-dy^2 / 2s^2), so the
    # (pixels x 68) weight matrix is the product of a (rows x 68) and a (cols x 68) factor and every sum over the
    # points is a batched matmul: the dense form's numbers at 1/6 of its time (15 frames at 16x16: 6.8 -> 1.1 ms, 1 thread).
    inv = 1.0 / (2 * (sigma * h) ** 2)
    xs = torch.arange(w, device=pts.device, dtype=dt) + 0.5  # pixel centres, corner convention
    ys = torch.arange(h, device=pts.device, dtype=dt) + 0.5
    ex = torch.exp(-(xs[None, :, None] - pts[:, None, :, 0]).pow(2) * inv)  # (B, W, 68)
    ey = torch.exp(-(ys[None, :, None] - pts[:, None, :, 1]).pow(2) * inv)  # (B, H, 68)
    disp = torch.cat([lmk0.to(dt) - pts, lmk1.to(dt) - pts], -1)  # (B, 68, 4)
    total = ey @ ex.transpose(1, 2)  # (B, H, W): sum of the weights
    weighted = (ey[:, None] * disp.transpose(1, 2)[:, :, None, :]) @ ex.transpose(1, 2)[:, None]  # (B, 4, H, W)
    t = total[:, None]
    flow = weighted / t.clamp(min=1e-6) * (t > 1e-6)
    return torch.cat([flow, 1 - torch.exp(-t)], 1)


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.PReLU(c_out))


class IFBlock(nn.Module):
    """One coarse-to-fine step: (images, warped images, flow, mask, t [, landmark inputs]) -> residual flow/mask."""

    def __init__(self, c_in: int, c_lmk: int, width: int, depth: int, out_channels: int, down: int = 4):
        super().__init__()
        if down not in (2, 4):
            raise ValueError(f"an IFBlock downsamples its input by 2 or 4, got {down}")
        s2 = 2 if down == 4 else 1  # the second input conv's stride
        self.conv0 = nn.Sequential(_conv(c_in, width // 2, 2), _conv(width // 2, width, s2))
        # The landmark branch: zero-initialised, so it adds exactly nothing until trained.
        self.landmark_in = nn.Sequential(nn.Conv2d(c_lmk, width // 2, 3, 2, 1), nn.PReLU(width // 2),
                                         nn.Conv2d(width // 2, width, 3, s2, 1)) if c_lmk else None
        if self.landmark_in is not None:
            nn.init.zeros_(self.landmark_in[2].weight)
            nn.init.zeros_(self.landmark_in[2].bias)
        self.body = nn.Sequential(*[_conv(width, width) for _ in range(depth)])
        # Predicted at the internal (1/4) resolution and upsampled bilinearly by the caller: flows and masks are
        # smooth, and RIFE v4's transposed conv + pixel shuffle head cost more than the whole body here.
        self.head = nn.Conv2d(width, out_channels, 3, 1, 1)
        # Zero-initialised output: an untrained interpolator is exactly the linear blend (zero flow, mask 0.5, no
        # residual), so training starts from the landmark-blind baseline and only has to improve on it.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, lmk: torch.Tensor | None) -> torch.Tensor:
        h = self.conv0(x)
        if lmk is not None and self.landmark_in is not None:
            h = h + self.landmark_in(lmk)
        h = self.body(h) + h
        return self.head(h)


class FrameInterpolator(nn.Module):
    """See the module docstring. Inputs are images in [0, 1]; landmarks in pixels."""

    def __init__(self, config: InterpolatorConfig | None = None, metadata: dict | None = None):
        super().__init__()
        cfg = config or InterpolatorConfig()
        if len(cfg.widths) != len(cfg.scales) or not cfg.widths:
            raise ValueError(f"widths {cfg.widths} and scales {cfg.scales} must be non-empty and of equal length")
        self.config = cfg
        self.metadata = dict(metadata or {})
        # images (6) + warped images (6) + flow (4) + mask (1) + t (1)
        c_in = 18
        c_lmk = (POSE_CHANNELS + (PRIOR_CHANNELS if cfg.flow_prior else 0)) if cfg.use_landmarks else 0
        n_out = [5] * (len(cfg.widths) - 1) + [5 + (3 if cfg.residual else 0)]
        downs = cfg.downs or [4] * len(cfg.widths)
        if len(downs) != len(cfg.widths):
            raise ValueError(f"downs {cfg.downs} must have one entry per block ({len(cfg.widths)})")
        self.blocks = nn.ModuleList(IFBlock(c_in, c_lmk, w, cfg.depth, o, d) for w, o, d in zip(cfg.widths, n_out, downs))
        # Gain of the landmark flow prior in the flows; zero at init (landmarks on == off).
        self.prior_gain = nn.Parameter(torch.zeros(1)) if (cfg.use_landmarks and cfg.flow_prior) else None

    @property
    def multiple(self) -> int:
        """Frame sizes must be divisible by this (inputs are padded to it internally)."""
        return max(s * d for s, d in zip(self.config.scales, self.config.downs or [4] * len(self.config.scales)))

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, t: torch.Tensor, pose0: torch.Tensor | None = None,
                pose1: torch.Tensor | None = None, pose_t: torch.Tensor | None = None, lmk0: torch.Tensor | None = None,
                lmk1: torch.Tensor | None = None, lmk_t: torch.Tensor | None = None,
                use_landmarks: bool | torch.Tensor = True, prior_keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Predict the frame at time ``t`` between ``img0`` (t = 0) and ``img1`` (t = 1).

        Args:
            img0, img1: keyframes ``(B, 3, H, W)`` in [0, 1].
            t: ``(B,)`` in [0, 1].
            pose0, pose1, pose_t: rendered pose images ``(B, 3, H, W)`` in [0, 1] of the keyframes and the target.
            lmk0, lmk1, lmk_t: optional landmarks ``(B, 68, 2)`` in pixels of this resolution (the flow prior; its
                channels are zero when absent, a case training covers by dropping the prior).
            use_landmarks: False zeroes the landmark branch's inputs (the landmark-blind interpolator; pose images may
                then be omitted); a ``(B,)``
                bool tensor switches it per sample (training-time landmark dropout).
            prior_keep: optional ``(B,)`` 0/1 per-sample switch of the flow prior alone (training-time prior dropout,
                so the model also works from the pose images alone, e.g. for pose videos without landmarks).
        Returns:
            dict: ``frame`` ``(B, 3, H, W)`` in [0, 1], ``flow`` ``(B, 4, H, W)`` (F_t->0, F_t->1, pixels),
            ``mask`` ``(B, 1, H, W)`` (weight of keyframe 0 before the t prior), ``prior`` (or None).
        """
        cfg = self.config
        b, _, h0, w0 = img0.shape
        t = t.to(img0.dtype).view(b, 1, 1, 1).expand(b, 1, 1, 1)
        m = self.multiple
        ph, pw = (-h0) % m, (-w0) % m

        def pad(x):
            return F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) and x is not None else x

        on = self._landmark_switch(use_landmarks, b, img0.device)
        if on is not None and use_landmarks is False:
            # landmark-blind: the branch sees zeros, as for a sample that training's landmark dropout switched off
            pose0, pose1, pose_t = (img0.new_zeros(img0.shape) if p is None else p for p in (pose0, pose1, pose_t))
        if on is not None and (pose0 is None or pose1 is None or pose_t is None):
            raise ValueError("landmarks are on but pose images are missing: pass pose0, pose1 and pose_t "
                             "(or use_landmarks=False)")
        img0p, img1p = pad(img0), pad(img1)
        h, w = img0p.shape[-2:]
        # The flows, the mask logit and the RGB residual live on one coarse grid, the finest block's internal
        # resolution (1/(4 min(scales)) of the frame): each block's output is resized onto it and added, each block
        # reads the sums resized to its own input scale, and only the final fusion upsamples to the frame. Flows and
        # masks are smooth, and per-block full-resolution bookkeeping cost more than the network at 64 px.
        a = min(s * d for s, d in zip(cfg.scales, cfg.downs or [4] * len(cfg.scales)))
        ha, wa = h // a, w // a
        prior = None
        if on is not None:
            poses = [pad(p.to(img0.dtype)) for p in (pose0, pose1, pose_t)]
            if cfg.flow_prior:
                if lmk0 is not None and lmk1 is not None and lmk_t is not None:
                    # splatted directly on the coarse grid (the prior is smooth at sigma ~ 6 % of the frame), in
                    # coarse-grid pixels, then rescaled to frame pixels
                    lmk_s = [pts / a for pts in (lmk_t, lmk0, lmk1)]
                    prior = landmark_flow_prior(*lmk_s, (ha, wa), cfg.prior_sigma).to(img0.dtype)
                    prior = torch.cat([prior[:, :4] * a, prior[:, 4:]], 1)
                    prior = prior * on.view(b, 1, 1, 1)
                    if prior_keep is not None:
                        prior = prior * prior_keep.to(prior).view(b, 1, 1, 1)
                else:
                    prior = img0p.new_zeros(b, PRIOR_CHANNELS, ha, wa)
        flow_raw = img0p.new_zeros(b, 4, ha, wa)  # f0, f1 (the t-free part of the flows), frame pixels
        logit = img0p.new_zeros(b, 1, ha, wa)
        rgb = None
        # Everything that does not change between blocks (keyframes, pose images, the prior) is stacked once and
        # box-filtered coarse-to-fine from the next finer scale (avg_pool(x, 4) == avg_pool(avg_pool(x, 2), 2)), so
        # each full-resolution tensor is read once per forward.
        stacks = self._scale_stacks(img0p, img1p, poses if on is not None else None, cfg.scales)
        # With use_landmarks=True `on` is all ones: multiplying by it changes nothing and cost ~10 % of a tiny forward
        # (a full-resolution pass over 20 channels), so the gate is applied only for a per-sample switch or False.
        gate = on.view(b, 1, 1, 1) if on is not None and use_landmarks is not True else None
        for block, s in zip(self.blocks, cfg.scales):
            hs, ws = h // s, w // s
            st = stacks[s]  # (B, 6 [+ 9], hs, ws): img0, img1 [, pose0, pose1, pose_t]
            i0, i1 = st[:, 0:3], st[:, 3:6]
            flow = _to_size(self._flows(flow_raw, prior, t), (hs, ws)) * (1.0 / s)  # in pixels of this scale
            mask = torch.sigmoid(_to_size(logit, (hs, ws)))
            lmk_in = None
            if on is None:
                warped0, warped1 = backward_warp(i0, flow[:, :2]), backward_warp(i1, flow[:, 2:])
                x = torch.cat([i0, i1, warped0, warped1, flow * (8.0 / max(hs, ws)), mask, t.expand(b, 1, hs, ws)], 1)
            else:
                # each keyframe is warped together with its pose image (one grid_sample per keyframe and block)
                warped0 = backward_warp(torch.cat([i0, st[:, 6:9]], 1), flow[:, :2])
                warped1 = backward_warp(torch.cat([i1, st[:, 9:12]], 1), flow[:, 2:])
                x = torch.cat([i0, i1, warped0[:, :3], warped1[:, :3], flow * (8.0 / max(hs, ws)), mask,
                               t.expand(b, 1, hs, ws)], 1)
                parts = [st[:, 6:15], warped0[:, 3:], warped1[:, 3:]]
                if prior is not None:
                    pr = _to_size(prior, (hs, ws))
                    parts += [pr[:, :4] * (8.0 / max(h, w)), pr[:, 4:]]
                lmk_in = torch.cat(parts, 1)
                if gate is not None:
                    lmk_in = lmk_in * gate
            out = _to_size(block(x, lmk_in), (ha, wa))
            flow_raw = flow_raw + out[:, :4] * (max(h, w) / 8)  # predicted in units of 1/8 of the frame
            logit = logit + out[:, 4:5]
            if out.shape[1] > 5:
                rgb = out[:, 5:8]
        final = [self._flows(flow_raw, prior, t), logit] + ([rgb] if rgb is not None else [])
        final = _to_size(torch.cat(final, 1), (h, w))  # one upsample of everything to the frame
        flow, mask = final[:, :4], torch.sigmoid(final[:, 4:5])
        frame = fuse(img0p, img1p, flow, mask, t)
        if rgb is not None:
            # The residual corrects what warping cannot (disocclusions, the inside of an opening mouth), scaled by
            # t (1 - t) so the keyframes stay exact.
            frame = frame + 4 * t * (1 - t) * torch.tanh(final[:, 5:8])
        frame = frame.clamp(0, 1)
        crop = (slice(None), slice(None), slice(0, h0), slice(0, w0))
        return {"frame": frame[crop], "flow": flow[crop], "mask": mask[crop], "prior": None if prior is None else prior[crop]}

    @staticmethod
    def _scale_stacks(img0: torch.Tensor, img1: torch.Tensor, poses: list[torch.Tensor] | None,
                      scales: list[int]) -> dict[int, torch.Tensor]:
        """``{scale: (B, 6 [+ 9], H/scale, W/scale)}``: both keyframes [and the three pose images], box-filtered,
        each scale from the finest one already computed that divides it."""
        finest = min(scales)  # pooled piece by piece first, so no full-resolution stack is built when finest > 1
        out = {finest: torch.cat([_resize(x, finest) for x in [img0, img1] + (poses or [])], 1)}
        for s in sorted(set(scales)):
            if s not in out:
                src = max(k for k in out if s % k == 0)
                out[s] = _resize(out[src], s // src)
        return out

    def _landmark_switch(self, use_landmarks, b: int, device) -> torch.Tensor | None:
        if not self.config.use_landmarks:
            return None
        if isinstance(use_landmarks, torch.Tensor):
            return use_landmarks.to(device=device, dtype=torch.float32).view(b)
        return torch.ones(b, device=device) if use_landmarks else torch.zeros(b, device=device)

    def _flows(self, flow_raw: torch.Tensor, prior: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        flow = torch.cat([t * flow_raw[:, :2], (1 - t) * flow_raw[:, 2:]], 1)
        if prior is not None and self.prior_gain is not None:
            flow = flow + self.prior_gain * prior[:, :4]
        return flow

    @torch.no_grad()
    def interpolate(self, img0, img1, t, pose0=None, pose1=None, pose_t=None, lmk0=None, lmk1=None, lmk_t=None,
                    use_landmarks: bool = True) -> torch.Tensor:
        """Inference shortcut: the predicted frame ``(B, 3, H, W)`` in [0, 1] (see :meth:`forward`)."""
        return self(img0, img1, t, pose0, pose1, pose_t, lmk0, lmk1, lmk_t, use_landmarks=use_landmarks)["frame"]

    # -- folder I/O ---------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, metadata: dict | None = None, model_card: str | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` + ``README.md`` atomically (temp sibling, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or _is_interp_folder(path))):
            raise FileExistsError(f"{path} exists and is not an interpolator folder; refusing to replace it")
        from portrait.data.dataset import atomic_output_dir

        meta = {**self.metadata, **(metadata or {})}
        with atomic_output_dir(path, overwrite=True) as tmp:  # temp sibling, renamed onto ``path`` only on success
            state = {k: v.detach().cpu().contiguous().float() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
            info = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": asdict(self.config), "metadata": meta}
            (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
            (tmp / CARD_FILE).write_text(model_card or default_card(self, meta))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> FrameInterpolator:
        """Load a folder written by :meth:`save_pretrained`; errors name the folder and what to do."""
        from safetensors.torch import load_file

        path = Path(path)
        hint = "train one with `bash launch.sh interpolator` (or pass --interpolator blend for a linear blend)"
        if not path.is_dir():
            raise InterpolatorFolderError(f"interpolator folder not found: {path} ({hint})")
        if (path / "fastportrait.json").is_file() and not (path / CONFIG_FILE).is_file():
            raise InterpolatorFolderError(f"{path} is a Pose2Video model folder, not an interpolator; "
                                          f"pass an interpolator folder to --interpolator ({hint})")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise InterpolatorFolderError(f"interpolator folder {path} has no {name} ({hint})")
        try:
            info = json.loads((path / CONFIG_FILE).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise InterpolatorFolderError(f"corrupt {path / CONFIG_FILE}: {e}") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise InterpolatorFolderError(f"{path} is not an interpolator folder ({CONFIG_FILE} format != {FORMAT!r}); {hint}")
        if info.get("format_version", 0) > FORMAT_VERSION:
            raise InterpolatorFolderError(f"{path} has interpolator format {info['format_version']}, newer than this code; upgrade fastportrait")
        if info.get("format_version", 0) < FORMAT_VERSION:
            raise InterpolatorFolderError(f"{path} has interpolator format {info.get('format_version')}, whose network accumulated its "
                                          f"flows at full resolution; this code reads format {FORMAT_VERSION}: retrain it ({hint}), "
                                          "or read it with fastportrait at commit fd672f1")
        try:
            cfg = InterpolatorConfig(**info["config"])
            net = cls(cfg, metadata=info.get("metadata"))
            state = load_file(str(path / WEIGHTS_FILE))
            net.load_state_dict(state, strict=True)
        except (TypeError, KeyError, RuntimeError, ValueError, OSError) as e:
            raise InterpolatorFolderError(f"cannot load interpolator {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        return net.to(device).eval()


_RESIZE_CACHE: dict[tuple, torch.Tensor] = {}


def _resize_matrix(n_in: int, n_out: int, box: bool, device, dtype) -> torch.Tensor:
    """``(n_out, n_in)`` weights of a 1-D resize: a box filter (``avg_pool1d``) or linear interpolation
    (``F.interpolate``, ``align_corners=False``), read off by applying it to the identity, so the 2-D resize
    ``M_h @ x @ M_w.T`` has exactly those ops' weights."""
    key = (n_in, n_out, box, str(device), dtype)
    if key not in _RESIZE_CACHE:
        eye = torch.eye(n_in, dtype=torch.float64)[None]
        m = F.avg_pool1d(eye, n_in // n_out) if box else F.interpolate(eye, size=n_out, mode="linear", align_corners=False)
        _RESIZE_CACHE.clear() if len(_RESIZE_CACHE) > 64 else None
        _RESIZE_CACHE[key] = m[0].T.contiguous().to(device=device, dtype=dtype)
    return _RESIZE_CACHE[key]


def _separable_resize(x: torch.Tensor, size: tuple[int, int], box: bool) -> torch.Tensor:
    """Resize ``(B, C, h, w)`` to ``size``: ``avg_pool2d`` (box) or bilinear ``F.interpolate``. On a CPU with sides
    up to 128 px it is two small matmuls with the same weights (equal to float rounding), 1.5-4x faster there:
    15 x 8 x 16^2 -> 64^2 took 0.35 ms against 1.3 ms for ``F.interpolate``, 1 thread."""
    (h, w), (ho, wo) = x.shape[-2:], size
    if x.device.type != "cpu" or max(h, w, ho, wo) > 128:
        # the matmuls cost O(side) MACs per output pixel; on a GPU or at large sides the native kernels win
        return F.avg_pool2d(x, h // ho) if box else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    mh = _resize_matrix(h, ho, box, x.device, x.dtype)
    mw = _resize_matrix(w, wo, box, x.device, x.dtype)
    return torch.matmul(torch.matmul(mh, x), mw.T)


def _resize(x: torch.Tensor, s: int) -> torch.Tensor:
    """Box-filter downsampling by ``s`` (area average; cheaper than antialiased bilinear, same purpose)."""
    return x if s == 1 else _separable_resize(x, (x.shape[-2] // s, x.shape[-1] // s), box=True)


def _to_size(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a smooth field (flows, logits, prior) ``(B, C, h, w)`` to ``size``: unchanged when equal, box filter
    when shrinking by an integer factor, bilinear otherwise (values are not rescaled)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    box = h % size[0] == 0 and w % size[1] == 0 and h // size[0] == w // size[1]
    return _separable_resize(x, size, box=box)


def _is_interp_folder(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def count_macs(net: FrameInterpolator, size: int, use_landmarks: bool = True) -> float:
    """MACs of one in-between frame at ``size`` x ``size`` (``portrait.flops.count_flops``, landmarks included)."""
    from portrait.flops import count_flops

    x = torch.rand(1, 3, size, size)
    lmk = torch.rand(1, 68, 2) * size
    return count_flops(lambda: net(x, x, torch.tensor([0.5]), x, x, x, lmk, lmk, lmk, use_landmarks=use_landmarks)).macs


def default_card(net: FrameInterpolator, meta: dict) -> str:
    cfg = net.config
    lines = [
        f"# {meta.get('title', 'fastportrait frame interpolator')}", "",
        "An IFNet-style (RIFE) frame interpolator conditioned on the driving landmarks "
        "(`portrait/models/interpolator.py`). It fills the in-between frames of keyframed generation:", "",
        "```bash",
        "python -m infer.animate --model MODEL_DIR --ref ref.png --pose landmarks.npy --out out.mp4 \\",
        f"    --keyframes fixed:3 --interpolator {meta.get('path', 'THIS_DIR')}",
        "```", "",
        f"- parameters: {count_parameters(net) / 1e6:.2f} M; blocks {cfg.widths} at scales 1/{cfg.scales}, depth {cfg.depth}",
        f"- landmark branch: {'on' if cfg.use_landmarks else 'off'}; flow prior: {'on' if cfg.use_landmarks and cfg.flow_prior else 'off'}",
    ]
    for k in ("steps", "samples_seen", "train_minutes", "keyframe_source", "vae_model", "data"):
        if k in meta:
            lines.append(f"- {k}: {meta[k]}")
    if "metrics" in meta:
        lines += ["", "## Validation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in meta["metrics"].items()]
    if "config" in meta:
        lines += ["", "## Training config", "", "```json", json.dumps(meta["config"], indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def build_interpolator(name: str, **overrides) -> FrameInterpolator:
    """A fresh interpolator from a named config (``tiny`` / ``base``) with field overrides."""
    if name not in INTERPOLATOR_CONFIGS:
        raise ValueError(f"unknown interpolator config {name!r}; choose from {sorted(INTERPOLATOR_CONFIGS)}")
    cfg = InterpolatorConfig(**{**asdict(INTERPOLATOR_CONFIGS[name]), **overrides})
    return FrameInterpolator(cfg)


class LinearBlend(nn.Module):
    """The landmark-blind baseline ``(1 - t) I0 + t I1`` with the :class:`FrameInterpolator` call signature."""

    config = InterpolatorConfig(use_landmarks=False, flow_prior=False)
    metadata = {"kind": "linear blend"}

    def forward(self, img0, img1, t, *args, use_landmarks=True, **kwargs) -> dict[str, torch.Tensor]:
        t = t.to(img0.dtype).view(-1, 1, 1, 1)
        return {"frame": (1 - t) * img0 + t * img1, "flow": None, "mask": None, "prior": None}

    @torch.no_grad()
    def interpolate(self, img0, img1, t, *args, **kwargs) -> torch.Tensor:
        return self(img0, img1, t)["frame"]


def load_interpolator(spec: str | Path | nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """``"blend"`` -> :class:`LinearBlend`; a folder path -> :meth:`FrameInterpolator.from_pretrained`; a module as is."""
    if isinstance(spec, nn.Module):
        return spec.to(device)
    if str(spec) == "blend":
        return LinearBlend().to(device)
    return FrameInterpolator.from_pretrained(spec, device=device)


@torch.no_grad()
def fill_between_keyframes(interpolator: nn.Module, key_frames: torch.Tensor, keys: list[int], pose: torch.Tensor,
                           landmarks: torch.Tensor | None = None, use_landmarks: bool = True,
                           batch_size: int = 32) -> torch.Tensor:
    """Assemble the full video from keyframes: every frame between keyframes ``a < j < b`` is predicted directly
    from frames ``a`` and ``b`` at ``t = (j - a) / (b - a)`` (no recursion); keyframes are copied through.

    Args:
        interpolator: a :class:`FrameInterpolator` or :class:`LinearBlend`.
        key_frames: ``(K, 3, H, W)`` in [0, 1], the frames at ``keys``.
        keys: sorted frame indices, ``keys[0] == 0``; ``keys[-1] + 1`` is the frame count.
        pose: ``(N, 3, H, W)`` pose images in [0, 1] of every frame.
        landmarks: optional ``(N, 68, 2)`` pixels (for the flow prior).
        use_landmarks: False runs the interpolator landmark-blind.
        batch_size: in-between frames per interpolator call.
    Returns:
        ``(N, 3, H, W)``.
    """
    n = keys[-1] + 1
    if keys[0] != 0 or len(keys) != key_frames.shape[0] or any(b <= a for a, b in zip(keys[:-1], keys[1:])):
        raise ValueError(f"keys must be strictly increasing from 0 and match {key_frames.shape[0]} keyframes, got {keys}")
    if pose.shape[0] != n:
        raise ValueError(f"{pose.shape[0]} pose frames for a {n}-frame video")
    out = key_frames.new_empty((n, *key_frames.shape[1:]))
    out[keys] = key_frames
    jobs = [(ia, j) for ia, (a, b) in enumerate(zip(keys[:-1], keys[1:])) for j in range(a + 1, b)]
    dev = next(interpolator.parameters(), key_frames).device
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s:s + batch_size]
        ia = torch.tensor([c[0] for c in chunk])
        a = torch.tensor([keys[c[0]] for c in chunk])
        b = torch.tensor([keys[c[0] + 1] for c in chunk])
        j = torch.tensor([c[1] for c in chunk])
        t = ((j - a).float() / (b - a).float()).to(dev)
        lm = (landmarks[a].to(dev), landmarks[b].to(dev), landmarks[j].to(dev)) if landmarks is not None else (None, None, None)
        pred = interpolator.interpolate(key_frames[ia].to(dev), key_frames[ia + 1].to(dev), t, pose[a].to(dev), pose[b].to(dev),
                                        pose[j].to(dev), *lm, use_landmarks=use_landmarks)
        out[j] = pred.to(out.dtype).to(out.device)
    return out
