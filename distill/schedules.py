"""Step schedules and the closed-form maths shared by distillation (train/distill.py) and the samplers.

Everything is defined on the teacher's own noise schedule (DESIGN §1: linear betas, zero-terminal-SNR
rescale, v-prediction, trailing spacing), read from a diffusers ``DDIMScheduler``: ``alphas_cumprod[t]`` is
alpha_bar(t) for the integer training timesteps ``t = 0..T-1`` (T = 1000), and ``final_alpha_cumprod`` (1.0
with ``set_alpha_to_one``) is the clean end point that DDIM's last step lands on. We write that clean point
as timestep ``-1`` (:data:`CLEAN`).

**The solver grid** (LCM's "skipping-step" DDIM solver, Luo et al. 2023 §4.3): the N-point *trailing* grid
of the teacher's scheduler, ``DDIMScheduler.set_timesteps(N)``, descending, ``G = [T-1, T-1-k, ..., k-1]``
with skip ``k = T / N`` (N=50: 999, 979, ..., 19). The step from ``G[n]`` goes to ``G[n+1]``, and from the last
point to the clean end ``-1`` -- exactly what ``DDIMScheduler.step`` does (``prev = t - T // N``). We require
``T % N == 0`` so that DDIM's ``prev`` really walks its own grid.

**The student's grid for k steps** (:func:`student_timesteps`): ``G[floor(j N / k)]`` for ``j = 0..k-1``, i.e.
k points of the solver grid as evenly spread as the grid allows, always starting at ``T-1`` (pure noise,
alpha_bar = 0). N=50: k=1 -> [999]; k=2 -> [999, 499]; k=4 -> [999, 759, 499, 259]. When ``N`` is a multiple
of ``k`` this is the trailing k-grid itself (``set_timesteps(k)``). Phase boundaries of the multi-phase (PCM)
student are the same points plus the clean end (:func:`phase_boundaries`), so a K-phase student sampled with
K steps jumps exactly from one boundary to the next.

**Zero SNR.** alpha_bar(T-1) = 0, so x_T is pure noise and the epsilon-parameterised x0 = (x - sqrt(1-a) eps) /
sqrt(a) is undefined there; for v-prediction (Salimans & Ho 2022) x0 = sqrt(a) x - sqrt(1-a) v and
eps = sqrt(a) v + sqrt(1-a) x are well defined everywhere (at T-1: x0 = -v, eps = x). The teacher is
v-prediction; :func:`predicted_x0_eps` refuses epsilon-prediction at alpha_bar = 0 rather than divide by 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

CLEAN = -1  # the clean end point of the trajectory (alpha_bar = final_alpha_cumprod = 1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or scalar -> broadcastable against ``like`` (B, ...)."""
    v = v.to(like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim else v


@dataclass
class SolverGrid:
    """The N-point trailing DDIM grid of a scheduler (see the module docstring).

    Attributes:
        timesteps: (N,) int64, descending (``timesteps[0] == T-1``).
        alphas_cumprod: (T,) float32, the scheduler's alpha_bar(t).
        final_alpha: alpha_bar of the clean end point (1.0 for the teacher).
        prediction_type: the scheduler's (``"v_prediction"`` for the teacher).
    """

    timesteps: torch.Tensor
    alphas_cumprod: torch.Tensor
    final_alpha: float
    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler: DDIMScheduler, num_points: int) -> SolverGrid:
        t_train = scheduler.config.num_train_timesteps
        if num_points < 1 or t_train % num_points:
            raise ValueError(f"the solver grid size N={num_points} must divide num_train_timesteps={t_train} "
                             f"(so that DDIM's step walks its own grid); e.g. 50, 40, 25, 20, 10")
        if scheduler.config.timestep_spacing != "trailing":
            raise ValueError(f"the solver grid assumes trailing timestep spacing, got {scheduler.config.timestep_spacing!r}")
        ref = DDIMScheduler.from_config(scheduler.config)  # set_timesteps mutates; keep the caller's untouched
        ref.set_timesteps(num_points)
        return cls(ref.timesteps.clone().long(), ref.alphas_cumprod.clone().float(), float(ref.final_alpha_cumprod),
                   scheduler.config.prediction_type)

    @property
    def num_points(self) -> int:
        return int(self.timesteps.numel())

    @property
    def skip(self) -> int:
        return int(self.alphas_cumprod.numel()) // self.num_points

    def timestep(self, index: torch.Tensor) -> torch.Tensor:
        """Grid indices (B,) in ``[0, N]`` -> timesteps (B,); index N is the clean end (-1)."""
        index = index.long().cpu()
        padded = torch.cat([self.timesteps, torch.tensor([CLEAN])])
        return padded[index]

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps (B,) or scalar (``-1`` = clean) -> alpha_bar float32, on ``t``'s device."""
        t = torch.as_tensor(t)
        a = torch.where(t.cpu() < 0, torch.tensor(self.final_alpha), self.alphas_cumprod[t.cpu().clamp(min=0).long()])
        return a.to(t.device)


