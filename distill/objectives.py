"""Distillation objectives as ``nn.Module`` wrappers (one forward per step for DDP / DeepSpeed).

Only the student bundle is a submodule; the frozen teacher and the EMA target live in a plain
:class:`~distill.models.FrozenNets` attribute, so ``accelerator.prepare`` never wraps, syncs or shards them.
Randomness is per sample (one generator per global sample id, ``portrait.training.sample_generator``) and the
pose guider runs per clip, so a sample's loss does not depend on how the global batch is split over processes.

* :class:`ConsistencyDistillLoss` -- latent consistency distillation (LCM, Luo et al. 2023, Alg. 1 with the
  guidance-augmented skipping-step DDIM solver) and its multi-phase variant (PCM, Wang et al. 2024):

      n ~ U{0..N-1}, w ~ U[w_min, w_max], x_n = sqrt(a_n) z + sqrt(1-a_n) eps          (z: data latents)
      x_{n+1} = DDIM(x_n, teacher_cfg(x_n, t_n, w); t_n -> t_{n+1})                      (no grad; t_N = clean)
      loss = d( f_theta(x_n, t_n, w), stopgrad f_target(x_{n+1}, t_{n+1}, w) )

  ``lcm``: f(x, t) = c_skip(t) x + c_out(t) x0(x, t) (boundary scalings, identity at t=0).
  ``phased``: f(x, t) = DDIM jump of the model's own (x0, eps) from t to the lower-noise edge of t's phase
  (identity on that edge, x0 in the last phase). d = pseudo-Huber sqrt(|a-b|^2 + c^2) - c (LCM, c=0.001) or L2.

* :class:`GuidanceDistillLoss` -- guidance distillation (Meng et al. 2023, stage 1): the w-conditioned student
  regresses the teacher's CFG output at the same (x_t, t, w), t ~ U{0..T-1}; one student evaluation then
  reproduces CFG at any step count with the ordinary DDIM sampler.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.models import Conditioning, FrozenNets, conditioning, guided_prediction, student_prediction
from distill.schedules import (
    SolverGrid,
    add_noise,
    consistency_lcm,
    consistency_phased,
    ddim_jump,
    phase_end_index,
    predicted_x0_eps,
)
from portrait.models.bundle import Pose2VideoModel
from portrait.objectives import per_sample_rand, per_sample_randn, to_unit

CONSISTENCY_MODES = ("lcm", "phased")
LOSSES = ("huber", "l2")


def distance(a: torch.Tensor, b: torch.Tensor, kind: str = "huber", huber_c: float = 0.001) -> torch.Tensor:
    """Mean pseudo-Huber (LCM / improved CT: sqrt((a-b)^2 + c^2) - c, elementwise) or mean squared error."""
    if kind == "huber":
        return (torch.sqrt((a.float() - b.float()) ** 2 + huber_c**2) - huber_c).mean()
    if kind == "l2":
        return torch.nn.functional.mse_loss(a.float(), b.float())
    raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")


class _DistillLoss(nn.Module):
    def __init__(self, model: Pose2VideoModel, nets: FrozenNets, grid: SolverGrid, w_range: tuple[float, float]):
        super().__init__()
        self.model = model  # the student bundle: the only submodule
        self.nets = nets  # plain dataclass, not an nn.Module: invisible to DDP / DeepSpeed / state_dict
        self.grid = grid
        self.w_min, self.w_max = float(w_range[0]), float(w_range[1])
        if self.w_min > self.w_max:
            raise ValueError(f"w range [{self.w_min}, {self.w_max}] is empty")

    def prepare_batch(self, batch: dict[str, torch.Tensor], generators: list[torch.Generator]) -> tuple[torch.Tensor, Conditioning]:
        """ClipDataset batch (uint8) -> (latents (B, 4, F, h, w), Conditioning); draws the posterior noise first."""
        m = self.model
        dev = m.device
        target = to_unit(batch["target"]).to(dev)  # (B, F, 3, H, W)
        b, f = target.shape[:2]
        h, w = target.shape[-2] // m.vae_scale_factor, target.shape[-1] // m.vae_scale_factor
        post_eps = per_sample_randn((m.vae.config.latent_channels, f, h, w), generators).to(dev)
        with torch.no_grad():
            dist = m.vae.encode(target.flatten(0, 1).to(m.vae.dtype)).latent_dist
            lat = (dist.mean + dist.std * post_eps.permute(0, 2, 1, 3, 4).flatten(0, 1).to(dist.mean.dtype)) * m.config.latent_scale
            latents = lat.unflatten(0, (b, f)).permute(0, 2, 1, 3, 4).float()
            ref01 = batch["ref_frame"].to(dev).float() / 255.0
            pose = to_unit(batch["pose"]).to(dev).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W)
            cond = conditioning(m, ref01, pose, guided=True)
        return latents, cond

    def sample_w(self, generators: list[torch.Generator]) -> torch.Tensor:
        return self.w_min + (self.w_max - self.w_min) * per_sample_rand(generators)


class ConsistencyDistillLoss(_DistillLoss):
    """LCM / PCM consistency distillation of the guided teacher into a w-conditioned student (see module doc)."""

    def __init__(self, model: Pose2VideoModel, nets: FrozenNets, grid: SolverGrid, mode: str = "lcm", num_phases: int = 1,
                 w_range: tuple[float, float] = (2.0, 5.0), loss: str = "huber", huber_c: float = 0.001,
                 sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        super().__init__(model, nets, grid, w_range)
        if mode not in CONSISTENCY_MODES:
            raise ValueError(f"mode must be one of {CONSISTENCY_MODES}, got {mode!r}")
        if nets.target is None:
            raise ValueError("consistency distillation needs an EMA target network (FrozenNets.target)")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        self.mode, self.num_phases, self.loss_kind, self.huber_c = mode, num_phases, loss, huber_c
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def f(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor) -> torch.Tensor:
        """The consistency function of this mode from a raw model output at (x, t); (B, 4, F, h, w) float32."""
        if self.mode == "lcm":
            return consistency_lcm(pred, x, t, self.grid, self.sigma_data, self.timestep_scaling)
        return consistency_phased(pred, x, t, t_end, self.grid)

    def forward(self, batch: dict[str, torch.Tensor], generators: list[torch.Generator]) -> tuple[torch.Tensor, dict]:
        m, grid, dev = self.model, self.grid, self.model.device
        latents, cond = self.prepare_batch(batch, generators)
        noise = per_sample_randn(tuple(latents.shape[1:]), generators).to(dev)
        index = torch.stack([torch.randint(0, grid.num_points, (), generator=g) for g in generators])
        w = self.sample_w(generators).to(dev)
        t, t_prev = grid.timestep(index).to(dev), grid.timestep(index + 1).to(dev)  # t_prev = -1: clean end
        end = phase_end_index(index, self.num_phases, grid) if self.mode == "phased" else torch.full_like(index, grid.num_points)
        t_end = grid.timestep(end).to(dev)
        x_t = add_noise(latents, noise, grid.alpha(t))
        # online student: f_theta(x_n, t_n, w)
        f_student = self.f(student_prediction(m, None, x_t, t, cond, w), x_t, t, t_end)
        with torch.no_grad():
            # one guided skipping-step DDIM step of the teacher: x_n -> x_{n+1}
            v = guided_prediction(m, self.nets.teacher, x_t, t, cond, w)
            x0, eps = predicted_x0_eps(v, x_t, grid.alpha(t), grid.prediction_type)
            x_prev = ddim_jump(x0, eps, grid.alpha(t_prev))
            # EMA target at (x_{n+1}, t_{n+1}); identity where t_{n+1} is the boundary (phase edge / clean end)
            pred_tgt = student_prediction(m, self.nets.target, x_prev, t_prev.clamp(min=0), cond, w)
            f_target = self.f(pred_tgt, x_prev, t_prev, t_end)
            on_edge = (index + 1 == end).to(dev).view(-1, 1, 1, 1, 1)
            f_target = torch.where(on_edge, x_prev, f_target)
        loss = distance(f_student, f_target, self.loss_kind, self.huber_c)
        return loss, {"w": w.mean().detach(), "t": t.float().mean().detach(), "edge_frac": on_edge.float().mean()}


class GuidanceDistillLoss(_DistillLoss):
    """Guidance distillation (Meng et al. 2023 stage 1): student(x_t, t, w) -> teacher CFG(x_t, t, w), MSE in v."""

    def __init__(self, model: Pose2VideoModel, nets: FrozenNets, grid: SolverGrid, w_range: tuple[float, float] = (2.0, 5.0)):
        super().__init__(model, nets, grid, w_range)

    def forward(self, batch: dict[str, torch.Tensor], generators: list[torch.Generator]) -> tuple[torch.Tensor, dict]:
        m, dev = self.model, self.model.device
        latents, cond = self.prepare_batch(batch, generators)
        noise = per_sample_randn(tuple(latents.shape[1:]), generators).to(dev)
        num_t = self.grid.alphas_cumprod.numel()
        t = torch.stack([torch.randint(0, num_t, (), generator=g) for g in generators]).to(dev)
        w = self.sample_w(generators).to(dev)
        x_t = add_noise(latents, noise, self.grid.alpha(t))
        pred = student_prediction(m, None, x_t, t, cond, w).float()
        with torch.no_grad():
            target = guided_prediction(m, self.nets.teacher, x_t, t, cond, w)
        loss = torch.nn.functional.mse_loss(pred, target)
        return loss, {"w": w.mean().detach(), "t": t.float().mean().detach()}
