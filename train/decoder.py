"""Distil the KL VAE's decoder of a model folder into a tiny TAESD-architecture decoder (``portrait/models/tiny_decoder.py``).

    bash launch.sh decoder                                                   # the embedded tiny CPU default
    bash launch.sh decoder --config configs/decoder/tiny.yaml train.threads=2
    accelerate launch train/decoder.py --config configs/decoder/tiny.yaml vae_model=runs/teacher/tiny/model
    accelerate launch train/decoder.py --config configs/decoder/taesd_aniportrait.yaml      # full size, 512^2 frames
    python train/decoder.py --config configs/decoder/tiny.yaml train.max_steps=2 train.tracker=none --dry-run

Re-running the same command resumes from the last complete checkpoint in ``train.run_dir/checkpoints``.

Each sample is a training frame x. The teacher VAE gives its posterior; z is a posterior sample (mean + std * eps,
the latents the UNet was trained to produce) in UNet space (x ``latent_scale`` of the model folder), perturbed by
Gaussian noise of std U(0, ``latent_noise``) so that the decoder also sees latents a few-step student leaves slightly
off the data manifold. The target is the KL decoder's image of that same z: the tiny decoder learns to *be* the
teacher's decoder (TAESD's recipe, without its adversarial term), not to reconstruct x.

Loss = Laplacian-pyramid L1 (``portrait/interpolation.py``) between decoded images + ``encoder_weight`` x MSE between
the tiny encoder's latents and the posterior mean (the encoder half makes the folder a complete ``AutoencoderTiny``;
fastportrait itself encodes the reference image with the KL VAE). Export validates on held-out frames: PSNR of the
tiny decode against the KL decode and against the frame, next to the KL round trip's.
"""

from __future__ import annotations

import sys

if not __package__:  # launched by path: put the repo root first (DESIGN §2)
    from pathlib import Path as _P

    sys.path[0] = str(_P(__file__).resolve().parents[1])

from dataclasses import dataclass, field
from pathlib import Path

import torch

from portrait import config as config_lib
from portrait import interpolation as I
from portrait import training as T
from portrait.data.dataset import ClipDataset
from portrait.models import tiny_decoder as TD
from portrait.models.bundle import load_folder_vae


@dataclass
class DecoderTrainConfig:
    arch: str = "tiny"  # TINY_DECODER_CONFIGS name: tiny (the embedded 4x VAE) | taesd (SD1.5 / AniPortrait, 8x)
    vae_model: str = "portrait/assets/tiny_teacher"  # model folder whose VAE is distilled
    frames_per_clip: int = 4  # frames taken from each sampled clip (train.batch_size counts clips: 8 x 4 = 32 frames)
    latent_noise: float = 0.1  # max std of the Gaussian perturbation of z (UNet-space units)
    lap_levels: int = 4
    encoder_weight: float = 0.1
    val_frames: int = 128  # held-out (val split) frames scored at export
    export_dir: str = "runs/decoder/tiny/model"
    data: T.DataConfig = field(default_factory=lambda: T.DataConfig(strides=[4], reference="first"))
    train: T.TrainConfig = field(default_factory=lambda: T.TrainConfig(
        run_dir="runs/decoder/tiny", batch_size=8, max_steps=3000, lr=2e-3, lr_schedule="cosine", lr_warmup_steps=50,
        ema_decay=0.99, checkpoint_every=500, log_every=20))


def frames_of(batch: dict) -> torch.Tensor:
    """uint8 clip targets (B, F, 3, H, W) -> float frames (B F, 3, H, W) in [-1, 1]."""
    x = batch["target"]
    return x.reshape(-1, *x.shape[2:]).float() / 127.5 - 1


