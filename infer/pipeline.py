"""Reference image + pose frames -> video frames, faithful to AniPortrait's long-video pipeline.

    pipe = Pose2VideoPipeline(Pose2VideoModel.from_pretrained(path))
    frames = pipe(ref_image, pose_frames, GenerationConfig(steps=25, guidance=3.5), generator)

The loop (AniPortrait ``pipeline_pose2vid_long.py``): the reference UNet runs once at t=0; every DDIM step
loops over 16-frame context windows (overlap 4), evaluates the guided denoising UNet on each, averages the
predictions of overlapping frames, and takes one scheduler step on the whole latent video.

Lossless fixes over upstream (``legacy_loop=False``, the default):
  * the pose guider runs once per window, not once per step (its inputs never change);
  * the two CFG halves are one batched UNet call;
  * the VAE decodes ``decode_batch_size`` frames per call instead of one.
``Pose2VideoPipeline(model, decoder=FOLDER)`` decodes with a distilled tiny (TAESD-architecture) decoder instead of the
KL VAE's (``portrait/models/tiny_decoder.py``): not lossless, measured in the benchmark's ``decoder`` rows.
``legacy_loop=True`` reproduces the wasteful loop (the benchmark's "as shipped" row); with the same noise both
give the same frames to float tolerance (tested).

Keyframed generation (issue 6): diffusion on keyframes only, a frame interpolator in between::

    from portrait.models.interpolator import load_interpolator
    pipe = Pose2VideoPipeline(model, interpolator=load_interpolator("runs/interpolator/tiny/model"))  # or "blend"
    frames = pipe(ref, pose, GenerationConfig(keyframes="fixed:3"), generator, landmarks=lmk)   # (N, 3, H, W)
    pipe.last_keyframes                                                                         # [0, 3, 6, ..., N-1]

* ``GenerationConfig.keyframes``: ``"none"`` (default: every frame diffused, exactly the code path above),
  ``"fixed:K"`` or ``"adaptive:EPS[:max_gap=G]"`` (``infer/keyframes.py``; adaptive needs ``landmarks``).
* ``interpolator``: a ``FrameInterpolator``, ``LinearBlend``, a folder path or ``"blend"``, given to the
  constructor or per call (``pipe(..., interpolator=...)``). ``GenerationConfig.interpolator_landmarks=False`` runs it
  landmark-blind. Any model folder works (teacher, student, pruned): only the keyframe pass touches it.
* ``landmarks``: optional ``(N, 68, 2)`` pixels of the model resolution (the pose images' landmarks); needed for
  adaptive selection and used by the interpolator's flow prior (without them it reads the pose images only).
* Noise: the full-rate ``(1, C, N, h, w)`` noise is drawn (or given as ``latents``) and the keyframes' columns are
  used, so keyframe i gets exactly the noise it would get in the full-rate run with the same generator.
* The output always has exactly N frames (the last frame is always a keyframe, so N need not be divisible by K).

How the motion module sees subsampled keyframes: the keyframe poses go through the same 16-frame context windows
(overlap 4) as any pose sequence, so the temporal attention sees *consecutive keyframes as consecutive frames*: its
sinusoidal position encoding indexes the position within the window, not time, and nothing tells it the stride.
With ``fixed:K`` the motion per window step is K times the source's. Our tiny teacher was trained with strides 1 and
2 (upstream AniPortrait: 1, or 4 as augmentation), so K = 2 is inside the tiny teacher's training distribution,
K = 3 and 4 are beyond it (upstream: K = 4 is inside, 2-3 between its strides). Adaptive keyframes are irregularly
spaced, which no stride augmentation covers; in exchange they sit on the mouth / eye extremes. A window of 16
keyframes spans 16 K source frames, so each frame sees a longer temporal context than at full rate.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from infer.samplers import get_sampler
from portrait.models.bundle import Pose2VideoModel
from portrait.models.guidance import guidance_embedding


@dataclass
class GenerationConfig:
    steps: int = 25
    guidance: float = 3.5
    sampler: str | None = None  # None: the model folder's default (metadata["sampler"]; "ddim" for the teacher)
    context_frames: int = 16
    context_overlap: int = 4
    legacy_loop: bool = False
    decode_batch_size: int = 16
    keyframes: str = "none"  # "none" | "fixed:K" | "adaptive:EPS[:max_gap=G]" (infer/keyframes.py)
    interpolator_landmarks: bool = True  # False: run the interpolator landmark-blind
    interpolator_batch_size: int = 32  # in-between frames per interpolator call


def context_windows(num_frames: int, context: int = 16, overlap: int = 4) -> list[list[int]]:
    """Overlapping windows covering ``range(num_frames)``; the last one is aligned to the end.

    One window when the video fits. Every frame is in >= 1 window; consecutive windows share ``overlap``
    frames (the last may share more, so no window is ever shorter than ``context``).
    """
    if num_frames <= 0:
        raise ValueError("num_frames must be positive")
    if overlap >= context:
        raise ValueError(f"context_overlap ({overlap}) must be smaller than context_frames ({context})")
    if num_frames <= context:
        return [list(range(num_frames))]
    stride = context - overlap
    starts = list(range(0, num_frames - context + 1, stride))
    if starts[-1] + context < num_frames:
        starts.append(num_frames - context)
    return [list(range(s, s + context)) for s in starts]


def to_float_images(x, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) / (H, W, 3) arrays or float (N, 3, H, W) tensors in [0,1] -> float (N, 3, H, W) in [0, 1].

    Images of another size are resized (bilinear, antialiased), never rejected.
    """
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 (H, W, 3), got {x.dtype}")
        t = torch.from_numpy(np.array(x, copy=True))  # decoded frames may be read-only
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image arrays must be (N, H, W, 3), got shape {tuple(x.shape)}")
        t = t[..., :3].permute(0, 3, 1, 2).float() / 255.0
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
    else:
        t = x.float()
        if t.ndim == 3:
            t = t[None]
    if size is not None and tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return t


