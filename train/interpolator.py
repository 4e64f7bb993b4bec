"""Train the landmark-conditioned frame interpolator (issue 6; ``portrait/models/interpolator.py``).

    bash launch.sh interpolator                                              # the embedded tiny CPU default
    bash launch.sh interpolator --config configs/interpolator/tiny_fast.yaml train.threads=1
    accelerate launch train/interpolator.py --config configs/interpolator/tiny_fast.yaml vae_model=runs/teacher/tiny/model
    python train/interpolator.py --config configs/interpolator/tiny_fast.yaml train.max_steps=2 train.tracker=none --dry-run

Re-running the same command resumes from the last complete checkpoint in ``train.run_dir/checkpoints``.

Each sample is a triplet (keyframe 0, keyframe 1, in-between target) from a stride-1 window of a training clip: gap
k in ``gaps`` (2, 3, 4), every t = j / k, with time reversal and a horizontal flip (landmarks mirrored with the iBUG
permutation, pose images re-drawn). With ``keyframe_source: vae`` all three frames go through the VAE round trip of
the model folder ``vae_model`` (the teacher's VAE), so the network learns to interpolate decoder outputs as diffusion
produces them and to keep their look in between (``clean``: raw frames). Landmark dropout (all landmark inputs off
for a sample) trains the landmark-blind mode of the same network; prior dropout trains it to work from the pose
images alone (pose videos have no landmarks).

Loss = Laplacian-pyramid L1 + census + flow smoothness + landmark consistency (the flows must carry the target's
landmarks onto the keyframes' landmarks), with the image terms weighted ``1 + region_weight`` inside the mouth and
eye boxes of the target landmarks (``portrait/interpolation.py``).
"""

from __future__ import annotations

import sys

if not __package__:  # launched by path: put the repo root first (DESIGN §2)
    from pathlib import Path as _P

    sys.path[0] = str(_P(__file__).resolve().parents[1])

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from portrait import config as config_lib
from portrait import interpolation as I
from portrait import training as T
from portrait.data.dataset import ClipDataset
from portrait.models.interpolator import INTERPOLATOR_CONFIGS, FrameInterpolator, InterpolatorConfig, count_parameters

KEYFRAME_SOURCES = ("vae", "clean")


@dataclass
class InterpLossConfig:
    lap_weight: float = 1.0
    lap_levels: int = 4
    census_weight: float = 0.1
    smooth_weight: float = 0.02
    landmark_weight: float = 0.1
    region_weight: float = 2.0  # extra weight inside the mouth and eye boxes (image terms), x (1 + region_weight)
    landmark_region_weight: float = 3.0  # lips and eyes in the landmark-consistency term


@dataclass
class InterpolatorTrainConfig:
    arch: str = "tiny_fast"  # INTERPOLATOR_CONFIGS name: tiny_fast (CPU default) | tiny | base
    use_landmarks: bool = True
    flow_prior: bool = True
    gaps: list[int] = field(default_factory=lambda: [2, 3, 4])
    keyframe_source: str = "vae"  # vae | clean
    vae_model: str = "portrait/assets/tiny_teacher"  # model folder whose VAE gives the degradation (keyframe_source: vae)
    flip_prob: float = 0.5
    reverse_prob: float = 0.5
    landmark_dropout: float = 0.2
    prior_dropout: float = 0.2
    val_triplets: int = 64  # held-out (val split) triplets scored at export
    export_dir: str = "runs/interpolator/tiny_fast/model"
    loss: InterpLossConfig = field(default_factory=InterpLossConfig)
    data: T.DataConfig = field(default_factory=lambda: T.DataConfig(strides=[1], reference="first"))
    train: T.TrainConfig = field(default_factory=lambda: T.TrainConfig(
        run_dir="runs/interpolator/tiny_fast", batch_size=16, max_steps=6000, lr=1e-3, lr_schedule="cosine", lr_warmup_steps=30,
        ema_decay=0.99, checkpoint_every=500, log_every=10))


def load_vae(path: str):
    """The VAE of a Pose2Video model folder, with the folder checks of ``Pose2VideoModel``."""
    from portrait.models.bundle import load_folder_vae

    return load_folder_vae(path, "keyframe_source=vae")[0]


