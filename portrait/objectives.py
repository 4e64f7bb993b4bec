"""Training objectives as ``nn.Module`` wrappers so that DDP / DeepSpeed see one forward per step.

``TeacherDiffusionLoss`` is AniPortrait's stage 1/2 objective (train_stage_{1,2}.py, read for the facts):
v-prediction on a zero-terminal-SNR DDPM schedule, min-SNR-gamma weighting (Hang et al. 2023, gamma=5),
noise offset 0.05, and unconditional dropout 0.1 so that CFG works. Unlike upstream's training, the dropped
(unconditional) samples are built exactly as inference builds the unconditional half (zero CLIP embedding and,
in ``zero_embed`` mode, a reference bank computed from it), so training and sampling agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch import nn

from portrait.models.bundle import Pose2VideoModel


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def training_noise_scheduler(model: Pose2VideoModel) -> DDPMScheduler:
    cfg = {k: v for k, v in model.scheduler_config.items() if k in DDPMScheduler.__init__.__code__.co_varnames}
    return DDPMScheduler(**cfg)


def per_sample_randn(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def per_sample_rand(generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.rand((), generator=g) for g in generators])


class VAELoss(nn.Module):
    """AutoencoderKL reconstruction (MSE, the sd-vae-ft-mse objective) + a small KL term."""

    def __init__(self, model: Pose2VideoModel, kl_weight: float = 1e-6):
        super().__init__()
        self.vae = model.vae
        self.kl_weight = kl_weight

    def forward(self, frames: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """frames (N, 3, H, W) in [-1, 1]; eps (N, C, h, w) posterior noise -> (loss, logs)."""
        dist = self.vae.encode(frames).latent_dist
        z = dist.mean + dist.std * eps
        rec = self.vae.decode(z).sample
        mse = F.mse_loss(rec.float(), frames.float())
        kl = dist.kl().mean() / z[0].numel()
        loss = mse + self.kl_weight * kl
        return loss, {"mse": mse.detach(), "kl": kl.detach()}


class TeacherDiffusionLoss(nn.Module):
    """The teacher's denoising objective over (reference, pose clip, target clip) batches."""

    def __init__(self, model: Pose2VideoModel, snr_gamma: float = 5.0, noise_offset: float = 0.05, uncond_ratio: float = 0.1,
                 min_weight: float = 0.0):
        super().__init__()
        if not 0.0 <= min_weight <= 1.0:
            raise ValueError(f"objective.min_weight={min_weight}: must be in [0, 1] (0 = AniPortrait's min-SNR weight, 1 = plain v-MSE)")
        self.model = model
        self.noise_scheduler = training_noise_scheduler(model)
        self.snr_gamma, self.noise_offset, self.uncond_ratio = snr_gamma, noise_offset, uncond_ratio
        self.min_weight = min_weight

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-timestep weight of the v-MSE: AniPortrait's min-SNR-gamma for v-prediction, min(snr, gamma) / (snr + 1),
        floored at ``min_weight``.

        Under zero-terminal SNR that weight is 0 at t = 999 and < 0.0015 for t > 800 (tiny schedule), so the
        high-noise steps, which place the face, get no gradient. Fine-tuning SD1.5 (upstream) can afford that; a
        model trained from scratch cannot, hence the floor (1.0 turns the weight into plain v-MSE, since the
        min-SNR weight never exceeds 1).
        """
        snr = compute_snr(self.noise_scheduler, t)
        weight = torch.minimum(snr, torch.full_like(snr, self.snr_gamma)) / (snr + 1)
        return weight.clamp(min=self.min_weight)

    def forward(self, batch: dict[str, torch.Tensor], generators: list[torch.Generator]) -> tuple[torch.Tensor, dict]:
        """batch from ``ClipDataset`` (uint8 images); one generator per sample -> (loss, logs)."""
        m = self.model
        dev = m.device
        target = to_unit(batch["target"]).to(dev)  # (B, F, 3, H, W)
        b, f = target.shape[:2]
        latent_shape = (m.vae.config.latent_channels, f, target.shape[-2] // m.vae_scale_factor, target.shape[-1] // m.vae_scale_factor)
        post_eps = per_sample_randn(latent_shape, generators).to(dev)
        noise = per_sample_randn(latent_shape, generators).to(dev)
        offset = per_sample_randn((latent_shape[0], 1, 1, 1), generators).to(dev)
        t = torch.stack([torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (), generator=g) for g in generators]).to(dev)
        drop = (per_sample_rand(generators) < self.uncond_ratio).to(dev)
        with torch.no_grad():
            dist = m.vae.encode(target.flatten(0, 1)).latent_dist
            lat = (dist.mean + dist.std * post_eps.permute(0, 2, 1, 3, 4).flatten(0, 1)) * m.config.latent_scale
            latents = lat.unflatten(0, (b, f)).permute(0, 2, 1, 3, 4)  # (B, 4, F, h, w)
            ref01 = batch["ref_frame"].to(dev).float() / 255.0
            ref_latents = m.encode_images(ref01 * 2 - 1)
            enc = m.encode_reference_embeds(ref01)
        enc = torch.where(drop.view(-1, 1, 1), torch.zeros_like(enc), enc)
        active = None
        if m.config.uncond_reference == "self":
            active = ~drop  # upstream: the unconditional sample attends to itself only
        bank = m.compute_bank(ref_latents, enc)
        pose = to_unit(batch["pose"]).to(dev).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W)
        feats = m.pose_features(pose)
        # Noise offset (Guttenberg 2023) as AniPortrait: a per-channel constant shift of the noise.
        noise = noise + self.noise_offset * offset
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        v_target = self.noise_scheduler.get_velocity(latents, noise, t)
        pred = m.denoise(noisy, t, enc, feats, bank, active=active)
        mse = ((pred.float() - v_target.float()) ** 2).mean(dim=(1, 2, 3, 4))
        weight = self.loss_weight(t)
        loss = (weight * mse).mean()
        return loss, {"mse": mse.mean().detach(), "uncond_frac": drop.float().mean()}
