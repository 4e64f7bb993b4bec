"""Distil the Pose2Video teacher into a few-step, guidance-free student.

    bash launch.sh distill                                                  # the embedded default (tiny, 4-step LCM)
    accelerate launch train/distill.py                                      # same, without launch.sh
    accelerate launch train/distill.py --config configs/distill/tiny_2step.yaml train.max_steps=500
    accelerate launch train/distill.py --config configs/distill/tiny_guidance.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train/distill.py   # 2-process gloo DDP
    FP_ACCELERATE=ddp_8gpu bash launch.sh distill --config configs/distill/aniportrait_4step.yaml

Modes (``mode=``; see ``distill/objectives.py`` for the maths):

* ``lcm``: latent consistency distillation (Luo et al. 2023) with the guided skipping-step DDIM teacher on an
  N-point grid (``solver_steps``), w ~ U[w_min, w_max] folded into the student through a zero-initialised
  ``cond_proj``, pseudo-Huber loss, EMA target (``train.ema_decay``, 0.95 as LCM). Sample with ``lcm``, any k.
* ``phased``: multi-phase consistency (PCM, Wang et al. 2024) with ``num_steps`` phases; deterministic
  ``phased`` sampling with ``num_steps`` steps.
* ``guidance``: guidance distillation only (Meng et al. 2023 stage 1); the student reproduces CFG in one
  evaluation and samples with ``ddim`` at any step count.

The whole denoising UNet (motion modules included) is fine-tuned; the reference UNet, pose guider, VAE and
image encoder are frozen and shared by student, teacher and target; teacher and target are kept outside the
accelerate-prepared module. Re-running the same command resumes from ``RUN/checkpoints`` and, once done,
exports ``export_dir`` (a model folder recording its sampler, steps and recipe).
"""

from __future__ import annotations

import sys

if not __package__:  # launched by path: put the repo root first so `distill`, `portrait` resolve (DESIGN §2)
    from pathlib import Path as _P

    sys.path[0] = str(_P(__file__).resolve().parents[1])

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.export import sampler_metadata, student_model_card
from distill.models import AttachedView, FrozenNets, build_student, update_target
from distill.objectives import LOSSES, ConsistencyDistillLoss, GuidanceDistillLoss
from distill.schedules import SolverGrid
from portrait import config as config_lib
from portrait import training as T
from portrait.data.dataset import ClipDataset
from portrait.models.bundle import ModelFolderError, Pose2VideoModel

MODES = ("lcm", "phased", "guidance")
FROZEN_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistillConfig:
    teacher: str = "portrait/assets/tiny_teacher"  # the shipped tiny teacher; bash launch.sh teacher trains runs/teacher/tiny/model
    mode: str = "lcm"  # lcm | phased | guidance
    num_steps: int = 4  # lcm: default sampling steps; phased: number of phases K (= sampling steps); guidance: default DDIM steps
    solver_steps: int = 50  # N of the skipping-step DDIM solver grid (skip 1000/N = 20, LCM's best)
    w_min: float = 2.0  # guidance scales sampled uniformly from [w_min, w_max] (usual CFG convention)
    w_max: float = 5.0
    w_embed_dim: int = 256  # cond_proj input: sinusoidal embedding of (w - 1) * 1000 (LCM: 256)
    loss: str = "huber"  # huber (pseudo-Huber) | l2 (consistency modes; guidance mode always regresses with L2)
    huber_c: float = 0.001  # LCM's c for SD latents
    sigma_data: float = 0.5  # boundary scalings (lcm mode), as diffusers' LCM
    timestep_scaling: float = 10.0
    num_frames: int = 8  # frames per training clip
    export_dir: str = "runs/distill/tiny_4step/model"
    export_weights: str = "online"  # online | target (the EMA target network)
    sample_guidance: float = 3.5  # w of the validation samples
    teacher_sample_steps: int = 25  # the teacher's validation sample (DDIM + CFG)
    data: T.DataConfig = field(default_factory=lambda: T.DataConfig(reference="mixed"))  # as the teacher saw
    train: T.TrainConfig = field(default_factory=lambda: T.TrainConfig(
        run_dir="runs/distill/tiny_4step", batch_size=4, max_steps=1500, lr=5e-5, lr_warmup_steps=50, ema_decay=0.95,
        checkpoint_every=250, sample_every=500))