def objective(net, trip: dict[str, torch.Tensor], cfg: InterpolatorTrainConfig) -> tuple[torch.Tensor, dict]:
    """The interpolator loss of one batch of triplets; returns (loss, detached parts)."""
    lc = cfg.loss
    out = net(trip["img0"], trip["img1"], trip["t"], trip["pose0"], trip["pose1"], trip["pose_t"], trip["lmk0"], trip["lmk1"],
              trip["lmk_t"], use_landmarks=trip["landmarks_on"], prior_keep=trip["prior_keep"])
    pred, target = out["frame"], trip["target"]
    weight = 1 + lc.region_weight * I.region_boxes_mask(trip["lmk_t"], tuple(target.shape[-2:]))
    parts = {
        "lap": I.laplacian_l1(pred, target, weight, lc.lap_levels),
        "census": I.census_loss(pred, target, weight),
        "smooth": I.flow_smoothness(out["flow"], target),
        "landmark": I.landmark_consistency(out["flow"], trip["lmk_t"], trip["lmk0"], trip["lmk1"], lc.landmark_region_weight),
    }
    loss = (lc.lap_weight * parts["lap"] + lc.census_weight * parts["census"] + lc.smooth_weight * parts["smooth"]
            + lc.landmark_weight * parts["landmark"])
    return loss, {k: v.detach() for k, v in parts.items()}


def make_triplets(batch, gens, cfg: InterpolatorTrainConfig, vae, device) -> dict[str, torch.Tensor]:
    trip = I.sample_triplets(batch, gens, cfg.gaps, cfg.flip_prob, cfg.reverse_prob, cfg.landmark_dropout, cfg.prior_dropout)
    if vae is not None:
        b = trip["img0"].shape[0]
        rt = I.vae_round_trip(vae, torch.cat([trip["img0"], trip["img1"], trip["target"]]).to(device))
        trip["img0"], trip["img1"], trip["target"] = rt[:b], rt[b:2 * b], rt[2 * b:]
    return {k: v.to(device) for k, v in trip.items()}


@torch.no_grad()
def validate(net, cfg: InterpolatorTrainConfig, data_path: Path, vae, device) -> dict:
    """PSNR of the in-between frame on ``val_triplets`` held-out triplets: landmarks on, off, and the linear blend."""
    from infer.metrics import psnr

    ds = ClipDataset(data_path, "val", num_frames=max(cfg.gaps) + 1, strides=[1], reference="first", seed=1)
    n = min(cfg.val_triplets, len(ds))
    if n == 0:
        return {}
    items = [(0, i, i) for i in range(n)]
    batch = T.load_items(ds, items)
    gens = [T.sample_generator(1234, i, "val") for i in range(n)]
    vcfg = dataclasses.replace(cfg, flip_prob=0.0, reverse_prob=0.0, landmark_dropout=0.0, prior_dropout=0.0)
    trip = make_triplets(batch, gens, vcfg, vae, device)
    args = (trip["img0"], trip["img1"], trip["t"], trip["pose0"], trip["pose1"], trip["pose_t"], trip["lmk0"], trip["lmk1"], trip["lmk_t"])
    was = net.training
    net.eval()
    on = net(*args)["frame"]
    off = net(*args, use_landmarks=False)["frame"]
    net.train(was)
    t = trip["t"].view(-1, 1, 1, 1)
    blend = (1 - t) * trip["img0"] + t * trip["img1"]
    return {"val_psnr_landmarks_on": psnr(on, trip["target"]), "val_psnr_landmarks_off": psnr(off, trip["target"]),
            "val_psnr_blend": psnr(blend, trip["target"]), "val_triplets": n}


