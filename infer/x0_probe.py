"""Where along the noise schedule does a model fail? The one-step x0 probe.

    python -m infer.x0_probe --model runs/teacher/tiny/model --clips 4 --frames 8 --protocol cross

For each held-out clip it noises the ground-truth latents to timestep t (the training forward process, same noise
for every t and every model), asks the denoising UNet once, conditionally (no CFG), for v, turns that into the x0
prediction ``sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v`` and decodes it. The PSNR of that frame against ground
truth, per t, says which part of the trajectory the model has learned:

* near t = 0 it is close to the VAE's own round trip (printed as ``vae``) for any model, since x_t ~ x0 there;
* at t = 999 (zero-terminal SNR: pure noise) it is what the model can infer from the reference and the pose alone.
  A model that follows the pose should approach the reference-copy baseline there or beat it; one whose loss
  weight ignores high-noise steps stays far below (BENCHMARKS.md, teacher v1).

Diagnostic only: the numbers are not a sampler's quality (``infer.evaluate`` measures that).
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm

DEFAULT_TIMESTEPS = (999, 950, 800, 600, 400, 200, 50, 0)


@torch.no_grad()
def x0_probe(model, clips, timesteps=DEFAULT_TIMESTEPS, seed: int = 0) -> dict:
    """``model``: a Pose2VideoModel; ``clips``: ``infer.evaluate.EvalClip`` list.

    Returns ``{"vae": dB, "copy_reference": dB, "t": {t: dB}}``, PSNRs pooled over the clips' frames.
    """
    from infer.metrics import psnr
    from portrait.objectives import to_unit, training_noise_scheduler

    bad = [t for t in timesteps if not 0 <= int(t) < model.scheduler_config["num_train_timesteps"]]
    if bad:
        raise ValueError(f"timesteps {bad} are outside [0, {model.scheduler_config['num_train_timesteps'] - 1}]")
    sched = training_noise_scheduler(model)
    acp = sched.alphas_cumprod
    model.eval()
    outs = {int(t): [] for t in timesteps}
    targets, vae_rt, copies = [], [], []
    for clip in tqdm(clips, desc="x0 probe", leave=False):
        target = clip.target  # (F, 3, H, W) in [0, 1]
        f = target.shape[0]
        lat = model.encode_images(target * 2 - 1)  # (F, 4, h, w), posterior mean
        latents = lat.permute(1, 0, 2, 3).unsqueeze(0)  # (1, 4, F, h, w)
        ref01 = torch.from_numpy(clip.ref).permute(2, 0, 1).unsqueeze(0).float() / 255.0
        enc = model.encode_reference_embeds(ref01)
        bank = model.compute_bank(model.encode_images(ref01 * 2 - 1), enc)
        pose = to_unit(torch.from_numpy(clip.pose)).permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3, F, H, W)
        feats = model.pose_features(pose)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed * 100003 + clip.index))
        targets.append(target)
        vae_rt.append(((model.decode_latents(lat) + 1) / 2).clamp(0, 1))
        copies.append(ref01.expand(f, -1, -1, -1))
        for t in timesteps:
            tt = torch.tensor([int(t)])
            noisy = sched.add_noise(latents, noise, tt)
            v = model.denoise(noisy, tt, enc, feats, bank).float()
            a = acp[int(t)]
            x0 = a.sqrt() * noisy - (1 - a).sqrt() * v
            outs[int(t)].append(((model.decode_latents(x0[0].permute(1, 0, 2, 3)) + 1) / 2).clamp(0, 1))
    gt = torch.cat(targets)
    return {"vae": psnr(torch.cat(vae_rt), gt), "copy_reference": psnr(torch.cat(copies), gt),
            "t": {t: psnr(torch.cat(v), gt) for t, v in outs.items()}}


def to_markdown(results: dict[str, dict]) -> str:
    ts = list(next(iter(results.values()))["t"])
    lines = ["| model | vae round trip | copy reference | " + " | ".join(f"t={t}" for t in ts) + " |",
             "|---|---|---|" + "---|" * len(ts)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['vae']:.2f} | {r['copy_reference']:.2f} | " + " | ".join(f"{r['t'][t]:.2f}" for t in ts) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from infer.evaluate import PROTOCOLS, load_eval_clips, write_report
    from portrait.models.bundle import ModelFolderError, Pose2VideoModel

    ap = argparse.ArgumentParser(prog="python -m infer.x0_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="model folder (repeat to compare models on the same noise)")
    ap.add_argument("--data", default="runs/data/synthetic64")
    ap.add_argument("--split", default="test")
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--protocol", default="cross", choices=sorted(PROTOCOLS))
    ap.add_argument("--timesteps", type=int, nargs="+", default=list(DEFAULT_TIMESTEPS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        models = {m: Pose2VideoModel.from_pretrained(m) for m in args.model}  # every folder is checked before any work
        clips = load_eval_clips(args.data, args.split, args.clips, args.frames, args.protocol)
        results = {m: x0_probe(model, clips, args.timesteps) for m, model in models.items()}
    except (FileNotFoundError, ModelFolderError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"PSNR (dB) of the decoded one-step x0 prediction, {len(clips)} clips x {args.frames} frames, "
          f"split {args.split}, protocol {args.protocol}")
    write_report({"protocol": args.protocol, "clips": len(clips), "frames": args.frames, "split": args.split,
                  "models": args.model, "results": results}, to_markdown(results), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