def validate(cfg: DistillConfig) -> None:
    if cfg.mode not in MODES:
        raise config_lib.ConfigError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.loss not in LOSSES:
        raise config_lib.ConfigError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
    if cfg.export_weights not in ("online", "target") or (cfg.mode == "guidance" and cfg.export_weights == "target"):
        raise config_lib.ConfigError(f"export_weights must be 'online' or 'target' (target: consistency modes only), got {cfg.export_weights!r}")
    if not cfg.w_min <= cfg.w_max:
        raise config_lib.ConfigError(f"w_min ({cfg.w_min}) must not exceed w_max ({cfg.w_max})")
    if 1000 % cfg.solver_steps or not 1 <= cfg.num_steps <= cfg.solver_steps:
        raise config_lib.ConfigError(f"solver_steps ({cfg.solver_steps}) must divide 1000 and num_steps ({cfg.num_steps}) must be in [1, solver_steps]")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise config_lib.ConfigError(f"train.ema_decay (the EMA target's decay) must be in [0, 1), got {cfg.train.ema_decay}")


def build_objective(cfg: DistillConfig, student: Pose2VideoModel, nets: FrozenNets, grid: SolverGrid):
    w_range = (cfg.w_min, cfg.w_max)
    if cfg.mode == "guidance":
        return GuidanceDistillLoss(student, nets, grid, w_range)
    return ConsistencyDistillLoss(student, nets, grid, cfg.mode, cfg.num_steps if cfg.mode == "phased" else 1, w_range,
                                  cfg.loss, cfg.huber_c, cfg.sigma_data, cfg.timestep_scaling)


