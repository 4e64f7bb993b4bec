"""Train the Pose2Video teacher: VAE, then stage 1 (single frames), then stage 2 (motion modules on clips).

    bash launch.sh teacher                                          # the embedded tiny teacher on CPU
    accelerate launch train/teacher.py                               # same, without launch.sh
    accelerate launch train/teacher.py --config configs/teacher/tiny.yaml stage2.max_steps=500
    accelerate launch train/teacher.py --config configs/teacher/tiny.yaml stages=[stage2]   # one stage
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train/teacher.py  # 2-process gloo DDP

Stages (AniPortrait's recipe, train_stage_1.py / train_stage_2.py, with a VAE stage first because nothing can be
downloaded here; sd-vae-ft-mse's role is played by an MSE-trained tiny AutoencoderKL):

* ``vae``: AutoencoderKL reconstruction (MSE + small KL) on single frames.
* ``stage1``: reference UNet + denoising UNet (spatial layers) + pose guider on single frames; VAE and image
  encoder frozen; motion modules frozen at their zero-initialised identity.
* ``stage2``: motion modules only, on clips.

Each stage writes ``RUN/<stage>/checkpoints/step-*`` (resume state) and exports ``RUN/<stage>/model`` (a model
folder); the next stage starts from it, and the last stage's export is copied to ``export_dir``. Re-running the
same command skips finished stages and resumes an unfinished one from its last complete checkpoint.
"""

from __future__ import annotations

import sys

if not __package__:  # launched by path: put the repo root first so `distill`, `portrait` resolve (DESIGN §2)
    from pathlib import Path as _P

    sys.path[0] = str(_P(__file__).resolve().parents[1])

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from portrait import config as config_lib
from portrait import training as T
from portrait.data.dataset import ClipDataset
from portrait.models.bundle import ModelConfig, Pose2VideoModel, count_parameters
from portrait.models.unets import motion_modules_are_identity, reset_motion_modules
from portrait.objectives import TeacherDiffusionLoss, VAELoss, to_unit

STAGES = ("vae", "stage1", "stage2")


@dataclass
class StageConfig:
    max_steps: int = 1000
    batch_size: int = 16  # global batch, in clips
    lr: float = 1e-4
    num_frames: int = 1


@dataclass
class ObjectiveConfig:
    snr_gamma: float = 5.0
    # floor of the min-SNR weight: 1.0 = plain v-MSE (the from-scratch default), 0.0 = AniPortrait's objective
    # exactly (configs/teacher/aniportrait_stage2.yaml); see TeacherDiffusionLoss.loss_weight
    min_weight: float = 1.0
    noise_offset: float = 0.05
    uncond_ratio: float = 0.1
    kl_weight: float = 1e-6


@dataclass
class TeacherConfig:
    model: str = "configs/model/tiny.yaml"  # architecture for a fresh start
    init_from: str | None = None  # a model folder to start the first stage from instead
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    export_dir: str = "runs/teacher/tiny/model"
    vae: StageConfig = field(default_factory=lambda: StageConfig(max_steps=3000, batch_size=16, lr=1e-3, num_frames=1))
    stage1: StageConfig = field(default_factory=lambda: StageConfig(max_steps=5000, batch_size=16, lr=3e-4, num_frames=1))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(max_steps=600, batch_size=2, lr=2e-4, num_frames=8))
    sample_steps: int = 25
    # After the vae stage, set model.latent_scale to 1/std of the latents of this many training frames, so the
    # diffusion stages see unit-variance latents (SD's 0.18215 was fitted the same way to SD's VAE).
    latent_scale_frames: int = 512
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: T.DataConfig = field(default_factory=lambda: T.DataConfig(reference="mixed"))
    train: T.TrainConfig = field(default_factory=T.TrainConfig)


