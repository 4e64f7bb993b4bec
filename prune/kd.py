"""Knowledge-distillation recovery of a pruned denoising UNet against the frozen unpruned one.

    loss = task_weight * task + out_kd_weight * ||out_pruned - out_unpruned||^2 + feat_kd_weight * sum_l feat_l

* **task**: a pruned *teacher* uses the teacher's own diffusion loss, ``portrait.objectives.TeacherDiffusionLoss``
  (v-prediction, min-SNR-gamma, noise offset, unconditional dropout), unchanged: :class:`PruneKDLoss` intercepts its
  single ``model.denoise`` call to run the frozen unpruned UNet on exactly the same inputs. A pruned *distilled
  student* cannot use its consistency objective without the original teacher UNet and the EMA target, so its task
  term is the x0 regression to the data at its own inference timesteps (as :func:`prune.pruner.inference_task_loss`,
  here on the forward it shares with KD and with w ~ U[guidance range] as distilled); the KD terms make the pruned
  student reproduce the unpruned one.
* **output KD**: MSE between the pruned and the unpruned model outputs (BK-SDM, Kim et al. 2023, "out-KD").
* **feature KD**: on the outputs of every down block, the mid block and every up block, normalised per feature as in
  LAPTOP-Diff (Zhang et al. 2024, "normalized distillation"): each block's squared error is divided by the squared
  norm of the unpruned model's feature, so no single block dominates the sum. These outputs are on the residual
  streams, which pruning keeps fixed, so shapes match without projections.

The frozen unpruned UNet is attached to the bundle (``Pose2VideoModel.attach_unet``) but is NOT a submodule of this
objective, so ``accelerator.prepare`` never wraps, syncs or checkpoints it (as distillation's frozen teacher).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import UNetMotionModel
from torch import nn

from portrait.models.bundle import Pose2VideoModel


class FeatureTap:
    """Records the outputs of ``down_blocks.*``, ``mid_block`` and ``up_blocks.*`` while active."""

    def __init__(self, unet: UNetMotionModel):
        self.features: dict[str, torch.Tensor] = {}
        self.active = False
        self.handles = []
        blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)] + [("mid_block", unet.mid_block)]
        blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
        for name, block in blocks:
            self.handles.append(block.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self.active:
                self.features[name] = output[0] if isinstance(output, tuple) else output

        return hook

    @contextlib.contextmanager
    def record(self) -> Iterator[dict[str, torch.Tensor]]:
        self.features = {}
        self.active = True
        try:
            yield self.features
        finally:
            self.active = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def normalized_feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """LAPTOP-Diff normalised feature KD: sum over blocks of ||F_s - F_t||^2 / ||F_t||^2.

    The ratio is taken per frame (row of the ``(B*F, C, H, W)`` feature) and averaged, so the loss of a batch is the
    mean of its samples' losses: DDP over any split of the batch takes the same step (a whole-batch norm would not).
    """
    if student.keys() != teacher.keys() or not student:
        raise RuntimeError(f"feature taps disagree: {sorted(student)} vs {sorted(teacher)}")
    total = 0.0
    for k, ft in teacher.items():
        fs = student[k].float()
        ft = ft.float()
        err = ((fs - ft) ** 2).flatten(1).sum(1)
        total = total + (err / (ft**2).flatten(1).sum(1).clamp_min(1e-8)).mean()
    return total


class PruneKDLoss(nn.Module):
    """Task + output KD + feature KD for a pruned bundle (see the module docstring).

    Args:
        model: the pruned bundle (its ``denoising_unet`` is trained; the only submodule).
        frozen: the unpruned denoising UNet, already ``model.attach_unet``-ed, frozen, eval.
        task: ``TeacherDiffusionLoss(model, ...)`` for a teacher, or None for a distilled student.
        timesteps: the student's inference timesteps (student path only).
        weights: task / output-KD / feature-KD weights; ``kd=False`` is ``out_kd=feat_kd=0``.
    """

    def __init__(self, model: Pose2VideoModel, frozen: UNetMotionModel, task: nn.Module | None,
                 timesteps: torch.Tensor | None = None, task_weight: float = 1.0, out_kd_weight: float = 1.0,
                 feat_kd_weight: float = 1.0, guidance_range: tuple[float, float] = (2.0, 5.0)):
        super().__init__()
        self.model = model
        self.__dict__["task"] = task  # holds the same bundle: not a second submodule (no duplicated state)
        self.__dict__["frozen"] = frozen  # plain attribute: never a submodule (not prepared, synced or saved)
        self.__dict__["tap_s"] = FeatureTap(model.denoising_unet)
        self.__dict__["tap_t"] = FeatureTap(frozen)
        self.timesteps = timesteps
        self.task_weight, self.out_kd_weight, self.feat_kd_weight = task_weight, out_kd_weight, feat_kd_weight
        self.w_min, self.w_max = guidance_range
        if task is None and timesteps is None:
            raise ValueError("a student (task=None) needs its inference timesteps")

    @property
    def kd(self) -> bool:
        return self.out_kd_weight > 0 or self.feat_kd_weight > 0

    def _both(self, call) -> tuple[torch.Tensor, torch.Tensor | None, dict, dict]:
        """call(unet) -> output, for the pruned UNet (None) and, when KD is on, the frozen one (no grad)."""
        with self.tap_s.record() as fs:
            out_s = call(None)
        out_t, ft = None, {}
        if self.kd:
            with torch.no_grad(), self.tap_t.record() as ft:
                out_t = call(self.frozen)
        return out_s, out_t, fs, ft

    @contextlib.contextmanager
    def _intercept(self, captured: dict) -> Iterator[None]:
        """Make the bundle's ``denoise`` also run the frozen UNet on the task loss's own inputs."""
        m = self.model
        bound = type(m).denoise

        def denoise(*args, **kwargs):
            if kwargs.get("unet") is not None:
                return bound(m, *args, **kwargs)
            out_s, out_t, fs, ft = self._both(lambda unet: bound(m, *args, **{**kwargs, "unet": unet}))
            captured.update(out_s=out_s, out_t=out_t, fs=fs, ft=ft)
            return out_s

        m.__dict__["denoise"] = denoise
        try:
            yield
        finally:
            m.__dict__.pop("denoise", None)

    def forward(self, batch: dict[str, torch.Tensor], generators: list[torch.Generator]) -> tuple[torch.Tensor, dict]:
        logs: dict[str, torch.Tensor] = {}
        if self.task is not None:
            captured: dict = {}
            with self._intercept(captured):
                task, task_logs = self.task(batch, generators)
            logs.update({f"task_{k}": v for k, v in task_logs.items()})
        else:
            task, captured = self._student_step(batch, generators)
        loss = self.task_weight * task if self.task_weight else torch.zeros((), device=task.device)
        logs["task"] = task.detach()
        if self.kd:
            out_kd = torch.nn.functional.mse_loss(captured["out_s"].float(), captured["out_t"].float())
            feat_kd = normalized_feature_loss(captured["fs"], captured["ft"])
            loss = loss + self.out_kd_weight * out_kd + self.feat_kd_weight * feat_kd
            logs.update(out_kd=out_kd.detach(), feat_kd=feat_kd.detach())
        return loss, logs

    def _student_step(self, batch, generators) -> tuple[torch.Tensor, dict]:
        """A distilled student at its own inference timesteps, w ~ U[guidance range] (as distilled)."""
        from distill.models import conditioning, student_prediction
        from distill.schedules import SolverGrid, add_noise, predicted_x0_eps
        from portrait.objectives import per_sample_rand, per_sample_randn, to_unit

        m, dev = self.model, self.model.device
        target = to_unit(batch["target"]).to(dev)
        b, f = target.shape[:2]
        with torch.no_grad():
            lat = m.encode_images(target.flatten(0, 1)).unflatten(0, (b, f)).permute(0, 2, 1, 3, 4).float()
            ref01 = batch["ref_frame"].to(dev).float() / 255.0
            pose = to_unit(batch["pose"]).to(dev).permute(0, 2, 1, 3, 4)
            cond = conditioning(m, ref01, pose, guided=False)
        noise = per_sample_randn(tuple(lat.shape[1:]), generators).to(dev)
        pick = torch.stack([torch.randint(0, len(self.timesteps), (), generator=g) for g in generators])
        t = self.timesteps[pick].to(dev)
        w = (self.w_min + (self.w_max - self.w_min) * per_sample_rand(generators)).to(dev)
        grid = SolverGrid.from_scheduler(m.make_scheduler(), 50)
        a = grid.alpha(t)
        x_t = add_noise(lat, noise, a)
        if m.config.time_cond_proj_dim is not None:
            call = lambda unet: student_prediction(m, unet, x_t, t, cond, w)  # noqa: E731
        else:
            call = lambda unet: m.denoise(x_t, t, cond.enc, cond.feats, cond.bank, unet=unet)  # noqa: E731
        out_s, out_t, fs, ft = self._both(call)
        x0, _ = predicted_x0_eps(out_s.float(), x_t, a, grid.prediction_type)
        task = torch.nn.functional.mse_loss(x0, lat)
        return task, {"out_s": out_s, "out_t": out_t, "fs": fs, "ft": ft}