def main(cfg: DistillConfig) -> Path:
    # 1. setup ------------------------------------------------------------------------------------
    validate(cfg)
    if not (Path(cfg.teacher) / "fastportrait.json").is_file():
        raise ModelFolderError(f"teacher model folder {cfg.teacher} not found: train it first (`bash launch.sh teacher`) or set teacher=PATH")
    train = cfg.train
    run_dir, export = Path(train.run_dir), Path(cfg.export_dir)
    done = run_dir / "DONE"
    accelerator = T.make_accelerator(train, run_dir)
    if done.is_file() and (export / "fastportrait.json").is_file() and int(done.read_text() or 0) >= train.max_steps:
        T.logger.info(f"already finished ({done.read_text()} steps): {export}")
        return export
    micro = T.per_process_batch(train, accelerator.num_processes)
    if T.configure_deepspeed(accelerator, train, micro) == 3:
        # ZeRO-3 would also shard the frozen VAE / reference UNet / pose guider that live in the student bundle, so
        # the rank-0-only validation sampling and export, and the EMA target update, would need every rank to gather.
        raise config_lib.ConfigError("DeepSpeed ZeRO-3 is not supported by train/distill.py: it shards the student, but the EMA "
                                     "target update, validation samples and export need its full weights. Use ZeRO-2 "
                                     "(configs/accelerate/deepspeed_zero2.yaml) or DDP")
    manager = T.CheckpointManager(run_dir, train.keep_checkpoints)
    # 2. models -----------------------------------------------------------------------------------
    teacher = Pose2VideoModel.from_pretrained(cfg.teacher, device=accelerator.device)
    teacher_config, teacher_title = teacher.config, teacher.metadata.get("title", cfg.teacher)
    grid = SolverGrid.from_scheduler(teacher.make_scheduler(), cfg.solver_steps)
    meta = sampler_metadata(cfg.mode, cfg.num_steps, cfg.solver_steps, cfg.sigma_data, cfg.timestep_scaling)
    student, nets = build_student(teacher, cfg.w_embed_dim, with_target=cfg.mode != "guidance", metadata=meta)
    del teacher  # its parts live on in the student bundle; the bundle object itself must not be used again
    params = [p for p in student.denoising_unet.parameters() if p.requires_grad]
    objective = build_objective(cfg, student, nets, grid)
    T.logger.info(f"distilling ({cfg.mode}, {cfg.num_steps} steps, w in [{cfg.w_min}, {cfg.w_max}], N={cfg.solver_steps}): "
                  f"training {sum(p.numel() for p in params) / 1e6:.2f} M parameters; global batch {train.batch_size} = "
                  f"{accelerator.num_processes} proc x {micro} x {train.grad_accum_steps} accum")
    # 3. data -------------------------------------------------------------------------------------
    data_path = T.ensure_dataset(cfg.data, accelerator)
    try:
        dataset = ClipDataset(T.train_split(cfg.data, data_path), "train", num_frames=cfg.num_frames, strides=cfg.data.strides, reference=cfg.data.reference, seed=cfg.data.seed)
    except ValueError as e:  # e.g. num_frames longer than the clips
        raise config_lib.ConfigError(f"dataset {data_path} cannot serve num_frames={cfg.num_frames}, data.strides={cfg.data.strides}: {e}") from None
    if dataset.height != student.config.resolution:
        raise config_lib.ConfigError(f"dataset {data_path} is {dataset.height}px but the teacher generates {student.config.resolution}px")
    # written only once the inputs are known good, so a bad teacher / dataset / config leaves the run folder untouched
    T.write_run_config(run_dir, cfg, accelerator)
    T.init_tracker(accelerator, train, f"distill-{cfg.mode}-{cfg.num_steps}step", cfg)
    plan = T.GlobalBatchPlan(len(dataset), train.batch_size, micro, train.seed)
    # 4. optimiser / EMA target ---------------------------------------------------------------------
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    sched = T.lr_scheduler(optimizer, train)
    state = T.TrainState()
    # step_scheduler_with_optimizer=False (make_accelerator): the LR schedule steps once per optimiser step, below.
    objective, optimizer, sched = accelerator.prepare(objective, optimizer, sched)
    nets.to(accelerator.device, teacher_dtype=FROZEN_DTYPES[train.mixed_precision])  # outside the engine
    if nets.target is not None:
        accelerator.register_for_checkpointing(nets.target)
    accelerator.register_for_checkpointing(state)
    online = accelerator.unwrap_model(objective).model.denoising_unet
    # 5. resume -----------------------------------------------------------------------------------
    T.resume(accelerator, manager, state)
    # 6. loop -------------------------------------------------------------------------------------
    samples = {}  # the teacher's validation video, generated once
    bar = tqdm(total=train.max_steps, initial=state.step, desc=f"distill-{cfg.mode}", disable=not accelerator.is_main_process, dynamic_ncols=True)
    t_start = time.time() - state.wall_seconds
    grad_norm = 0.0
    while state.step < train.max_steps:
        for micro_step in range(train.grad_accum_steps):
            batch, gens = T.micro_batch(plan, dataset, accelerator, state.step, micro_step, train.seed, "distill")
            with accelerator.accumulate(objective):
                loss, logs = objective(batch, gens)
                norm = T.backward_step(accelerator, loss, params, optimizer, train, state, manager)
                grad_norm = grad_norm if norm is None else norm
        sched.step()
        if nets.target is not None:
            update_target(nets.target, online, train.ema_decay)  # LCM: after every optimiser step
        T.advance(state, train, t_start)
        bar.update(1)
        if T.schedule_due(state.step, train.log_every, train.max_steps):
            vals = T.log_step(accelerator, run_dir, "distill", state, loss, optimizer, grad_norm, logs)
            bar.set_postfix(loss=f"{vals['distill/loss']:.4f}")
        if T.schedule_due(state.step, train.checkpoint_every, train.max_steps):
            manager.save(accelerator, state.step, {"mode": cfg.mode, "samples_seen": state.samples_seen})
        if train.sample_every and state.step % train.sample_every == 0 and state.step < train.max_steps:
            sample_and_log(cfg, accelerator.unwrap_model(objective).model, nets, teacher_config, dataset, accelerator, state.step, samples)
    bar.close()
    # 7. export -----------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        student = accelerator.unwrap_model(objective).model
        meta.update({
            "title": f"fastportrait {cfg.mode} student ({cfg.num_steps}-step) of {teacher_title}",
            "distillation": {"mode": cfg.mode, "teacher": str(cfg.teacher), "teacher_title": teacher_title, "num_steps": cfg.num_steps,
                             "solver_steps": cfg.solver_steps, "guidance_range": [cfg.w_min, cfg.w_max], "w_embed_dim": cfg.w_embed_dim,
                             "loss": cfg.loss if cfg.mode != "guidance" else "l2 (v)", "huber_c": cfg.huber_c,
                             "target_decay": train.ema_decay if cfg.mode != "guidance" else None, "num_frames": cfg.num_frames,
                             "exported_weights": cfg.export_weights},
            "train_steps": state.step, "samples_seen": state.samples_seen, "train_minutes": round(state.wall_seconds / 60, 1),
            "data": str(data_path), "metrics": {}, "config": config_lib.to_dict(cfg)})
        online_state = None
        if cfg.export_weights == "target":
            online_state = {k: v.clone() for k, v in student.denoising_unet.state_dict().items()}
            student.denoising_unet.load_state_dict(nets.target.state_dict())
        student.metadata = dict(meta)
        student.save_pretrained(export, model_card=student_model_card(student, meta))
        if online_state is not None:
            student.denoising_unet.load_state_dict(online_state)
        sample_and_log(cfg, student, nets, teacher_config, dataset, accelerator, state.step, samples)
        done.write_text(str(state.step))
        print(f"student exported to {export}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export


@torch.no_grad()
def sample_and_log(cfg: DistillConfig, student: Pose2VideoModel, nets: FrozenNets, teacher_config, dataset: ClipDataset,
                   accelerator, step: int, cache: dict) -> None:
    """Teacher (DDIM 25 + CFG) and student (its sampler, ``num_steps``) on one clip with the same noise, side by side:
    ref | pose | ground truth | teacher | student. Saved as PNG + GIF under RUN/samples and logged to W&B."""
    if not accelerator.is_main_process:
        return
    from PIL import Image

    from infer.io import write_gif
    from infer.pipeline import GenerationConfig, Pose2VideoPipeline

    def frames(model, gen):
        out = Pose2VideoPipeline(model)(ref, pose, gen, torch.Generator().manual_seed(0))
        return (out.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)

    dataset.set_epoch(0)
    item = dataset[0]
    ref = item["ref_frame"].permute(1, 2, 0).numpy()
    pose = item["pose"].permute(0, 2, 3, 1).numpy()
    if "teacher" not in cache:
        view = AttachedView(student, nets.teacher, teacher_config)
        cache["teacher"] = frames(view, GenerationConfig(steps=cfg.teacher_sample_steps, guidance=cfg.sample_guidance, sampler="ddim"))
    gen = frames(student, GenerationConfig(steps=cfg.num_steps, guidance=cfg.sample_guidance))
    gt = item["target"].permute(0, 2, 3, 1).numpy()
    video = np.concatenate([np.repeat(ref[None], len(gen), 0), pose, gt, cache["teacher"], gen], axis=2)
    out_dir = Path(cfg.train.run_dir) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_png = np.concatenate(list(video[: min(4, len(video))]), axis=0)
    Image.fromarray(grid_png).save(out_dir / f"step-{step:07d}.png")
    write_gif(out_dir / f"step-{step:07d}.gif", video, fps=8)
    T.log_images(accelerator, "distill/samples", grid_png, step)
    T.log_video(accelerator, "distill/teacher_vs_student", video, 8, step)


if __name__ == "__main__":
    raise SystemExit(config_lib.run_script(DistillConfig, main, "Distil the Pose2Video teacher into a few-step student (tiny CPU default).",
                                           (T.NonFiniteLossError, OSError, ModelFolderError)))  # OSError: missing files, disk full
