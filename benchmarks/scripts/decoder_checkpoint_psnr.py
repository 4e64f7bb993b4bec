"""PSNR of a tiny-decoder training checkpoint (raw weights, not the EMA) against the KL decoder it imitates, on
15 frames of 3 synthetic identities that no split holds (the shipped-decoder test's frames), posterior-mean latents.
Used to compare architectures at equal steps.

    python benchmarks/scripts/decoder_checkpoint_psnr.py --run runs/decoder/tiny --step 500 --arch tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True)
    ap.add_argument("--step", type=int, required=True)
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--teacher", default="portrait/assets/tiny_teacher")
    args = ap.parse_args()
    from safetensors.torch import load_file

    from infer.metrics import psnr
    from portrait.data.synthetic import generate_clip
    from portrait.models import tiny_decoder as TD
    from portrait.models.bundle import load_folder_vae

    torch.set_num_threads(1)
    state = load_file(str(Path(args.run) / "checkpoints" / f"step-{args.step:07d}" / "model.safetensors"))
    tiny = TD.build_tiny_decoder(args.arch).eval()
    tiny.load_state_dict({k.removeprefix("tiny."): v for k, v in state.items()})  # DistilHead's prefix
    vae, scale = load_folder_vae(args.teacher)
    x = torch.cat([torch.from_numpy(generate_clip(identity_seed=987654321 + s, motion_seed=5 + s, num_frames=16, size=64)["frames"][::3])
                   .permute(0, 3, 1, 2).float() / 255 for s in range(3)])
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latent_dist.mean * scale
        kl = ((vae.decode(z / scale).sample + 1) / 2).clamp(0, 1)
        td = ((TD.decode(tiny, z) + 1) / 2).clamp(0, 1)
        blur2 = F.interpolate(F.avg_pool2d(kl, 2), scale_factor=2, mode="bilinear")
        blur4 = F.interpolate(F.avg_pool2d(kl, 4), scale_factor=4, mode="bilinear")
    print(f"{args.run} step {args.step} ({args.arch}): tiny vs KL {psnr(td, kl):.2f} dB; tiny vs frame {psnr(td, x):.2f}; "
          f"KL vs frame {psnr(kl, x):.2f}; KL blurred 2x / 4x vs KL {psnr(blur2, kl):.2f} / {psnr(blur4, kl):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
