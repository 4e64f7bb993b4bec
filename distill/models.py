"""Teacher, student and target for step/guidance distillation, and the teacher's guided prediction.

One :class:`~portrait.models.bundle.Pose2VideoModel` (the *student bundle*) holds the frozen parts every
network shares -- VAE, image encoder, reference UNet, pose guider -- plus the trainable student denoising UNet.
The frozen teacher UNet and the EMA target UNet are separate ``UNetMotionModel`` copies attached to that bundle
with ``attach_unet`` (same reference bank, same pose injection) but never registered as submodules, so
accelerate / DDP / DeepSpeed only ever see the student (:class:`FrozenNets` is a plain holder).

The student is the teacher with the guidance scale folded in (LCM, Luo et al. 2023 §4.1; Meng et al. 2023):
the same UNet with ``time_cond_proj_dim`` set, i.e. a ``cond_proj`` linear layer adding a w-embedding to the
time embedding. ``cond_proj`` starts at zero, so at initialisation the student *is* the teacher's unguided
(conditional) prediction for every w. w uses the usual CFG convention (teacher default 3.5) and is embedded
with :func:`~portrait.models.guidance.guidance_embedding`, which embeds ``w - 1`` -- LCM's own w (its CFG is
``eps_c + w_lcm (eps_c - eps_u)``) -- so our students and diffusers' LCM pipelines agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers import UNetMotionModel

from portrait.models.bundle import Pose2VideoModel
from portrait.models.guidance import guidance_embedding


@dataclass
class FrozenNets:
    """The networks that sit OUTSIDE the accelerate-prepared module (plain attributes, not submodules).

    teacher: frozen copy of the teacher's denoising UNet (no ``cond_proj``).
    target: the EMA target of the student (consistency modes), or None (guidance mode).
    """

    teacher: UNetMotionModel
    target: UNetMotionModel | None = None

    def to(self, device: torch.device | str, teacher_dtype: torch.dtype | None = None) -> FrozenNets:
        self.teacher.to(device=device, dtype=teacher_dtype)
        if self.target is not None:
            self.target.to(device)  # the EMA target stays fp32 (LCM keeps target_unet in fp32)
        return self


@dataclass
class Conditioning:
    """What one training batch is conditioned on, computed once per sample and shared by all networks.

    enc: (B, 1, D) CLIP image embeds of the reference. feats: 5 pose maps (B*F, C_i, h_i, w_i).
    bank: reference bank from ``enc``. bank_uncond: bank from zero embeds (``uncond_reference: zero_embed``) or
    None (``self``: the unconditional half attends to itself only, as upstream).
    """

    enc: torch.Tensor
    feats: list[torch.Tensor]
    bank: dict[str, torch.Tensor]
    bank_uncond: dict[str, torch.Tensor] | None


def copy_unet(unet: UNetMotionModel, time_cond_proj_dim: int | None | str = "keep") -> UNetMotionModel:
    """A fresh ``UNetMotionModel`` with ``unet``'s weights (hooks and processors are not copied).

    ``time_cond_proj_dim``: "keep", None (drop ``cond_proj``) or an int (add a zero-initialised ``cond_proj``).
    Only ``time_embedding.cond_proj.weight`` may differ between the two state dicts (checked).
    """
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    if time_cond_proj_dim != "keep":
        cfg["time_cond_proj_dim"] = time_cond_proj_dim
    new = UNetMotionModel.from_config(cfg)
    keys = set(new.state_dict())
    state = {k: v for k, v in unet.state_dict().items() if k in keys or "cond_proj" not in k}
    missing, unexpected = new.load_state_dict(state, strict=False)
    allowed = {"time_embedding.cond_proj.weight"}
    if set(missing) - allowed or unexpected:
        raise RuntimeError(f"cannot copy the denoising UNet (pruned teachers are not supported yet): missing {missing}, unexpected {unexpected}")
    if missing:
        with torch.no_grad():
            new.time_embedding.cond_proj.weight.zero_()
    ref = next(unet.parameters())
    new.to(ref.device)
    return new if ref.dtype == torch.float32 else new.to(ref.dtype)


def build_student(teacher: Pose2VideoModel, w_embed_dim: int, with_target: bool, metadata: dict | None = None) -> tuple[Pose2VideoModel, FrozenNets]:
    """Teacher bundle -> (student bundle, frozen teacher/target UNets attached to it).

    The student bundle *reuses* the teacher's VAE, image encoder, reference UNet and pose guider (frozen) and
    gets a copy of the teacher's denoising UNet with a zero ``cond_proj`` of input size ``w_embed_dim``
    (LCM uses 256). The teacher bundle must not be used afterwards: its reference UNet now writes into the
    student bundle's bank.
    """
    if teacher.config.time_cond_proj_dim is not None:
        raise ValueError("the teacher already has a guidance embedding (time_cond_proj_dim); distil from an undistilled teacher")
    if w_embed_dim % 2:
        raise ValueError(f"w_embed_dim must be even, got {w_embed_dim}")
    student_unet = copy_unet(teacher.denoising_unet, w_embed_dim)
    teacher_unet = copy_unet(teacher.denoising_unet)
    cfg = dataclasses.replace(teacher.config, time_cond_proj_dim=w_embed_dim)
    student = Pose2VideoModel(teacher.vae, teacher.image_encoder, teacher.reference_unet, student_unet, teacher.pose_guider,
                              teacher.scheduler_config, cfg, metadata)
    student.requires_grad_(False)
    student.denoising_unet.requires_grad_(True)  # full fine-tuning, motion modules included
    nets = FrozenNets(teacher=student.attach_unet(teacher_unet).requires_grad_(False).eval())
    if with_target:
        nets.target = student.attach_unet(copy_unet(student_unet)).requires_grad_(False).eval()
    return student, nets


def per_sample_pose_features(model: Pose2VideoModel, pose: torch.Tensor) -> list[torch.Tensor]:
    """(B, 3, F, H, W) in [-1, 1] -> 5 maps (B*F, C_i, h_i, w_i), the pose guider run on each clip alone.

    The faithful pose guider normalises with the statistics of its input batch (upstream quirk); inference
    runs it on one video window at a time, so distillation does too. This also keeps every sample independent
    of how the global batch is split over processes (2 processes x b == 1 process x 2b).
    """
    per = [model.pose_features(pose[i : i + 1]) for i in range(pose.shape[0])]
    return [torch.cat(level) for level in zip(*per)]


@torch.no_grad()
def conditioning(model: Pose2VideoModel, ref01: torch.Tensor, pose: torch.Tensor, guided: bool) -> Conditioning:
    """Reference images (B, 3, H, W) in [0, 1] and pose (B, 3, F, H, W) in [-1, 1] -> :class:`Conditioning`.

    The reference UNet runs once per sample (both banks in one batched call in ``zero_embed`` mode), exactly
    as ``Pose2VideoPipeline.prepare`` does for one video.
    """
    ref_latents = model.encode_images(ref01 * 2 - 1)
    enc = model.encode_reference_embeds(ref01)
    b = enc.shape[0]
    bank_uncond = None
    if guided and model.config.uncond_reference == "zero_embed":
        both = model.compute_bank(torch.cat([ref_latents, ref_latents]), torch.cat([torch.zeros_like(enc), enc]))
        bank_uncond = {k: v[:b] for k, v in both.items()}
        bank = {k: v[b:] for k, v in both.items()}
    else:
        bank = model.compute_bank(ref_latents, enc)
    return Conditioning(enc, per_sample_pose_features(model, pose), bank, bank_uncond)


def guided_prediction(model: Pose2VideoModel, unet: UNetMotionModel | None, x: torch.Tensor, t: torch.Tensor,
                      cond: Conditioning, w: torch.Tensor) -> torch.Tensor:
    """The teacher's classifier-free-guided output with AniPortrait's semantics, one batched call.

    The unconditional half gets a zero CLIP embedding and, per ``model.config.uncond_reference``, its own bank
    ("zero_embed") or no reference attention ("self"); both halves see the pose. Combination in the usual
    convention, v_u + w (v_c - v_u) (Ho & Salimans 2022), exactly ``Pose2VideoPipeline.model_fn``.

    Args:
        unet: an attached teacher UNet, or None for the bundle's own UNet.
        x: (B, 4, F, h, w); t: (B,) or scalar timesteps; w: (B,) guidance scales.
    Returns:
        (B, 4, F, h, w) guided prediction (v), float32.
    """
    b = x.shape[0]
    t = torch.as_tensor(t, device=x.device).expand(b) if torch.as_tensor(t).ndim == 0 else t.to(x.device)
    if cond.bank_uncond is not None:
        bank = {k: torch.cat([cond.bank_uncond[k], v]) for k, v in cond.bank.items()}
        active = None
    else:
        bank = {k: torch.cat([v, v]) for k, v in cond.bank.items()}
        active = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
    feats2 = [torch.cat([f, f]) for f in cond.feats]
    enc2 = torch.cat([torch.zeros_like(cond.enc), cond.enc])
    out = model.denoise(torch.cat([x, x]), torch.cat([t, t]), enc2, feats2, bank, active=active, unet=unet).float()
    v_u, v_c = out.chunk(2)
    return v_u + w.float().to(x.device).view(-1, 1, 1, 1, 1) * (v_c - v_u)


def student_prediction(model: Pose2VideoModel, unet: UNetMotionModel | None, x: torch.Tensor, t: torch.Tensor,
                       cond: Conditioning, w: torch.Tensor) -> torch.Tensor:
    """One evaluation of a w-conditioned UNet (student or target): conditional half only, w via ``cond_proj``.

    x: (B, 4, F, h, w); t: (B,); w: (B,) usual-convention guidance scales -> (B, 4, F, h, w) raw output (v).
    """
    net = model.denoising_unet if unet is None else unet
    emb = guidance_embedding(w, net.config.time_cond_proj_dim).to(x.device, net.dtype)
    return model.denoise(x, t, cond.enc, cond.feats, cond.bank, timestep_cond=emb, unet=unet)


@torch.no_grad()
def update_target(target: UNetMotionModel, student: UNetMotionModel, decay: float) -> None:
    """EMA target update, LCM's ``update_ema``: target <- decay * target + (1 - decay) * student (fixed decay).

    Every process applies it to identical synced weights, so the target stays identical across processes.
    """
    for tp, sp in zip(target.parameters(), student.parameters()):
        tp.lerp_(sp.detach().to(tp.dtype), 1.0 - decay)


class AttachedView:
    """A pipeline-facing view of a bundle that runs another attached UNet (e.g. the frozen teacher).

    ``Pose2VideoPipeline(AttachedView(student, nets.teacher, teacher_config))`` samples the teacher through the
    student bundle's shared VAE / encoders / pose guider without building a second bundle (which would
    re-install the reference UNet's bank writers). Everything except ``denoise``, ``config`` and ``metadata``
    is the bundle's.
    """

    def __init__(self, bundle: Pose2VideoModel, unet: UNetMotionModel, config, metadata: dict | None = None):
        self._bundle, self._unet = bundle, unet
        self.config = config
        self.metadata = dict(metadata or {})

    def __getattr__(self, name: str):
        return getattr(self._bundle, name)

    @property
    def dtype(self) -> torch.dtype:
        return next(self._unet.parameters()).dtype

    def denoise(self, *args, **kwargs) -> torch.Tensor:
        kwargs.setdefault("unet", self._unet)
        return self._bundle.denoise(*args, **kwargs)