def trainable_parameters(model: Pose2VideoModel, stage: str) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze what ``stage`` trains (AniPortrait's split)."""
    model.requires_grad_(False)
    if stage == "vae":
        mods = [model.vae]
    elif stage == "stage1":
        mods = [model.reference_unet, model.denoising_unet, model.pose_guider]
    else:
        mods = [m for n, m in model.denoising_unet.named_modules() if n.endswith("motion_modules")]
    for m in mods:
        m.requires_grad_(True)
    if stage == "stage1":
        for n, m in model.denoising_unet.named_modules():
            if n.endswith("motion_modules"):
                m.requires_grad_(False)
        # The reference UNet's output head (and its last up block's non-attention tail) never feeds the bank.
        for p in list(model.reference_unet.conv_out.parameters()) + list(model.reference_unet.conv_norm_out.parameters()):
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def run_stage(cfg: TeacherConfig, stage: str, init: str | None, accelerator) -> Path:
    """Train one stage; return its exported model folder."""
    # 1. setup ------------------------------------------------------------------------------------
    sc: StageConfig = getattr(cfg, stage)
    stage_dir = Path(cfg.train.run_dir) / stage
    export = stage_dir / "model"
    done = stage_dir / "DONE"
    if done.is_file() and (export / "fastportrait.json").is_file() and int(done.read_text() or 0) >= sc.max_steps:
        T.logger.info(f"[{stage}] already finished ({done.read_text()} steps): reusing {export}")
        return export
    train = dataclasses.replace(cfg.train, max_steps=sc.max_steps, batch_size=sc.batch_size, lr=sc.lr, run_dir=str(stage_dir))
    micro = T.per_process_batch(train, accelerator.num_processes)
    manager = T.CheckpointManager(stage_dir, train.keep_checkpoints)
    # 2. models -----------------------------------------------------------------------------------
    if init:
        model = Pose2VideoModel.from_pretrained(init)
    else:
        model = Pose2VideoModel.from_config(config_lib.load(ModelConfig, cfg.model), seed=train.seed)
    if stage == "stage1" and not motion_modules_are_identity(model.denoising_unet):
        # Stage 1 trains the spatial layers with the motion modules at their zero-initialised identity. A finished
        # teacher (init_from) has trained ones, which would make stage 1 learn through a 1-frame temporal attention
        # it was never meant to see; re-initialise them, and let stage 2 train them afresh on the new spatial layers.
        n = reset_motion_modules(model.denoising_unet, seed=train.seed)
        T.logger.info(f"[stage1] {init} has trained motion modules: re-initialised {n} of them to identity (stage 2 retrains them)")
    model.to(accelerator.device)
    params = trainable_parameters(model, stage)
    model.train()
    if model.pose_guider.config.mode == "faithful":
        pass  # batch statistics in train and eval alike (upstream quirk), see PoseGuider
    objective = VAELoss(model, cfg.objective.kl_weight) if stage == "vae" else TeacherDiffusionLoss(
        model, cfg.objective.snr_gamma, cfg.objective.noise_offset, cfg.objective.uncond_ratio, cfg.objective.min_weight)
    T.logger.info(f"[{stage}] training {sum(p.numel() for p in params) / 1e6:.2f} M of {count_parameters(model) / 1e6:.2f} M parameters; "
                  f"global batch {train.batch_size} = {accelerator.num_processes} proc x {micro} x {train.grad_accum_steps} accum")
    # 3. data -------------------------------------------------------------------------------------
    data_path = T.ensure_dataset(cfg.data, accelerator)
    dataset = ClipDataset(T.train_split(cfg.data, data_path), "train", num_frames=sc.num_frames, strides=cfg.data.strides, reference=cfg.data.reference, seed=cfg.data.seed)
    plan = T.GlobalBatchPlan(len(dataset), train.batch_size, micro, train.seed)
    if stage != "vae":
        probe_batch = T.load_items(dataset, plan.items(0, 0, 0, 1)[:1])
        n_before = len(params)
        params = T.drop_unused_parameters(params, lambda: objective(probe_batch, [T.sample_generator(train.seed, -1, "probe")])[0])
        T.logger.info(f"[{stage}] froze {n_before - len(params)} parameter tensors that never receive a gradient")
    # 4. optimiser / EMA ---------------------------------------------------------------------------
    objective, optimizer, sched, ema, state = T.prepare_optimisation(accelerator, objective, params, train)
    # 5. resume -----------------------------------------------------------------------------------
    T.resume(accelerator, manager, state)
    # 6. loop -------------------------------------------------------------------------------------
    def compute_loss(batch, gens):
        if stage != "vae":
            return objective(batch, gens)
        frames = to_unit(batch["target"]).flatten(0, 1).to(accelerator.device)
        h = frames.shape[-1] // model.vae_scale_factor
        eps = torch.stack([torch.randn(model.vae.config.latent_channels, h, h, generator=g) for g in gens for _ in range(sc.num_frames)])
        return objective(frames, eps.to(accelerator.device))

    def after_step(step):
        if stage != "vae" and train.sample_every and step % train.sample_every == 0 and step < train.max_steps:
            sample_and_log(cfg, model, ema, params, dataset, accelerator, stage, step)

    T.run_loop(accelerator, train, state, manager, tag=stage, run_dir=stage_dir, plan=plan, dataset=dataset, stream=stage,
               accumulate=objective, params=params, optimizer=optimizer, scheduler=sched, ema=ema,
               compute_loss=compute_loss, checkpoint_extra={"stage": stage}, after_step=after_step)
    # 7. export -----------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ema.store(params)
        ema.copy_to(params)
        model.eval()
        if stage == "vae" and cfg.latent_scale_frames > 0:
            fit_latent_scale(model, dataset, cfg.latent_scale_frames, accelerator.device)
        card_meta = {"title": f"fastportrait tiny teacher ({stage})", "stage": stage, "steps": state.step,
                     "samples_seen": state.samples_seen, "train_minutes": round(state.wall_seconds / 60, 1),
                     "data": str(data_path), "config": config_lib.to_dict(cfg)}
        model.save_pretrained(export, metadata=card_meta)
        if stage != "vae":
            sample_and_log(cfg, model, None, params, dataset, accelerator, stage, state.step)
        ema.restore(params)
        (stage_dir / "DONE").write_text(str(state.step))
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator._custom_objects.clear()
    return export


@torch.no_grad()
def fit_latent_scale(model: Pose2VideoModel, dataset: ClipDataset, n_frames: int, device) -> float:
    """Set ``model.config.latent_scale`` so scaled posterior means have unit std over ``n_frames`` frames."""
    rng = np.random.default_rng(0)
    idx = rng.choice(len(dataset), size=min(len(dataset), max(1, n_frames // dataset.num_frames)), replace=False)
    zs = []
    for i in idx:
        frames = to_unit(dataset[int(i)]["target"]).to(device)
        zs.append(model.vae.encode(frames.to(model.vae.dtype)).latent_dist.mean.float())
    std = torch.cat(zs).std().item()
    if not np.isfinite(std) or std <= 0:
        raise T.NonFiniteLossError(f"[vae] latent std is {std}; the VAE export would be unusable")
    model.config.latent_scale = float(1.0 / std)
    T.logger.info(f"[vae] latent std {std:.4f} -> latent_scale {model.config.latent_scale:.5f}")
    return model.config.latent_scale


@torch.no_grad()
def sample_and_log(cfg: TeacherConfig, model: Pose2VideoModel, ema, params, dataset: ClipDataset, accelerator, stage: str, step: int) -> None:
    """Generate one held-in clip with the (EMA) teacher; save a grid PNG + GIF and log them."""
    if not accelerator.is_main_process:
        return
    from infer.io import write_gif
    from infer.pipeline import GenerationConfig, Pose2VideoPipeline

    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    was_training = model.training
    model.eval()
    try:
        item = dataset[0]
        ref = item["ref_frame"].permute(1, 2, 0).numpy()
        pose = item["pose"].permute(0, 2, 3, 1).numpy()
        out = Pose2VideoPipeline(model)(ref, pose, GenerationConfig(steps=cfg.sample_steps), torch.Generator().manual_seed(0))
        gen = (out.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        gt = item["target"].permute(0, 2, 3, 1).numpy()
        refs = np.repeat(ref[None], len(gen), 0)
        video = np.concatenate([refs, pose, gt, gen], axis=2)  # ref | pose | ground truth | output
        sample_dir = Path(cfg.train.run_dir) / stage / "samples"
        sample_dir.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(np.concatenate(list(video[: min(4, len(video))]), axis=0)).save(sample_dir / f"step-{step:07d}.png")
        write_gif(sample_dir / f"step-{step:07d}.gif", video, fps=8)
        T.log_images(accelerator, f"{stage}/samples", np.concatenate(list(video[:4]), axis=0), step)
        T.log_video(accelerator, f"{stage}/video", video, 8, step)
    finally:
        model.train(was_training)
        if ema is not None:
            ema.restore(params)


def main(cfg: TeacherConfig) -> Path:
    for s in cfg.stages:
        if s not in STAGES:
            raise config_lib.ConfigError(f"unknown stage {s!r} in stages; choose from {STAGES}")
    run_dir = Path(cfg.train.run_dir)
    accelerator = T.make_accelerator(cfg.train, run_dir)
    T.write_run_config(run_dir, cfg, accelerator)
    T.init_tracker(accelerator, cfg.train, "teacher", cfg)
    init = cfg.init_from
    export = None
    try:
        for stage in cfg.stages:
            export = run_stage(cfg, stage, init, accelerator)
            init = str(export)
        if accelerator.is_main_process and export is not None:
            final = Path(cfg.export_dir)
            if final.resolve() != export.resolve():
                tmp = final.with_name(f".{final.name}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(export, tmp)
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
            print(f"teacher exported to {final}")
    finally:
        accelerator.end_training()
    return Path(cfg.export_dir)


if __name__ == "__main__":
    raise SystemExit(config_lib.run_script(TeacherConfig, main, "Train the Pose2Video teacher (tiny CPU default).",
                                           (T.NonFiniteLossError, FileNotFoundError)))
