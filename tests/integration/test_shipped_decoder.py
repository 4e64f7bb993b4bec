"""The shipped tiny VAE decoder (portrait/assets/tiny_decoder) loads, belongs to the shipped teacher's VAE, and decodes
that VAE's latents of identities no split holds close to the KL decoder, at a fraction of its MACs."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "portrait" / "assets" / "tiny_decoder"
TEACHER = REPO / "portrait" / "assets" / "tiny_teacher"


def test_shipped_decoder_imitates_the_shipped_teachers_vae():
    from infer.metrics import psnr
    from portrait.data.synthetic import generate_clip
    from portrait.flops import count_flops
    from portrait.models.bundle import load_folder_vae
    from portrait.models.tiny_decoder import decode, load_tiny_decoder, signature_matches, vae_signature

    assert (SHIPPED / "diffusion_pytorch_model.safetensors").stat().st_size < 1 * 2**20
    tiny = load_tiny_decoder(SHIPPED)
    vae, scale = load_folder_vae(TEACHER)
    assert signature_matches(tiny.fastportrait["vae_signature"], vae_signature(vae))
    assert tiny.fastportrait["latent_scale"] == scale
    frames = []
    for seed in range(3):  # identities outside every split (the interpolator test's seeds)
        clip = generate_clip(identity_seed=987654321 + seed, motion_seed=5 + seed, num_frames=16, size=64)
        frames.append(torch.from_numpy(clip["frames"][::3]).permute(0, 3, 1, 2).float() / 255)
    x = torch.cat(frames)
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latent_dist.mean * scale
        kl = ((vae.decode(z / scale).sample + 1) / 2).clamp(0, 1)
        td = ((decode(tiny, z) + 1) / 2).clamp(0, 1)
        blur = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(kl, 4), scale_factor=4, mode="bilinear")
    # the bar is the KL decode at a quarter of the resolution: a decoder that learned nothing of the detail is below it
    assert psnr(td, kl) > psnr(blur, kl) + 3, (psnr(td, kl), psnr(blur, kl))
    assert psnr(td, x) > psnr(kl, x) - 1.5  # against the frames, nearly what the KL decoder itself gets
    macs_kl = count_flops(lambda: vae.decoder(vae.post_quant_conv(z / scale))).macs
    macs_td = count_flops(lambda: tiny.decoder(z)).macs
    assert macs_td < 0.5 * macs_kl  # 0.43x (benchmarks/decoder_macs.json)