@torch.no_grad()
def teacher_targets(vae, x: torch.Tensor, scale: float, gens: list[torch.Generator], per_sample: int,
                    latent_noise: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z in UNet space (N, C, h, w), the KL decode of z (N, 3, H, W) in [-1, 1], posterior mean in UNet space)."""
    post = vae.encode(x).latent_dist
    # Noise per sample from that sample's generator: reproducible across resume and process counts.
    eps = torch.cat([torch.randn((per_sample, *post.mean.shape[1:]), generator=g) for g in gens]).to(x.device)
    sig = torch.cat([torch.rand((per_sample, 1, 1, 1), generator=g) for g in gens]).to(x.device) * latent_noise
    pert = torch.cat([torch.randn((per_sample, *post.mean.shape[1:]), generator=g) for g in gens]).to(x.device)
    z = (post.mean + post.std * eps) * scale + sig * pert
    target = vae.decode(z / scale).sample
    return z, target, post.mean * scale


class DistilHead(torch.nn.Module):
    """One forward over both halves, so that DDP / DeepSpeed see every trained parameter in the wrapped call
    (``AutoencoderTiny.forward`` is encode -> 8-bit quantise -> decode, not what is trained here)."""

    def __init__(self, tiny):
        super().__init__()
        self.tiny = tiny

    def forward(self, x: torch.Tensor, z: torch.Tensor, encode: bool = True):
        enc = self.tiny.encoder(x) if encode else None
        return enc, self.tiny.decoder(z / self.tiny.config.scaling_factor)


def objective(head, vae, batch, gens, cfg: DecoderTrainConfig, scale: float, device) -> tuple[torch.Tensor, dict]:
    """The distillation loss of one micro-batch of clips (``head``: the prepared :class:`DistilHead`)."""
    x = frames_of(batch).to(device)
    z, target, mean = teacher_targets(vae, x, scale, gens, cfg.frames_per_clip, cfg.latent_noise)
    enc, pred = head(x, z, encode=cfg.encoder_weight > 0)
    parts = {"lap": I.laplacian_l1(pred, target, None, cfg.lap_levels)}
    if enc is not None:
        parts["enc"] = torch.nn.functional.mse_loss(enc, mean)
    loss = parts["lap"] + cfg.encoder_weight * parts.get("enc", 0.0)
    return loss, {k: v.detach() for k, v in parts.items()}


@torch.no_grad()
def validate(tiny, vae, scale: float, cfg: DecoderTrainConfig, data_path: Path, device) -> dict:
    """PSNR on ``val_frames`` held-out frames (posterior means): tiny vs KL decode, tiny vs frame, KL vs frame."""
    from infer.metrics import psnr

    ds = ClipDataset(data_path, "val", num_frames=cfg.frames_per_clip, strides=cfg.data.strides, reference="first", seed=1)
    n = min(-(-cfg.val_frames // cfg.frames_per_clip), len(ds))
    if n == 0:
        return {}
    x = frames_of(T.load_items(ds, [(0, i, i) for i in range(n)])).to(device)
    was = tiny.training
    tiny.eval()
    kl, tn = [], []
    for xb in x.split(32):
        z = vae.encode(xb).latent_dist.mean * scale
        kl.append(vae.decode(z / scale).sample)
        tn.append(TD.decode(tiny, z))
    tiny.train(was)
    kl, tn = ((torch.cat(v).clamp(-1, 1) + 1) / 2 for v in (kl, tn))
    gt = (x + 1) / 2
    return {"val_psnr_tiny_vs_kl": psnr(tn, kl), "val_psnr_tiny_vs_frame": psnr(tn, gt), "val_psnr_kl_vs_frame": psnr(kl, gt),
            "val_frames": int(x.shape[0])}


def main(cfg: DecoderTrainConfig) -> Path:
    # 1. setup ------------------------------------------------------------------------------------
    if cfg.arch not in TD.TINY_DECODER_CONFIGS:
        raise config_lib.ConfigError(f"arch must be one of {sorted(TD.TINY_DECODER_CONFIGS)}, got {cfg.arch!r}")
    if cfg.frames_per_clip < 1:
        raise config_lib.ConfigError(f"frames_per_clip must be >= 1, got {cfg.frames_per_clip}")
    if cfg.latent_noise < 0:
        raise config_lib.ConfigError(f"latent_noise must be >= 0, got {cfg.latent_noise}")
    train = cfg.train
    run_dir = Path(train.run_dir)
    accelerator = T.make_accelerator(train, run_dir)
    T.write_run_config(run_dir, cfg, accelerator)
    T.init_tracker(accelerator, train, "decoder", cfg)
    micro = T.per_process_batch(train, accelerator.num_processes)  # clips; each gives frames_per_clip frames
    manager = T.CheckpointManager(run_dir, train.keep_checkpoints)
    device = accelerator.device
    try:
        # 2. models -------------------------------------------------------------------------------
        vae, scale = load_folder_vae(cfg.vae_model, "vae_model of the decoder distillation")
        vae.to(device)
        torch.manual_seed(train.seed)
        tiny = TD.build_tiny_decoder(cfg.arch, vae.config.latent_channels).to(device).train()
        sf = 2 ** (len(vae.config.block_out_channels) - 1)
        if TD.upsampling_factor(tiny) != sf:
            raise config_lib.ConfigError(f"arch {cfg.arch!r} upsamples {TD.upsampling_factor(tiny)}x but the VAE of "
                                         f"{cfg.vae_model} is {sf}x; choose the arch that matches (tiny: 4x, taesd: 8x)")
        n_dec = sum(p.numel() for p in tiny.decoder.parameters())
        n_kl = sum(p.numel() for p in vae.decoder.parameters()) + sum(p.numel() for p in vae.post_quant_conv.parameters())
        T.logger.info(f"tiny decoder {cfg.arch}: {n_dec / 1e6:.3f} M decoder params (KL decoder {n_kl / 1e6:.3f} M); global batch "
                      f"{train.batch_size * cfg.frames_per_clip} frames = {accelerator.num_processes} proc x {micro} clips x "
                      f"{cfg.frames_per_clip} frames x {train.grad_accum_steps} accum; latent scale {scale:.4g}")
        # 3. data ---------------------------------------------------------------------------------
        data_path = T.ensure_dataset(cfg.data, accelerator)
        dataset = ClipDataset(T.train_split(cfg.data, data_path), "train", num_frames=cfg.frames_per_clip,
                              strides=cfg.data.strides, reference="first", seed=cfg.data.seed)
        plan = T.GlobalBatchPlan(len(dataset), train.batch_size, micro, train.seed)
        # 4. optimiser / EMA ----------------------------------------------------------------------
        head = DistilHead(tiny)
        params = [p for p in tiny.parameters() if p.requires_grad]
        model, optimizer, sched, ema, state = T.prepare_optimisation(accelerator, head, params, train)
        # 5. resume -------------------------------------------------------------------------------
        T.resume(accelerator, manager, state)
        # 6. loop ---------------------------------------------------------------------------------
        def compute_loss(batch, gens):
            return objective(model, vae, batch, gens, cfg, scale, device)

        T.run_loop(accelerator, train, state, manager, tag="decoder", desc="tiny decoder", run_dir=run_dir, plan=plan,
                   dataset=dataset, stream="decoder", accumulate=model, params=params, optimizer=optimizer,
                   scheduler=sched, ema=ema, compute_loss=compute_loss, postfix=("loss", "lap"))
        # 7. export (EMA weights, atomic folder + model card) ----------------------------------------
        accelerator.wait_for_everyone()
        export = Path(cfg.export_dir)
        if accelerator.is_main_process:
            ema.store(params)
            ema.copy_to(params)
            metrics = validate(tiny, vae, scale, cfg, data_path, device)
            T.logger.info("validation: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if metrics:
                accelerator.log({f"decoder/{k}": v for k, v in metrics.items()}, step=state.step)
            meta = {"title": f"fastportrait tiny VAE decoder (arch {cfg.arch})", "arch": cfg.arch, "vae_model": cfg.vae_model,
                    "latent_scale": scale, "vae_signature": TD.vae_signature(vae), "steps": state.step, "samples_seen": state.samples_seen,
                    "train_minutes": round(state.wall_seconds / 60, 1), "data": str(data_path), "metrics": metrics,
                    "decoder_params": n_dec, "kl_decoder_params": n_kl, "config": config_lib.to_dict(cfg)}
            TD.save_tiny_decoder(tiny, export, meta)
            ema.restore(params)
            print(f"tiny decoder exported to {export}")
        accelerator.wait_for_everyone()
    finally:
        accelerator.end_training()
    return export


if __name__ == "__main__":
    raise SystemExit(config_lib.run_script(DecoderTrainConfig, main, "Distil the VAE decoder into a tiny TAESD-style decoder.",
                                           (T.NonFiniteLossError, FileNotFoundError, ValueError)))
