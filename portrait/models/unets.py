"""Builders for the two UNets, the VAE and the image encoder from plain config dicts.

Both UNets are stock diffusers classes: ``UNet2DConditionModel`` (reference) and ``UNetMotionModel``
(denoising, AnimateDiff-v2 motion modules). Our behaviour (reference attention, per-frame motion norm,
pose injection) is attached afterwards by :mod:`portrait.models.reference`, so checkpoints stay plain.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

# SD1.5 UNet defaults (runwayml/stable-diffusion-v1-5 unet/config.json, also in the fixture
# full_size_configs.json); a model YAML overrides any of them.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    downsample_padding=1,
    use_linear_projection=False,
)

# AnimateDiff-v2 motion modules as AniPortrait configures them (inference_v2.yaml): 8 heads, 1 block,
# two temporal self-attentions, sinusoidal PE of max length 32, one module per resnet and one mid.
MOTION_DEFAULTS: dict[str, Any] = dict(num_attention_heads=8, max_seq_length=32, norm_num_groups=32, mid_block=True)


def sd_unet_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = dict(SD15_UNET)
    cfg.update(overrides or {})
    return cfg


def motion_unet_config(sd_config: dict[str, Any], motion: dict[str, Any] | None = None) -> dict[str, Any]:
    """UNetMotionModel kwargs equal to ``UNetMotionModel.from_unet2d(UNet2DConditionModel(sd), MotionAdapter(...))``.

    Derived by running diffusers' own ``from_unet2d`` on the meta device, so it can never drift from
    diffusers' block mapping. Motion layers per block must equal ``layers_per_block`` (diffusers checks).
    """
    m = dict(MOTION_DEFAULTS)
    m.update(motion or {})
    with torch.device("meta"):
        unet2d = UNet2DConditionModel(**sd_config)
        adapter = MotionAdapter(
            block_out_channels=tuple(sd_config["block_out_channels"]),
            motion_layers_per_block=sd_config["layers_per_block"],
            motion_num_attention_heads=m["num_attention_heads"],
            motion_norm_num_groups=m["norm_num_groups"],
            motion_max_seq_length=m["max_seq_length"],
            use_motion_mid_block=m["mid_block"],
        )
        motion_unet = UNetMotionModel.from_unet2d(unet2d, adapter, load_weights=False)
    return {k: v for k, v in dict(motion_unet.config).items() if not k.startswith("_")}


def build_reference_unet(sd_config: dict[str, Any]) -> UNet2DConditionModel:
    return UNet2DConditionModel(**sd_config)


def build_denoising_unet(sd_config: dict[str, Any], motion: dict[str, Any] | None = None, time_cond_proj_dim: int | None = None) -> UNetMotionModel:
    cfg = motion_unet_config(sd_config, motion)
    if time_cond_proj_dim is not None:
        cfg["time_cond_proj_dim"] = time_cond_proj_dim
    unet = UNetMotionModel(**cfg)
    # AnimateDiff / AniPortrait zero-initialise each motion module's proj_out (zero_initialize_proj_out: true),
    # so a fresh motion UNet is exactly its spatial UNet and stage 2 starts from stage 1's model.
    for module in motion_modules(unet):
        _zero_proj_out(module)
    return unet


def motion_modules(unet: UNetMotionModel) -> list[torch.nn.Module]:
    """The temporal transformers (``*.motion_modules.N``) of a motion UNet, in module order."""
    return [m for n, m in unet.named_modules()
            if ".motion_modules." in f".{n}" and n.split(".")[-1].isdigit() and hasattr(m, "proj_out")]


@torch.no_grad()
def _zero_proj_out(module: torch.nn.Module) -> None:
    module.proj_out.weight.zero_()
    module.proj_out.bias.zero_()


def motion_modules_are_identity(unet: UNetMotionModel) -> bool:
    """True when every motion module's zero-initialised ``proj_out`` is still zero, i.e. the motion UNet computes
    exactly its spatial UNet (the state stage 1 trains in)."""
    return all(not m.proj_out.weight.any() and not m.proj_out.bias.any() for m in motion_modules(unet))


@torch.no_grad()
def reset_motion_modules(unet: UNetMotionModel, seed: int = 0) -> int:
    """Re-initialise every motion module as a fresh ``build_denoising_unet`` would (default inits drawn from
    ``seed``, ``proj_out`` zeroed), leaving the spatial layers untouched. Returns the number of modules reset.

    Used to continue stage 1 from a finished teacher: stage 1 trains the spatial layers with the motion modules at
    identity, and stage 2 then trains the motion modules afresh on the new spatial layers.
    """
    mods = motion_modules(unet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for mod in mods:
            for sub in mod.modules():
                if sub is not mod and hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
            _zero_proj_out(mod)
    return len(mods)


def build_vae(cfg: dict[str, Any]) -> AutoencoderKL:
    n = len(cfg.get("block_out_channels", [128, 256, 512, 512]))
    defaults = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        act_fn="silu",
        scaling_factor=0.18215,
    )
    defaults.update(cfg)
    return AutoencoderKL(**defaults)


def build_image_encoder(cfg: dict[str, Any]) -> CLIPVisionModelWithProjection:
    # CLIP ViT-L/14 with 768 projection by default (AniPortrait uses sd-image-variations' image_encoder).
    defaults = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=24,
        patch_size=14,
        image_size=224,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        num_channels=3,
    )
    defaults.update(cfg)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**defaults))