def main(cfg: InterpolatorTrainConfig) -> Path:
    # 1. setup ------------------------------------------------------------------------------------
    if cfg.arch not in INTERPOLATOR_CONFIGS:
        raise config_lib.ConfigError(f"arch must be one of {sorted(INTERPOLATOR_CONFIGS)}, got {cfg.arch!r}")
    if cfg.keyframe_source not in KEYFRAME_SOURCES:
        raise config_lib.ConfigError(f"keyframe_source must be one of {KEYFRAME_SOURCES}, got {cfg.keyframe_source!r}")
    if not cfg.gaps or min(cfg.gaps) < 2:
        raise config_lib.ConfigError(f"gaps must be integers >= 2 (a gap of k has k - 1 in-between frames), got {cfg.gaps}")
    train = cfg.train
    run_dir = Path(train.run_dir)
    accelerator = T.make_accelerator(train, run_dir)
    T.write_run_config(run_dir, cfg, accelerator)
    T.init_tracker(accelerator, train, "interpolator", cfg)
    micro = T.per_process_batch(train, accelerator.num_processes)
    manager = T.CheckpointManager(run_dir, train.keep_checkpoints)
    device = accelerator.device
    try:
        # 2. models -------------------------------------------------------------------------------
        torch.manual_seed(train.seed)
        arch = dataclasses.asdict(INTERPOLATOR_CONFIGS[cfg.arch])
        net = FrameInterpolator(InterpolatorConfig(**{**arch, "use_landmarks": cfg.use_landmarks, "flow_prior": cfg.flow_prior}))
        net.to(device).train()
        vae = load_vae(cfg.vae_model).to(device) if cfg.keyframe_source == "vae" else None
        T.logger.info(f"interpolator {cfg.arch}: {count_parameters(net) / 1e6:.3f} M params; global batch {train.batch_size} = "
                      f"{accelerator.num_processes} proc x {micro} x {train.grad_accum_steps} accum; keyframes: {cfg.keyframe_source}")
        # 3. data ---------------------------------------------------------------------------------
        data_path = T.ensure_dataset(cfg.data, accelerator)
        dataset = ClipDataset(T.train_split(cfg.data, data_path), "train", num_frames=max(cfg.gaps) + 1, strides=cfg.data.strides, reference="first", seed=cfg.data.seed)
        plan = T.GlobalBatchPlan(len(dataset), train.batch_size, micro, train.seed)
        # 4. optimiser / EMA ----------------------------------------------------------------------
        params = [p for p in net.parameters() if p.requires_grad]
        model, optimizer, sched, ema, state = T.prepare_optimisation(accelerator, net, params, train)
        # 5. resume -------------------------------------------------------------------------------
        T.resume(accelerator, manager, state)
        # 6. loop ---------------------------------------------------------------------------------
        def compute_loss(batch, gens):
            return objective(model, make_triplets(batch, gens, cfg, vae, device), cfg)

        def log_extra():
            return {"interp/prior_gain": float(net.prior_gain.detach()) if net.prior_gain is not None else 0.0}

        T.run_loop(accelerator, train, state, manager, tag="interp", desc="interpolator", run_dir=run_dir, plan=plan,
                   dataset=dataset, stream="interpolator", accumulate=model, params=params, optimizer=optimizer,
                   scheduler=sched, ema=ema, compute_loss=compute_loss, log_extra=log_extra, postfix=("loss", "lap"))
        # 7. export (EMA weights, atomic folder + model card) ----------------------------------------
        accelerator.wait_for_everyone()
        export = Path(cfg.export_dir)
        if accelerator.is_main_process:
            ema.store(params)
            ema.copy_to(params)
            metrics = validate(net, cfg, data_path, vae, device)
            T.logger.info("validation: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if metrics:
                accelerator.log({f"interp/{k}": v for k, v in metrics.items()}, step=state.step)
            meta = {"title": f"fastportrait {cfg.arch} frame interpolator", "steps": state.step, "samples_seen": state.samples_seen,
                    "train_minutes": round(state.wall_seconds / 60, 1), "keyframe_source": cfg.keyframe_source,
                    "vae_model": cfg.vae_model if cfg.keyframe_source == "vae" else None, "data": str(data_path),
                    "metrics": metrics, "config": config_lib.to_dict(cfg), "path": str(export)}
            net.save_pretrained(export, metadata=meta)
            ema.restore(params)
            print(f"interpolator exported to {export}")
        accelerator.wait_for_everyone()
    finally:
        accelerator.end_training()
    return export


if __name__ == "__main__":
    raise SystemExit(config_lib.run_script(InterpolatorTrainConfig, main, "Train the landmark-conditioned frame interpolator.",
                                           (T.NonFiniteLossError, FileNotFoundError, ValueError)))
