"""Wall time of the decode alone: the KL VAE decoder against the tiny (TAESD-architecture) decoder, on this machine.
Timing does not depend on the weights: the tiny size uses the shipped teacher and decoder, the full size random
weights of AniPortrait's VAE (configs/model/aniportrait.yaml) and of diffusers' default AutoencoderTiny (TAESD).

    python benchmarks/scripts/decoder_speed.py --threads 2 --out benchmarks/decoder_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=16, help="frames per decode call at 64^2")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--full-frames", type=int, default=1, help="frames per decode call at 512^2 (0: skip full size)")
    ap.add_argument("--full-repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/decoder_speed.json")
    args = ap.parse_args()
    from diffusers import AutoencoderTiny

    from portrait import config as config_lib
    from portrait.models.bundle import ModelConfig, load_folder_vae
    from portrait.models.tiny_decoder import decode, load_tiny_decoder
    from portrait.models.unets import build_vae

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rows = []
    with torch.no_grad():
        vae, scale = load_folder_vae("portrait/assets/tiny_teacher")
        tiny = load_tiny_decoder("portrait/assets/tiny_decoder")
        z = torch.randn(args.frames, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        kl = timed(lambda: vae.decode(z / scale).sample, args.repeats)
        td = timed(lambda: decode(tiny, z), args.repeats)
        rows.append({"size": "64^2 (shipped tiny teacher / portrait/assets/tiny_decoder)", "frames_per_call": args.frames,
                     "kl_ms_per_frame": 1e3 * statistics.median(kl) / args.frames,
                     "tiny_ms_per_frame": 1e3 * statistics.median(td) / args.frames, "repeats": args.repeats})
        if args.full_frames > 0:
            mc = config_lib.load(ModelConfig, "configs/model/aniportrait.yaml")
            big = build_vae(dict(mc.vae)).eval()
            taesd = AutoencoderTiny().eval()
            zf = torch.randn(args.full_frames, 4, 64, 64, generator=torch.Generator().manual_seed(0))
            kl = timed(lambda: big.decode(zf).sample, args.full_repeats)
            td = timed(lambda: taesd.decode(zf).sample, args.full_repeats)
            rows.append({"size": "512^2 (AniPortrait's sd-vae-ft-mse shapes / TAESD, random weights)", "frames_per_call": args.full_frames,
                         "kl_ms_per_frame": 1e3 * statistics.median(kl) / args.full_frames,
                         "tiny_ms_per_frame": 1e3 * statistics.median(td) / args.full_frames, "repeats": args.full_repeats})
    for r in rows:
        r["speedup"] = r["kl_ms_per_frame"] / r["tiny_ms_per_frame"]
        print(f"{r['size']}: KL {r['kl_ms_per_frame']:.2f} ms/frame, tiny {r['tiny_ms_per_frame']:.2f} ms/frame: {r['speedup']:.2f}x")
    Path(args.out).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "threads": args.threads,
                                          "machine": f"{platform.machine()} {torch.__version__}", "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
