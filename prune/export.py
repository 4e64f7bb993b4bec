"""What a pruned model folder records (``metadata["pruning"]``) and its model card.

``metadata["pruning"]``: source model, importance, scope, ratio(s), rounds, KD recipe, and ``cost``: MACs and parameters
per UNet evaluation before/after (``prune.count``) plus wall time per evaluation on the exporting machine. ``metrics``:
a quick held-out evaluation (``infer.evaluate``) of the export and of its unpruned source. Student metadata (sampler,
default steps) is inherited unchanged, so ``infer.animate`` samples a pruned student exactly like the unpruned one.
"""

from __future__ import annotations

from portrait.models.bundle import Pose2VideoModel, default_model_card


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def pruned_model_card(model: Pose2VideoModel, meta: dict) -> str:
    p = meta.get("pruning", {})
    cost = p.get("cost", {})
    metrics = meta.get("metrics") or {}
    base = default_model_card(model, {k: v for k, v in meta.items() if k not in ("config", "pruning", "metrics", "sampler_options", "distillation")})
    rows = []
    for name, row in metrics.items():
        if isinstance(row, dict):
            rows.append(f"| {name} | " + " | ".join(_fmt(row.get(c, "")) for c in ("psnr_gt", "ssim_gt", "landmark_error", "flicker")) + " |")
    metric_table = "\n".join(rows) or "| (not measured) | | | | |"

    def c(key, scale=1.0, unit=""):
        v = cost.get(key)
        return f"{v / scale:.4g}{unit}" if isinstance(v, (int, float)) else "n/a"

    steps = meta.get("default_steps")
    return base + f"""
## Pruning

Structured channel pruning of the denoising UNet (torch-pruning dependency graph; internal widths only: ResNet
`conv1`/`norm2`/`time_emb_proj` in whole GroupNorm groups, whole attention heads, GEGLU inner width, motion-module
attention and feed-forward) followed by knowledge-distillation recovery against the unpruned UNet.

| | |
|---|---|
| source (unpruned) | `{p.get('source')}` |
| importance / scope | `{p.get('importance')}` / `{p.get('scope')}` |
| global ratio (fraction of units removed) | {_fmt(p.get('ratio'))} |
| per-block / per-kind ratios | {p.get('block_ratios') or '-'} / {p.get('kind_ratios') or '-'} |
| rounds (iterative pruning) | {p.get('rounds')} |
| recovery | {p.get('recovery')} |
| MACs per UNet evaluation ({cost.get('frames')} frames, SDPA counted) | {c('macs_before', 1e9, ' G')} -> {c('macs_after', 1e9, ' G')} (-{c('mac_reduction', 0.01, ' %')}) |
| parameters of the denoising UNet | {c('params_before', 1e6, ' M')} -> {c('params_after', 1e6, ' M')} (-{c('param_reduction', 0.01, ' %')}) |
| wall time per UNet evaluation ({cost.get('threads')} CPU threads) | {c('seconds_before', 1e-3, ' ms')} -> {c('seconds_after', 1e-3, ' ms')} |
| KD optimisation steps / samples seen | {meta.get('train_steps')} / {meta.get('samples_seen')} |

The widths are stored in `denoising_unet/widths.json`; `Pose2VideoModel.from_pretrained` rebuilds them.

```bash
python -m infer.animate --model MODEL_DIR --ref ref.png --pose pose.mp4 --out out.mp4{f' --steps {steps}' if steps else ''}
python -m prune.count MODEL_DIR --compare {p.get('source')}
```

### Metrics (held-out identities, same noise; {metrics.get('_protocol', 'self-reenactment')})

| row | PSNR | SSIM | landmark error | flicker |
|---|---|---|---|---|
{metric_table}
"""
