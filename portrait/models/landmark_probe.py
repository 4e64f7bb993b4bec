"""Landmark probe: a small CNN that reads the 68 iBUG landmarks off a (generated) portrait frame.

It turns "does the generated face follow the pose?" into a number: the probe's landmarks on a
generated frame against the DRIVING landmarks the pose image was drawn from, as an NME
(``infer.metrics.landmark_error``, ``video_metrics(..., probe=...)``). It is trained only on synthetic
frames of TRAIN identities (``portrait.data.synthetic``), with photometric/blur/noise augmentation so
that it also reads slightly soft diffusion outputs, and is scored on held-out identities.

Architecture (why heatmaps): a 3-level conv encoder-decoder (U-Net style skips) predicts one heatmap
per landmark at 1/2 resolution, and a soft-argmax (integral regression, Sun et al. 2018, "Integral
Human Pose Regression") turns each heatmap into sub-pixel (x, y). Convolutions are translation
equivariant, so a heatmap head localises from local evidence and needs far fewer samples than a
global-pool + linear head, which has to re-encode position in channels and regresses the mean shape
first. GroupNorm rather than BatchNorm: the output does not depend on train/eval mode or batch
composition (the BatchNorm quirk of AniPortrait's pose guider, DESIGN.md §1, is what we avoid).

Train the shipped probe (3000 steps of 32 frames, 0.17 s a step on one CPU thread; the exact
command, held-out NME, baselines and times are in the probe folder's ``README.md`` / ``metrics.json``)::

    python -m portrait.models.landmark_probe --out portrait/assets/landmark_probe_64 --threads 1

Use it::

    from portrait.models.landmark_probe import load_probe, predict_video_landmarks
    probe = load_probe()                               # the shipped 64 px probe
    lmk = predict_video_landmarks(probe, video)        # (F, 3, H, W) in [0, 1] -> (F, 68, 2) pixels
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from portrait.data.landmarks import NUM_LANDMARKS, inter_ocular_distance

FORMAT = "fastportrait.landmark_probe"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"

# The probe shipped in the repo and used when no folder is given.
DEFAULT_PROBE_DIR = Path(__file__).resolve().parents[1] / "assets" / "landmark_probe_64"
DEFAULT_WIDTHS = (32, 64, 128)


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------

def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv -> GroupNorm(8) -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(8, c_out), nn.ReLU(inplace=True)
    )


class LandmarkProbe(nn.Module):
    """Heatmap landmark regressor with a soft-argmax read-out.

    Args:
        size: the square input size it is trained for (frames of other sizes are resized by
            :func:`predict_video_landmarks`); must be a multiple of 8.
        widths: channels at 1/2, 1/4 and 1/8 resolution (multiples of 8 for GroupNorm(8); the first a
            multiple of 16, since the full-resolution stem has half of it).
        num_points: landmarks per face (68, iBUG).
    """

    def __init__(self, size: int = 64, widths: tuple[int, int, int] = DEFAULT_WIDTHS,
                 num_points: int = NUM_LANDMARKS):
        super().__init__()
        if size % 8:
            raise ValueError(f"probe size must be a multiple of 8, got {size}")
        if len(widths) != 3 or any(w % 8 for w in widths) or widths[0] % 16:
            raise ValueError(f"widths must be 3 multiples of 8, the first of 16; got {widths}")
        self.size, self.widths, self.num_points = int(size), tuple(int(w) for w in widths), int(num_points)
        a, b, c = self.widths
        self.enc1 = nn.Sequential(_conv(3, a // 2), _conv(a // 2, a, 2), _conv(a, a))  # 1/2
        self.enc2 = nn.Sequential(_conv(a, b, 2), _conv(b, b))  # 1/4
        self.enc3 = nn.Sequential(_conv(b, c, 2), _conv(c, c))  # 1/8: receptive field covers the face
        self.dec2 = _conv(c + b, b)
        self.dec1 = _conv(b + a, a)
        self.head = nn.Conv2d(a, num_points, 1)
        # Heatmap cell j covers input pixels [2j, 2j + 2), centre 2j + 1 in the landmark convention
        # (pixel (i, j) spans [j, j + 1) x [i, i + 1), portrait.data.landmarks).
        centres = torch.arange(size // 2, dtype=torch.float32) * 2.0 + 1.0
        self.register_buffer("centres", centres, persistent=False)

    def config(self) -> dict:
        """JSON-able constructor arguments (saved next to the weights; no class paths, DESIGN §3.3)."""
        return {"size": self.size, "widths": list(self.widths), "num_points": self.num_points}

    def heatmap_logits(self, frames: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] -> logits ``(N, P, H/2, W/2)``."""
        x = (frames - 0.5) * 4.0  # roughly zero-mean, unit-variance input
        s1 = self.enc1(x)
        s2 = self.enc2(s1)
        s3 = self.enc3(s2)
        u = self.dec2(torch.cat([F.interpolate(s3, scale_factor=2.0, mode="nearest"), s2], 1))
        u = self.dec1(torch.cat([F.interpolate(u, scale_factor=2.0, mode="nearest"), s1], 1))
        return self.head(u)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Landmarks of each frame.

        Args:
            frames: ``(N, 3, size, size)`` float in [0, 1].

        Returns:
            ``(N, P, 2)`` (x, y) in pixels of the input.
        """
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected frames (N, 3, H, W), got {tuple(frames.shape)}")
        if frames.shape[-2:] != (self.size, self.size):
            raise ValueError(
                f"this probe reads {self.size}x{self.size} frames, got {tuple(frames.shape[-2:])}; "
                "use predict_video_landmarks, which resizes"
            )
        return self.soft_argmax(self.heatmap_logits(frames))

    def soft_argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Heatmap logits ``(N, P, h, w)`` -> expected cell centre ``(N, P, 2)`` (x, y) in input pixels."""
        n, p, h, w = logits.shape
        prob = logits.flatten(2).softmax(-1).view(n, p, h, w)
        # Soft-argmax = expectation of the cell centre under the heatmap (Sun et al. 2018's integral
        # regression), taken separably over the marginals.
        x = (prob.sum(2) * self.centres).sum(-1)
        y = (prob.sum(3) * self.centres).sum(-1)
        return torch.stack([x, y], -1)


