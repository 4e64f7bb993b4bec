"""What a distilled student's model folder records: sampler defaults (read by ``infer``) and its model card.

``metadata`` keys read by inference:

* ``sampler``: ``lcm`` | ``phased`` | ``ddim`` -- the pipeline's and ``infer.animate``'s default.
* ``sampler_options``: keyword options of that sampler, e.g. ``{"solver_steps": 50}`` (the grid the student was
  distilled on; ``infer.samplers.get_sampler`` binds the ones a sampler accepts).
* ``default_steps``: ``infer.animate``'s default ``--steps``.

``distillation`` records the recipe (teacher, mode, steps, guidance range, solver grid, loss, EMA) and
``metrics`` is left for evaluations to fill in (``infer.evaluate``).
"""

from __future__ import annotations

from typing import Any

from portrait.models.bundle import Pose2VideoModel, default_model_card

SAMPLER_OF_MODE = {"lcm": "lcm", "phased": "phased", "guidance": "ddim"}


def sampler_metadata(mode: str, num_steps: int, solver_steps: int, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> dict[str, Any]:
    """The inference defaults a student of ``mode`` records (see the module docstring)."""
    options: dict[str, Any] = {}
    if mode == "lcm":
        options = {"solver_steps": solver_steps, "sigma_data": sigma_data, "timestep_scaling": timestep_scaling}
    elif mode == "phased":
        options = {"solver_steps": solver_steps}
    return {"sampler": SAMPLER_OF_MODE[mode], "sampler_options": options, "default_steps": num_steps, "default_guidance": 3.5}


def student_model_card(model: Pose2VideoModel, meta: dict) -> str:
    """The default card plus a distillation section with copy-paste commands."""
    d = meta.get("distillation", {})
    steps = meta.get("default_steps")
    metrics = meta.get("metrics") or {}
    metric_rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items()) or "| (not measured yet) | |"
    base = default_model_card(model, {k: v for k, v in meta.items() if k not in ("config", "distillation", "metrics", "sampler_options")})
    return base + f"""
## Distillation

| | |
|---|---|
| teacher | `{d.get('teacher')}` ({d.get('teacher_title', '')}) |
| mode | `{d.get('mode')}` |
| default steps / sampler | {steps} / `{meta.get('sampler')}` {meta.get('sampler_options') or ''} |
| guidance range w (usual CFG convention; the embedding is of w-1) | {d.get('guidance_range')} |
| solver grid | {d.get('solver_steps')}-point trailing DDIM grid of the teacher's schedule |
| loss | {d.get('loss')} |
| EMA target decay | {d.get('target_decay')} |
| clip frames | {d.get('num_frames')} |
| data | `{meta.get('data')}` |
| optimisation steps / samples seen | {meta.get('train_steps')} / {meta.get('samples_seen')} |

```bash
python -m infer.animate --model MODEL_DIR --ref ref.png --pose pose.mp4 --out out.mp4 --steps {steps} --guidance 3.5
```

### Metrics

| metric | value |
|---|---|
{metric_rows}
"""
