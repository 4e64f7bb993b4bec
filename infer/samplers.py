"""Samplers: plain functions with one signature (DESIGN §3.6, after k-diffusion's ``sampling.py``).

    latents = sampler(model_fn, latents, scheduler, steps, generator=None, progress=None)

* ``model_fn(x, t) -> prediction`` evaluates the (possibly guided, possibly windowed) model on the
  whole latent video x (B, 4, F, h, w) at integer timestep t and returns the scheduler's prediction type
  (v for the teacher). The teacher and every student are called through this same interface.
* ``scheduler`` is a diffusers scheduler instance whose config fixes the noise schedule.
* The sampler owns the timestep grid and the update rule, nothing else.

Samplers are registered by name in :data:`SAMPLERS`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim(model_fn: ModelFn, latents: torch.Tensor, scheduler: DDIMScheduler, steps: int,
         generator: torch.Generator | None = None, progress: Callable | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta=0) on the scheduler's own grid (trailing spacing for the teacher).

    The update is diffusers' ``DDIMScheduler.step`` (Song et al. 2021, eq. 12 with sigma=0); with zero-SNR
    rescaling the first step starts at alpha_bar=0 where only v-prediction is well defined (Lin et al. 2024).
    """
    scheduler.set_timesteps(steps, device=latents.device)
    timesteps = scheduler.timesteps
    it = progress(timesteps) if progress else timesteps
    for t in it:
        pred = model_fn(latents, t)
        latents = scheduler.step(pred, t, latents, eta=0.0, return_dict=False)[0]
    return latents


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": ddim}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
