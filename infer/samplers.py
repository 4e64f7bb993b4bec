"""Samplers: plain functions with one signature (DESIGN §3.6, after k-diffusion's ``sampling.py``).

    latents = sampler(model_fn, latents, scheduler, steps, generator=None, progress=None)

* ``model_fn(x, t) -> prediction`` evaluates the (possibly guided, possibly windowed) model on the
  whole latent video x (B, 4, F, h, w) at integer timestep t and returns the scheduler's prediction type
  (v for the teacher). The teacher and every student are called through this same interface.
* ``scheduler`` is a diffusers scheduler instance whose config fixes the noise schedule.
* The sampler owns the timestep grid and the update rule, nothing else.

Samplers are registered by name in :data:`SAMPLERS`. A sampler may take keyword-only options after the
common signature (always with defaults, so the one signature still calls it); :func:`get_sampler` binds the
ones a model folder records (``metadata["sampler_options"]``) and drops those the sampler does not take.

* ``ddim``: the teacher's sampler, and the guidance-distilled student's at any step count.
* ``lcm``: multistep consistency sampling (Luo et al. 2023, Alg. 3) for ``mode: lcm`` students.
* ``phased``: deterministic phase-to-phase jumps (Wang et al. 2024) for ``mode: phased`` students.

Students' timestep grids (``distill.schedules.student_timesteps``): k points ``G[floor(j N / k)]`` of the N-point
trailing solver grid G the student was distilled on (``solver_steps``, default 50): k=1 -> [999];
k=2 -> [999, 499]; k=4 -> [999, 759, 499, 259].
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler

from distill.schedules import SolverGrid, consistency_lcm, ddim_jump, predicted_x0_eps, student_timesteps

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


def _noise_like(latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # drawn on the CPU (as the pipeline's initial noise), so a seed gives the same video on every device
    return torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)


def lcm(model_fn: ModelFn, latents: torch.Tensor, scheduler: DDIMScheduler, steps: int,
        generator: torch.Generator | None = None, progress: Callable | None = None, *,
        solver_steps: int = 50, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> torch.Tensor:
    """Multistep latent-consistency sampling (LCM, Luo et al. 2023, Alg. 3) with re-noising.

    At each student timestep t_j: x0_hat = c_skip(t_j) x + c_out(t_j) x0(model_fn(x, t_j)) (boundary scalings,
    ``distill.schedules.consistency_lcm``); unless it is the last step, re-noise to the next timestep with
    fresh noise from ``generator``: x = sqrt(a_{j+1}) x0_hat + sqrt(1 - a_{j+1}) eps. Returns the last x0_hat.
    ``solver_steps``/``sigma_data``/``timestep_scaling`` must be the student's (its folder records them).
    """
    grid = SolverGrid.from_scheduler(scheduler, solver_steps)
    timesteps = student_timesteps(steps, grid).to(latents.device)
    it = progress(timesteps) if progress else timesteps
    x = latents
    for j, t in enumerate(it):
        x0 = consistency_lcm(model_fn(x, t), x, t, grid, sigma_data, timestep_scaling).to(latents.dtype)
        if j + 1 < len(timesteps):
            x = ddim_jump(x0, _noise_like(x0, generator), grid.alpha(timesteps[j + 1])).to(latents.dtype)
        else:
            x = x0
    return x


def phased(model_fn: ModelFn, latents: torch.Tensor, scheduler: DDIMScheduler, steps: int,
           generator: torch.Generator | None = None, progress: Callable | None = None, *,
           solver_steps: int = 50) -> torch.Tensor:
    """Deterministic phased sampling (PCM, Wang et al. 2024): DDIM jumps between consecutive phase edges.

    Edges are the student grid for ``steps`` plus the clean end; from each edge t_j the model's (x0, eps)
    are moved to t_{j+1} (to x0 at the end). A K-phase student sampled with ``steps = K`` jumps exactly from
    phase edge to phase edge. With ``solver_steps == steps`` this is exactly :func:`ddim` (tested).
    ``generator`` is unused (deterministic).
    """
    grid = SolverGrid.from_scheduler(scheduler, solver_steps)
    timesteps = student_timesteps(steps, grid).to(latents.device)
    it = progress(timesteps) if progress else timesteps
    x = latents
    for j, t in enumerate(it):
        x0, eps = predicted_x0_eps(model_fn(x, t).float(), x.float(), grid.alpha(t), grid.prediction_type)
        t_next = timesteps[j + 1] if j + 1 < len(timesteps) else torch.tensor(-1)
        x = ddim_jump(x0, eps, grid.alpha(t_next)).to(latents.dtype)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": ddim, "lcm": lcm, "phased": phased}


def sampler_option_names(fn: Callable) -> set[str]:
    """The keyword-only options a sampler takes beyond the common signature."""
    return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def get_sampler(name: str, **options) -> Callable[..., torch.Tensor]:
    """The sampler ``name`` with those ``options`` it accepts bound (others are ignored: a folder's options
    for one sampler must not break another the user picks)."""
    try:
        fn = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
    accepted = sampler_option_names(fn)
    bound = {k: v for k, v in options.items() if k in accepted}
    return functools.partial(fn, **bound) if bound else fn