def student_timesteps(steps: int, grid: SolverGrid) -> torch.Tensor:
    """The k-step student grid: ``G[floor(j N / k)]``, j = 0..k-1 (descending, int64, starts at T-1)."""
    n = grid.num_points
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in [1, {n}] (the solver grid has {n} points), got {steps}")
    idx = torch.tensor([j * n // steps for j in range(steps)])
    return grid.timesteps[idx]


def phase_boundaries(num_phases: int, grid: SolverGrid) -> torch.Tensor:
    """Grid indices of the K+1 phase edges ``floor(m N / K)``, m = 0..K (the last, N, is the clean end)."""
    n = grid.num_points
    if not 1 <= num_phases <= n:
        raise ValueError(f"num_phases must be in [1, {n}], got {num_phases}")
    return torch.tensor([m * n // num_phases for m in range(num_phases + 1)])


def phase_end_index(index: torch.Tensor, num_phases: int, grid: SolverGrid) -> torch.Tensor:
    """Grid indices (B,) -> index of the lower-noise edge of the phase holding each (B,), in ``(index, N]``."""
    edges = phase_boundaries(num_phases, grid)
    # the phase m holds edges[m] <= n < edges[m+1]; its target ("start", lower-noise) boundary is edges[m+1].
    m = torch.searchsorted(edges, index.long().cpu(), right=True) - 1
    return edges[m + 1]


def predicted_x0_eps(pred: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output -> (x0, eps) at noise level alpha_bar (scalar or (B,)); x = sqrt(a) x0 + sqrt(1-a) eps.

    Same formulas as ``DDIMScheduler.step`` (DDIM eq. 12). pred, x: (B, C, F, h, w).
    """
    a = _bcast(alpha, x).to(torch.float32)
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "v_prediction":
        return sa * x - sb * pred, sa * pred + sb * x
    if prediction_type == "epsilon":
        if bool((a <= 0).any()):
            raise ValueError("epsilon-prediction has no x0 at alpha_bar=0 (zero terminal SNR); use v-prediction")
        return (x - sb * pred) / sa, pred
    if prediction_type == "sample":
        return pred, (x - sa * pred) / sb
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def ddim_jump(x0: torch.Tensor, eps: torch.Tensor, alpha_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM move to noise level ``alpha_to`` (scalar or (B,)): sqrt(a) x0 + sqrt(1-a) eps."""
    a = _bcast(alpha_to, x0).to(torch.float32)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """q(x_t | x0) with alpha_bar ``alpha`` (scalar or (B,)) -- ``DDPMScheduler.add_noise``."""
    return ddim_jump(x0, noise, alpha)


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's consistency-model boundary scalings (Song et al. 2023 eq. 4 as in LCM / diffusers).

    c_skip = sd^2 / ((s t)^2 + sd^2), c_out = s t / sqrt((s t)^2 + sd^2) with ``s = timestep_scaling`` on the
    integer timestep. At t = 0 (and the clean end t = -1, clamped to 0): c_skip = 1, c_out = 0, so the
    consistency function is the identity there. Returns float32 tensors shaped like ``t``.
    """
    st = timestep_scaling * torch.as_tensor(t).float().clamp(min=0)
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_lcm(pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor, grid: SolverGrid,
                    sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> torch.Tensor:
    """LCM's consistency function f(x, t) = c_skip(t) x + c_out(t) x0(pred) (pred: the raw, e.g. v, output)."""
    x0, _ = predicted_x0_eps(pred.float(), x.float(), grid.alpha(t), grid.prediction_type)
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling)
    return _bcast(c_skip, x) * x.float() + _bcast(c_out, x) * x0


def consistency_phased(pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor, grid: SolverGrid) -> torch.Tensor:
    """PCM's phased consistency function (Wang et al. 2024): a DDIM jump from t to the phase edge ``t_end``.

    f(x, t) = sqrt(a_end) x0 + sqrt(1 - a_end) eps with (x0, eps) from the model output at (x, t). It is the
    identity when ``t == t_end`` and equals x0 when ``t_end`` is the clean end (-1).
    """
    x0, eps = predicted_x0_eps(pred.float(), x.float(), grid.alpha(t), grid.prediction_type)
    return ddim_jump(x0, eps, grid.alpha(t_end))