@dataclass
class Prepared:
    """Everything the denoising loop needs, computed once per video."""

    pose: torch.Tensor  # (1, 3, F, H, W) in [-1, 1]
    cond: torch.Tensor  # (1, 1, D) CLIP image embeds
    uncond: torch.Tensor  # (1, 1, D) zeros
    bank_cond: dict
    bank_uncond: dict | None  # None: the uncond half uses plain self-attention (upstream)


class Pose2VideoPipeline:
    """Inference for the teacher and every reduced model (students, pruned, keyframed)."""

    def __init__(self, model: Pose2VideoModel, interpolator=None, decoder=None):
        """``interpolator``: None, a ``FrameInterpolator`` / ``LinearBlend``, a folder path or ``"blend"``; used only
        when ``GenerationConfig.keyframes`` is not ``"none"``.
        ``decoder``: None (the model's KL VAE decoder) or a distilled tiny decoder (``AutoencoderTiny`` or its
        folder, ``portrait/models/tiny_decoder.py``) that replaces it; checked against the model's latent space."""
        from portrait.models.tiny_decoder import check_compatible, load_tiny_decoder

        self.model = model
        self.interpolator = interpolator
        self.decoder = None
        if decoder is not None:
            self.decoder = load_tiny_decoder(decoder, device=model.device, dtype=model.dtype)
            check_compatible(self.decoder, model, name=str(decoder) if isinstance(decoder, (str, os.PathLike)) else "decoder")
        self.counters = {"unet_evals": 0, "pose_guider_calls": 0, "vae_decode_calls": 0, "interpolated_frames": 0}
        self.last_keyframes: list[int] | None = None  # the keyframe indices of the last call (all frames if "none")

    # -- preparation -----------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, ref_image, pose_frames, guided: bool) -> Prepared:
        m = self.model
        res = (m.config.resolution, m.config.resolution)
        ref = to_float_images(ref_image, res).to(m.device)
        pose = to_float_images(pose_frames, res).to(m.device)
        if pose.shape[0] == 0:
            raise ValueError("no pose frames: the pose input must hold at least one frame")
        ref_latents = m.encode_images(ref * 2 - 1)
        cond = m.encode_reference_embeds(ref)
        uncond = torch.zeros_like(cond)
        bank_uncond = None
        if guided and m.config.uncond_reference == "zero_embed":
            both = m.compute_bank(torch.cat([ref_latents, ref_latents]), torch.cat([uncond, cond]))
            bank_uncond = {k: v[:1] for k, v in both.items()}
            bank_cond = {k: v[1:] for k, v in both.items()}
        else:
            bank_cond = m.compute_bank(ref_latents, cond)
        pose5 = (pose * 2 - 1).permute(1, 0, 2, 3)[None]  # (1, 3, F, H, W)
        return Prepared(pose5, cond, uncond, bank_cond, bank_uncond)

    # -- the model function the samplers call -----------------------------------------------------
    def model_fn(self, prep: Prepared, gen: GenerationConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        m = self.model
        num_frames = prep.pose.shape[2]
        windows = context_windows(num_frames, gen.context_frames, gen.context_overlap)
        students = m.config.time_cond_proj_dim is not None
        guided = gen.guidance > 1.0 and not students
        pose_cache: dict[int, list[torch.Tensor]] = {}
        w_cond = None
        if students:
            w_cond = guidance_embedding(torch.tensor([gen.guidance]), m.config.time_cond_proj_dim).to(m.device, m.dtype)

        def feats_for(wi: int, idx: list[int]) -> list[torch.Tensor]:
            if gen.legacy_loop or wi not in pose_cache:
                self.counters["pose_guider_calls"] += 1
                feats = m.pose_features(prep.pose[:, :, idx])
                if gen.legacy_loop:
                    return feats
                pose_cache[wi] = feats
            return pose_cache[wi]

        def evaluate(x: torch.Tensor, t: torch.Tensor, wi: int, idx: list[int]) -> torch.Tensor:
            feats = feats_for(wi, idx)
            if not guided:
                self.counters["unet_evals"] += 1
                return m.denoise(x, t, prep.cond, feats, prep.bank_cond, timestep_cond=w_cond)
            if gen.legacy_loop:
                # Upstream-style: two separate UNet calls, pose features recomputed for each half.
                self.counters["unet_evals"] += 2
                v_u = m.denoise(x, t, prep.uncond, feats, prep.bank_uncond)
                v_c = m.denoise(x, t, prep.cond, feats_for(wi, idx), prep.bank_cond)
            else:
                self.counters["unet_evals"] += 2
                if prep.bank_uncond is not None:
                    bank = {k: torch.cat([prep.bank_uncond[k], v]) for k, v in prep.bank_cond.items()}
                    active = None
                else:
                    bank = {k: torch.cat([v, v]) for k, v in prep.bank_cond.items()}
                    active = torch.tensor([False, True], device=x.device)
                feats2 = [torch.cat([f, f]) for f in feats]
                out = m.denoise(torch.cat([x, x]), t, torch.cat([prep.uncond, prep.cond]), feats2, bank, active=active)
                v_u, v_c = out.chunk(2)
            # CFG (Ho & Salimans 2022) in the usual convention; AniPortrait's default w=3.5.
            return v_u + gen.guidance * (v_c - v_u)

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if len(windows) == 1:
                return evaluate(x, t, 0, windows[0]).to(x.dtype)
            pred = torch.zeros_like(x)
            count = torch.zeros(num_frames, device=x.device, dtype=x.dtype)
            for wi, idx in enumerate(windows):
                pred[:, :, idx] += evaluate(x[:, :, idx], t, wi, idx).to(x.dtype)
                count[idx] += 1
            return pred / count.view(1, 1, -1, 1, 1)

        return fn

    # -- full generation --------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, ref_image, pose_frames, gen: GenerationConfig | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, progress: Callable | None = None, landmarks=None,
                 interpolator=None) -> torch.Tensor:
        """Generate frames.

        Args:
            ref_image: uint8 (H, W, 3) or float (3, H, W) in [0, 1]; resized to the model resolution.
            pose_frames: uint8 (F, H, W, 3) or float (F, 3, H, W) in [0, 1] pose images.
            latents: optional initial noise (1, 4, F, h, w); otherwise drawn from ``generator`` (on CPU, so the
                same seed gives the same noise on every device).
            landmarks: optional (F, 68, 2) landmarks in pixels of the model resolution (keyframed generation only).
            interpolator: overrides the constructor's for this call (keyframed generation only).
        Returns:
            (F, 3, H, W) float frames in [0, 1].
        """
        gen = gen or GenerationConfig()
        from infer.keyframes import parse_keyframes

        spec = parse_keyframes(gen.keyframes)
        if spec.mode != "none":
            return self._keyframed(ref_image, pose_frames, gen, spec, generator, latents, progress, landmarks,
                                   interpolator if interpolator is not None else self.interpolator)
        return self._generate(ref_image, pose_frames, gen, generator, latents, progress)

    def _keyframed(self, ref_image, pose_frames, gen: GenerationConfig, spec, generator, latents, progress, landmarks,
                   interpolator) -> torch.Tensor:
        """Diffusion on the keyframes (same windows, same per-frame noise), the interpolator in between."""
        import dataclasses

        from infer.keyframes import select_keyframes
        from portrait.models.interpolator import fill_between_keyframes, load_interpolator

        if interpolator is None:
            raise ValueError(f"keyframes={str(spec)!r} needs an interpolator: Pose2VideoPipeline(model, interpolator=...) with "
                             "an interpolator folder or 'blend' (CLI: --interpolator DIR|blend)")
        m = self.model
        res = (m.config.resolution, m.config.resolution)
        pose = to_float_images(pose_frames, res)
        n = pose.shape[0]
        if n == 0:
            raise ValueError("no pose frames: the pose input must hold at least one frame")
        lmk = None
        if landmarks is not None:
            lmk = torch.as_tensor(np.asarray(landmarks), dtype=torch.float32)
            if lmk.shape != (n, 68, 2):
                raise ValueError(f"landmarks must be ({n}, 68, 2) for {n} pose frames, got {tuple(lmk.shape)}")
        keys = select_keyframes(spec, n, None if lmk is None else lmk.numpy())
        h = m.config.resolution // m.vae_scale_factor
        if latents is None:
            latents = torch.randn((1, m.vae.config.latent_channels, n, h, h), generator=generator, dtype=torch.float32)
        if latents.shape[2] != n:
            raise ValueError(f"latents have {latents.shape[2]} frames for {n} pose frames")
        key_gen = dataclasses.replace(gen, keyframes="none")
        key_frames = self._generate(ref_image, pose[keys], key_gen, generator, latents[:, :, keys], progress)
        interp = load_interpolator(interpolator, device=key_frames.device)
        if isinstance(interpolator, (str, os.PathLike)):
            self.interpolator = interp  # load a folder once
        out = fill_between_keyframes(interp, key_frames, keys, pose.to(key_frames.device), lmk, gen.interpolator_landmarks,
                                     gen.interpolator_batch_size)
        self.counters["interpolated_frames"] += n - len(keys)
        self.last_keyframes = keys
        return out

    def _generate(self, ref_image, pose_frames, gen: GenerationConfig, generator, latents, progress) -> torch.Tensor:
        m = self.model
        guided = gen.guidance > 1.0 and m.config.time_cond_proj_dim is None
        prep = self.prepare(ref_image, pose_frames, guided)
        f = prep.pose.shape[2]
        h = m.config.resolution // m.vae_scale_factor
        if latents is None:
            latents = torch.randn((1, m.vae.config.latent_channels, f, h, h), generator=generator, dtype=torch.float32)
        latents = latents.to(m.device, torch.float32)
        scheduler = m.make_scheduler()
        sampler = get_sampler(self.sampler_name(gen), **m.metadata.get("sampler_options", {}))
        latents = sampler(self.model_fn(prep, gen), latents, scheduler, gen.steps, generator=generator, progress=progress)
        self.last_keyframes = list(range(f))
        return self.decode(latents, 1 if gen.legacy_loop else gen.decode_batch_size)

    def sampler_name(self, gen: GenerationConfig) -> str:
        """The sampler ``gen`` asks for, else the model's own (students record theirs), else ``ddim``."""
        return gen.sampler or self.model.metadata.get("sampler") or "ddim"

    def decode(self, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
        """UNet-space latents (1, C, F, h, w) -> frames (F, 3, H, W) in [0, 1], ``batch_size`` frames per call."""
        z = latents[0].permute(1, 0, 2, 3)  # (F, 4, h, w)
        self.counters["vae_decode_calls"] += -(-z.shape[0] // batch_size)
        if self.decoder is None:
            x = self.model.decode_latents(z, batch_size)
        else:
            from portrait.models.tiny_decoder import decode

            x = torch.cat([decode(self.decoder, z[i : i + batch_size]) for i in range(0, z.shape[0], batch_size)])
        return ((x.float() + 1) / 2).clamp(0, 1)