def probe_loss(probe: LandmarkProbe, frames: torch.Tensor, landmarks: torch.Tensor,
               heatmap_weight: float = 3.0, heatmap_sigma: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Training loss: NME-style L1 on the soft-argmax landmarks + a Gaussian heatmap prior.

    - L1 point error in inter-ocular units, i.e. the NME we report, made robust (Sun et al. 2018
      found L1 better than L2 for integral regression).
    - Cross-entropy of each softmax heatmap to a Gaussian of ``heatmap_sigma`` cells at the true
      point: soft-argmax alone leaves the heatmap's shape free and converges slowly from a uniform
      map; a Gaussian-shaped prior is the DSNT regulariser (Nibali et al. 2018, "Numerical Coordinate
      Regression with Convolutional Neural Networks"), here as cross-entropy instead of their
      Jensen-Shannon divergence. Measured here (300 clips, 400 steps): held-out NME 0.217 without
      it, 0.093 at weight 0.1, 0.072 at weight 1; at 800 steps 0.055 at weight 1, 0.053 at weight 3.

    Args:
        frames: ``(N, 3, S, S)`` in [0, 1]; landmarks ``(N, 68, 2)`` pixels.

    Returns:
        ``(loss, {"nme": ..., "heatmap_ce": ...})`` with detached float parts.
    """
    logits = probe.heatmap_logits(frames)
    pred = probe.soft_argmax(logits)
    iod = torch.from_numpy(inter_ocular_distance(landmarks.numpy())).float().clamp(min=1.0)
    nme = ((pred - landmarks).norm(dim=-1) / iod[:, None]).mean()
    l1 = ((pred - landmarks).abs().sum(-1) / iod[:, None]).mean()
    cells = probe.centres  # heatmap cell centres in pixels, (S/2,), 2 px apart
    var = 2 * (heatmap_sigma * 2.0) ** 2
    gx = torch.exp(-((cells - landmarks[..., :1]) ** 2) / var)  # (N, P, S/2), separable Gaussian
    gy = torch.exp(-((cells - landmarks[..., 1:]) ** 2) / var)
    target = (gy[..., :, None] * gx[..., None, :]).flatten(2)
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-12)
    ce = -(target * logits.flatten(2).log_softmax(-1)).sum(-1).mean()
    loss = l1 + heatmap_weight * ce
    return loss, {"nme": nme.item(), "heatmap_ce": ce.item()}


def predict_video_landmarks(probe: LandmarkProbe, video: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Run the probe on every frame of a video of any size.

    Frames that are not ``probe.size`` square are resized (bilinear, antialiased) and the landmarks
    scaled back; with the corner pixel convention the scaling is exact: x_orig = x * W / size.

    Args:
        probe: a :class:`LandmarkProbe`.
        video: ``(F, 3, H, W)`` float in [0, 1] (use ``infer.metrics.to_video_tensor`` for uint8).
        batch_size: frames per forward pass.

    Returns:
        float32 ``(F, 68, 2)`` (x, y) pixels of ``video``, on ``video``'s device.
    """
    if not isinstance(video, torch.Tensor) or not video.is_floating_point() or video.dim() != 4 \
            or video.shape[1] != 3:
        raise ValueError("video must be a float tensor (F, 3, H, W) in [0, 1]")
    device = next(probe.parameters()).device
    height, width = video.shape[-2:]
    scale = torch.tensor([width / probe.size, height / probe.size], device=video.device)
    was_training = probe.training
    probe.eval()  # GroupNorm makes this a no-op today; kept so a future BatchNorm cannot leak batch stats
    out = []
    try:
        with torch.no_grad():
            for chunk in video.split(batch_size):
                chunk = chunk.to(device, torch.float32)
                if (height, width) != (probe.size, probe.size):
                    chunk = F.interpolate(chunk, size=(probe.size, probe.size), mode="bilinear",
                                          align_corners=False, antialias=True)
                out.append(probe(chunk).to(video.device))
    finally:
        probe.train(was_training)
    return torch.cat(out) * scale


# ----------------------------------------------------------------------------------------------------
# Save / load: a folder of safetensors + config.json (+ metrics.json, README.md), written atomically
# ----------------------------------------------------------------------------------------------------

def _is_probe_folder(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_probe(probe: LandmarkProbe, out_dir: str | Path, metrics: dict | None = None,
               card: str | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``metrics.json``, ``README.md``) to ``out_dir``.

    Atomic: everything is written into a temporary sibling folder that then replaces ``out_dir`` with
    ``os.replace``, so a reader never sees a half-written probe. An existing ``out_dir`` is only
    replaced if it is empty or is itself a probe folder (never someone's unrelated directory).

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or _is_probe_folder(out_dir))):
        raise FileExistsError(f"{out_dir} exists and is not a landmark probe folder; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; the shipped probe must be readable by all
        state = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, **probe.config()}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if metrics is not None:
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        if card is not None:
            (tmp / CARD_FILE).write_text(card)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # safetensors writes 0600 files
        if out_dir.exists():
            # Directories cannot be os.replace'd onto a non-empty one: move the old one aside first.
            old = tmp.with_name(tmp.name + ".old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_probe(path: str | Path | None = None, device: str | torch.device = "cpu") -> LandmarkProbe:
    """Load a probe folder written by :func:`save_probe` (default: the shipped ``landmark_probe_64``).

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its ``model.safetensors`` is missing.
        ValueError: a file is corrupt, not a landmark probe, or its weights do not fit its config.
    """
    path = DEFAULT_PROBE_DIR if path is None else Path(path)
    hint = "train one with `python -m portrait.models.landmark_probe --out DIR`"
    if not path.is_dir():
        raise FileNotFoundError(f"no landmark probe folder at {path} ({hint})")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"landmark probe folder {path} has no {name} ({hint})")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt {path / CONFIG_FILE}: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE} is not a landmark probe config (format != {FORMAT!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has probe format version {config.get('format_version')}; "
                         f"this code reads version {FORMAT_VERSION}")
    try:
        probe = LandmarkProbe(size=config["size"], widths=tuple(config["widths"]), num_points=config["num_points"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"invalid landmark probe config {path / CONFIG_FILE}: {e!r}") from None
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt weights file {path / WEIGHTS_FILE}: {e}") from None
    expected = probe.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"weights in {path / WEIGHTS_FILE} do not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    probe.load_state_dict(state)
    return probe.to(device).eval()


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

def probe_identities(split: str, count: int, seed: int) -> list[int]:
    """``count`` identity seeds for the probe's ``split`` ("train" or "heldout").

    Drawn from the probe's own namespaces of ``portrait.data.dataset.stable_id`` (the generator's
    identities are ``stable_id("fastportrait/synthetic/identity", ...)``), so the probe's train and
    held-out faces are disjoint from each other AND from every generated dataset's identities: the
    probe never saw a face that a model is benchmarked on.
    """
    from portrait.data.dataset import stable_id  # training-only; pulls in `datasets`

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [stable_id(f"fastportrait/landmark_probe/{split}", seed, i) for i in range(count)]


def _make_frames(identities: list[int], num_frames: int, size: int, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate one clip per identity: uint8 frames ``(N*F, H, W, 3)``, landmarks ``(N*F, 68, 2)``.

    The motion seed is derived from the identity, so the frames are a pure function of the identities.
    """
    from portrait.data.dataset import stable_id
    from portrait.data.synthetic import generate_clip  # training-only dependency

    frames, landmarks = [], []
    for identity in tqdm(identities, desc=desc, unit="clip", leave=False):
        clip = generate_clip(identity, stable_id("fastportrait/landmark_probe/motion", identity),
                             num_frames=num_frames, size=size)
        frames.append(torch.from_numpy(clip["frames"]))
        landmarks.append(torch.from_numpy(clip["landmarks"]).float())
    return torch.cat(frames), torch.cat(landmarks)


def _to_float(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [0, 1]."""
    return frames_u8.permute(0, 3, 1, 2).float().div_(255.0)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Blur each image of ``x`` ``(N, C, H, W)`` with its own Gaussian ``sigma`` ``(N,)`` (0 = identity)."""
    n, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(t[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    g = g / g.sum(1, keepdim=True)  # (N, K); sigma -> 0 gives a delta
    k = g.repeat_interleave(c, 0)  # one separable kernel per (image, channel), applied as groups
    y = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.view(n, c, h, w)


def augment(frames: torch.Tensor, landmarks: torch.Tensor, gen: torch.Generator,
            max_shift: float = 0.08, max_rot_deg: float = 10.0, max_log_scale: float = 0.1
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-preserving augmentation of a batch.

    - a random similarity transform (rotation, scale, shift) applied to the image by ``grid_sample`` and
      to the landmarks exactly, so head poses outside the generator's range still read correctly;
    - brightness, contrast and per-channel gain jitter (diffusion outputs drift in colour);
    - Gaussian blur with sigma in [0, 1.5] px on half the batch (VAE-decoded frames are soft);
    - Gaussian noise with std up to 0.03.

    Args:
        frames: ``(N, 3, S, S)`` in [0, 1]; landmarks ``(N, 68, 2)`` pixels.

    Returns:
        augmented ``(frames, landmarks)`` of the same shapes.
    """
    n, _, h, w = frames.shape

    def u(*shape):  # uniform in [-1, 1)
        return torch.rand(*shape, generator=gen) * 2 - 1

    # Similarity transform in normalised coordinates (grid_sample, align_corners=False: u = 2x/W - 1).
    angle = u(n) * math.radians(max_rot_deg)
    scale = torch.exp(u(n) * max_log_scale)
    shift = u(n, 2) * 2 * max_shift
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    fwd = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (N, 2, 2): in -> out
    inv = torch.linalg.inv(fwd)
    # affine_grid needs out -> in: q = inv (p - shift).
    theta = torch.cat([inv, -(inv @ shift[..., None])], -1)
    grid = F.affine_grid(theta, (n, 3, h, w), align_corners=False)
    frames = F.grid_sample(frames, grid, mode="bilinear", padding_mode="border", align_corners=False)
    wh = torch.tensor([w, h], dtype=landmarks.dtype)
    q = landmarks / wh * 2 - 1
    landmarks = ((q @ fwd.transpose(1, 2) + shift[:, None]) + 1) / 2 * wh

    mean = frames.mean((1, 2, 3), keepdim=True)
    contrast = 1 + 0.3 * u(n, 1, 1, 1)
    gain = 1 + 0.08 * u(n, 3, 1, 1)
    frames = ((frames - mean) * contrast + mean) * gain + 0.1 * u(n, 1, 1, 1)
    sigma = torch.rand(n, generator=gen) * 1.5 * (torch.rand(n, generator=gen) < 0.5)
    frames = _gaussian_blur(frames, sigma)
    frames = frames + torch.randn(frames.shape, generator=gen) * 0.03 * torch.rand(n, 1, 1, 1, generator=gen)
    return frames.clamp(0, 1), landmarks


def _nme(pred: torch.Tensor, gt: torch.Tensor) -> float:
    from infer.metrics import landmark_error  # lazy: infer builds on portrait

    return landmark_error(pred, gt)


def train_probe(out_dir: str | Path, num_clips: int = 1000, size: int = 64, steps: int = 3000,
                batch_size: int = 32, seed: int = 0, lr: float = 3e-3, num_frames: int = 16,
                eval_clips: int = 48, widths: tuple[int, int, int] = DEFAULT_WIDTHS,
                heatmap_weight: float = 3.0, heatmap_sigma: float = 1.0,
                command: str | None = None, progress: bool = True) -> dict:
    """Train a probe on its train identities, score it on held-out identities, save it to ``out_dir``.

    Args:
        out_dir: probe folder to write (replaced atomically, see :func:`save_probe`).
        num_clips: training clips, one train identity each, ``num_frames`` frames each.
        size: frame size in pixels.
        steps: optimiser steps (AdamW, 5 % warm-up then cosine decay).
        batch_size: frames per step, drawn uniformly from all training frames.
        seed: seeds identities' choice, motions, init and augmentation.
        eval_clips: held-out clips, one held-out identity each (see :func:`probe_identities`).
        command: the launch command, recorded in ``metrics.json`` and the card.
        progress: show tqdm bars.

    Runs with the caller's ``torch.get_num_threads()`` (the CLI's ``--threads`` sets it).

    Returns:
        the metrics dict written to ``out_dir/metrics.json``: held-out NME (clean and blurred), the
        "copy first frame" and "mean shape" baselines, train time, sizes and seeds.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t_start = time.perf_counter()

    # 1. data: disjoint identity sets, so the held-out NME measures faces the probe never saw.
    train_u8, train_lmk = _make_frames(probe_identities("train", num_clips, seed), num_frames, size, "train clips")
    test_u8, test_lmk = _make_frames(probe_identities("heldout", eval_clips, seed), num_frames, size,
                                     "held-out clips")
    t_data = time.perf_counter() - t_start

    # 2. model and optimiser
    probe = LandmarkProbe(size=size, widths=widths)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

    # 3. loop
    t_train, cpu_train = time.perf_counter(), time.process_time()
    probe.train()
    bar = tqdm(range(steps), desc="probe", unit="step", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(train_u8), (batch_size,), generator=gen)
        frames, lmk = augment(_to_float(train_u8[idx]), train_lmk[idx], gen)
        loss, parts = probe_loss(probe, frames, lmk, heatmap_weight, heatmap_sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(nme=f"{parts['nme']:.4f}", ce=f"{parts['heatmap_ce']:.3f}", refresh=False)
    t_train, cpu_train = time.perf_counter() - t_train, time.process_time() - cpu_train

    # 4. held-out evaluation
    test_frames = _to_float(test_u8)
    pred_clean = predict_video_landmarks(probe, test_frames)
    pred_blur = predict_video_landmarks(probe, _gaussian_blur(test_frames, torch.ones(len(test_frames))))
    lmk_clips = test_lmk.view(eval_clips, num_frames, NUM_LANDMARKS, 2)
    first = lmk_clips[:, :1].expand_as(lmk_clips)
    mean_shape = train_lmk.mean(0).expand_as(test_lmk)
    metrics = {
        "heldout_nme": _nme(pred_clean, test_lmk),
        "heldout_nme_blur_sigma1": _nme(pred_blur, test_lmk),
        # Baselines for scale: frame 0's true landmarks for every later frame of its clip (what a probe
        # that ignored motion would at best score), and the mean training shape for every frame.
        "baseline_copy_first_frame_nme": _nme(first[:, 1:].reshape(-1, NUM_LANDMARKS, 2),
                                              lmk_clips[:, 1:].reshape(-1, NUM_LANDMARKS, 2)),
        "baseline_mean_shape_nme": _nme(mean_shape, test_lmk),
        "nme_normaliser": "distance between the eye centres (portrait.data.landmarks.inter_ocular_distance)",
        "train_seconds": round(t_train, 1),
        # CPU time next to wall time: on a shared machine the wall time says more about the neighbours.
        "train_cpu_seconds": round(cpu_train, 1),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "data_seconds": round(t_data, 1),
        "threads": torch.get_num_threads(),
        "train_clips": num_clips, "heldout_clips": eval_clips, "num_frames": num_frames, "size": size,
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "heatmap_weight": heatmap_weight,
        "params": sum(p.numel() for p in probe.parameters()),
        "command": command,
    }
    card = (
        f"# Landmark probe ({size} px)\n\n"
        "Reads the 68 iBUG landmarks off a portrait frame; `portrait/models/landmark_probe.py` has the\n"
        "architecture and `load_probe` / `predict_video_landmarks`. Trained on synthetic train identities\n"
        "only, scored on held-out identities. NME is normalised by the eye-centre distance.\n\n"
        f"Command: `{command}`\n\n"
        "| metric | value |\n|---|---|\n"
        + "".join(f"| {k} | {v} |\n" for k, v in metrics.items() if k != "command")
    )
    save_probe(probe, out_dir, metrics=metrics, card=card)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m portrait.models.landmark_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="probe folder to write")
    parser.add_argument("--clips", type=int, default=1000, help="training clips (one train identity each)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-clips", type=int, default=48, help="held-out clips (one held-out identity each)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: all cores this process may use). On a machine other "
                             "jobs share, 1 is faster: with 2 threads on 2 busy cores OpenMP's barriers made a "
                             "step ~9x slower here (1.5 s vs 0.16 s at batch 32)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    command = "python -m portrait.models.landmark_probe " + " ".join(sys.argv[1:] if argv is None else argv)
    metrics = train_probe(args.out, num_clips=args.clips, size=args.size, steps=args.steps,
                          batch_size=args.batch_size, seed=args.seed, eval_clips=args.eval_clips,
                          command=command)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
