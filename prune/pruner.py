"""Importance, ratios and the pruning step for the denoising UNet (dependency graph: :mod:`prune.graph`).

    from prune import pruner
    report = pruner.prune_model(model, ratio=0.4, importance="taylor", batches=clips)        # in place
    report = pruner.prune_model(model, target_mac_reduction=0.4, importance="magnitude")     # ratio found by bisection

Importance criteria are plain functions of a torch-pruning group (DESIGN §3.6):

* ``magnitude``: ``tp.importance.GroupMagnitudeImportance(p=2)``, the L2 norm of every coupled weight slice, averaged
  over the group (Li et al. 2017; Fang et al. 2023 DepGraph).
* ``taylor``: ``tp.importance.GroupTaylorImportance``, first-order Taylor |w * dL/dw| (Molchanov et al. 2019), with
  dL/dw accumulated from the model's *own* objective at *its own inference timesteps* over ``taylor_clips`` clips
  (:func:`accumulate_task_gradients`); this is Diff-Pruning's (Fang et al. 2023) Taylor importance restricted to the
  timesteps the model is actually sampled at.

Unit scores are the group importance summed over a unit's channels (a GroupNorm group, a head, a GEGLU pair).

Ratios (fraction of *units* removed, relative to the unpruned architecture so that iterative rounds compose):

* ``ratio``: the global ratio for every structure; ``block_ratios`` overrides it per block prefix
  (``{"down_blocks.0": 0.2, "mid_block": 0.6}``) and ``kind_ratios`` per structure kind.
* ``scope``: ``local`` removes the lowest-scored units inside each structure (every structure shrinks by the same
  fraction); ``global`` ranks mean-normalised unit scores across all structures of the same kind and ratio, so widths
  become non-uniform (torch-pruning's ``global_pruning``).
* ``target_mac_reduction``: bisection on the global ratio until the counted UNet MACs (SDPA included) drop by that
  fraction.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp

from portrait.models.bundle import Pose2VideoModel, count_parameters
from prune import graph as G

IMPORTANCES = ("magnitude", "taylor")
SCOPES = ("local", "global")


def magnitude_importance() -> tp.importance.Importance:
    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)


def taylor_importance() -> tp.importance.Importance:
    return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)


def get_importance(name: str) -> tp.importance.Importance:
    if name == "magnitude":
        return magnitude_importance()
    if name == "taylor":
        return taylor_importance()
    raise ValueError(f"unknown importance {name!r}; choose from {IMPORTANCES}")


@dataclass
class PruneSpec:
    """What to prune. See the module docstring for the meaning of each field."""

    ratio: float = 0.0
    block_ratios: dict[str, float] = field(default_factory=dict)
    kind_ratios: dict[str, float] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=lambda: list(G.KINDS))
    scope: str = "local"
    importance: str = "magnitude"

    def ratio_of(self, s: G.Structure) -> float:
        r = self.kind_ratios.get(s.kind, self.ratio)
        for prefix, v in self.block_ratios.items():
            if s.path == prefix or s.path.startswith(prefix + "."):
                r = v
        return r

    def validate(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {self.importance!r}")
        for k in self.kinds:
            if k not in G.KINDS:
                raise ValueError(f"unknown structure kind {k!r}; choose from {G.KINDS}")
        bad = [k for k in self.kind_ratios if k not in G.KINDS]
        if bad:
            raise ValueError(f"unknown kind(s) {bad} in kind_ratios; choose from {G.KINDS}")
        for what, r in [("ratio", self.ratio), *self.block_ratios.items(), *self.kind_ratios.items()]:
            if not 0.0 <= float(r) < 1.0:
                raise ValueError(f"pruning ratio {what}={r} must be in [0, 1)")


# ------------------------------------------------------------------------------------------------
# Taylor gradients: the model's own objective at its own inference timesteps
# ------------------------------------------------------------------------------------------------


def inference_timesteps(model: Pose2VideoModel, steps: int | None = None) -> torch.Tensor:
    """The timesteps ``model`` is sampled at (steps,) int64: a consistency student's k-point grid on its solver grid
    (``distill.schedules.student_timesteps``), else the scheduler's ``steps``-point trailing grid. ``steps`` defaults to
    the model's ``default_steps`` metadata (25 for the teacher)."""
    steps = steps or int(model.metadata.get("default_steps", 25))
    sched = model.make_scheduler()
    if model.metadata.get("sampler") in ("lcm", "phased"):  # students sample on their distillation grid
        from distill.schedules import SolverGrid, student_timesteps

        n = int(model.metadata.get("sampler_options", {}).get("solver_steps", 50))
        return student_timesteps(steps, SolverGrid.from_scheduler(sched, n)).clone().long()
    sched.set_timesteps(steps)
    return sched.timesteps.clone().long()


def inference_task_loss(model: Pose2VideoModel, batch: dict[str, torch.Tensor], generators: list[torch.Generator],
                        timesteps: torch.Tensor) -> torch.Tensor:
    """x0-regression of the model at its inference timesteps: the quantity its sampler uses at each step.

    Per sample: t uniform over ``timesteps``, x_t = sqrt(a) x0 + sqrt(1-a) eps, and the model's v-output turned into
    x0 (x0 = sqrt(a) x_t - sqrt(1-a) v, Salimans & Ho 2022); loss = MSE(x0_pred, x0). A guidance-embedded student is
    conditioned on its default guidance w (``default_guidance`` metadata) as at sampling; a teacher on its
    conditional branch. batch: ``ClipDataset`` batch (uint8) -> scalar.
    """
    from distill.models import conditioning, student_prediction
    from distill.schedules import SolverGrid, add_noise, predicted_x0_eps
    from portrait.objectives import per_sample_randn, to_unit

    m, dev = model, model.device
    target = to_unit(batch["target"]).to(dev)  # (B, F, 3, H, W)
    b, f = target.shape[:2]
    with torch.no_grad():
        lat = m.encode_images(target.flatten(0, 1)).unflatten(0, (b, f)).permute(0, 2, 1, 3, 4).float()  # (B, 4, F, h, w)
        ref01 = batch["ref_frame"].to(dev).float() / 255.0
        pose = to_unit(batch["pose"]).to(dev).permute(0, 2, 1, 3, 4)
        cond = conditioning(m, ref01, pose, guided=False)
    noise = per_sample_randn(tuple(lat.shape[1:]), generators).to(dev)
    pick = torch.stack([torch.randint(0, len(timesteps), (), generator=g) for g in generators])
    t = timesteps[pick].to(dev)
    grid = SolverGrid.from_scheduler(m.make_scheduler(), 50)
    a = grid.alpha(t)
    x_t = add_noise(lat, noise, a)
    if m.config.time_cond_proj_dim is not None:
        w = torch.full((b,), float(m.metadata.get("default_guidance", 3.5)), device=dev)
        v = student_prediction(m, None, x_t, t, cond, w)
    else:
        v = m.denoise(x_t, t, cond.enc, cond.feats, cond.bank)
    x0, _ = predicted_x0_eps(v.float(), x_t, a, grid.prediction_type)
    return torch.nn.functional.mse_loss(x0, lat)


def accumulate_task_gradients(model: Pose2VideoModel, batches: Iterable[tuple[dict, list[torch.Generator]]],
                              timesteps: torch.Tensor | None = None) -> int:
    """Zero the denoising UNet's grads, then accumulate d(:func:`inference_task_loss`)/dw over ``batches``.

    Returns the number of clips seen. Only the denoising UNet gets gradients (the rest is frozen meanwhile).
    """
    unet = model.denoising_unet
    timesteps = inference_timesteps(model) if timesteps is None else timesteps
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    unet.requires_grad_(True)
    unet.zero_grad(set_to_none=True)
    n = 0
    try:
        for batch, gens in batches:
            inference_task_loss(model, batch, gens, timesteps).backward()
            n += len(gens)
    finally:
        for p, r in flags.items():
            p.requires_grad_(r)
    return n


# ------------------------------------------------------------------------------------------------
# Planning and pruning
# ------------------------------------------------------------------------------------------------


def base_units(model: Pose2VideoModel, kinds: Iterable[str] = G.KINDS) -> dict[str, int]:
    """Units per structure of the *unpruned* architecture (built on the meta device from the UNet's config)."""
    from diffusers import UNetMotionModel

    cfg = {k: v for k, v in dict(model.denoising_unet.config).items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = UNetMotionModel.from_config(cfg)
    return {s.path: s.units for s in G.find_structures(ref, tuple(kinds))}


def compute_scores(model: Pose2VideoModel, dg: tp.DependencyGraph, structures: list[G.Structure],
                   importance: tp.importance.Importance) -> dict[str, torch.Tensor]:
    """{structure path: (units,) scores}. On the meta device (full-size counting) there are no values: every unit
    scores 0, so a local plan keeps the same widths as any real plan and only *which* units go is arbitrary."""
    if model.device.type == "meta":
        for s in structures:
            G.structure_group(dg, s, list(range(s.width)))  # still check every group against the residual streams
        return {s.path: torch.zeros(s.units) for s in structures}
    return {s.path: G.unit_importance(dg, s, importance) for s in structures}


def plan_removals(structures: list[G.Structure], scores: dict[str, torch.Tensor], spec: PruneSpec,
                  base: dict[str, int], ratio: float | None = None) -> dict[str, list[int]]:
    """Which units of each structure to remove so that each keeps ``round(base * (1 - ratio))`` units (at least one).

    ``ratio`` overrides ``spec.ratio`` (the per-block / per-kind overrides still apply).
    """
    spec = copy.copy(spec) if ratio is None else PruneSpec(ratio, spec.block_ratios, spec.kind_ratios, spec.kinds, spec.scope, spec.importance)
    plan: dict[str, list[int]] = {}
    if spec.scope == "local":
        for s in structures:
            keep = max(1, int(round(base.get(s.path, s.units) * (1 - spec.ratio_of(s)))))
            n = max(0, s.units - keep)
            plan[s.path] = torch.argsort(scores[s.path], stable=True)[:n].tolist() if n else []
        return plan
    # global: pool mean-normalised unit scores of structures that share (kind, ratio); keep the same total count
    pools: dict[tuple[str, float], list[G.Structure]] = {}
    for s in structures:
        pools.setdefault((s.kind, spec.ratio_of(s)), []).append(s)
        plan[s.path] = []
    for (_kind, r), members in pools.items():
        total_keep = sum(max(1, int(round(base.get(s.path, s.units) * (1 - r)))) for s in members)
        n = sum(s.units for s in members) - total_keep
        if n <= 0:
            continue
        cand = []
        for s in members:
            sc = scores[s.path] / scores[s.path].mean().clamp_min(1e-12)
            order = torch.argsort(sc, stable=True).tolist()[: s.units - 1]  # every structure keeps >= 1 unit
            cand += [(float(sc[u]), s.path, u) for u in order]
        cand.sort(key=lambda c: c[0])
        for _, path, u in cand[:n]:
            plan[path].append(u)
    return plan


def apply_plan(model: Pose2VideoModel, plan: dict[str, list[int]], dg: tp.DependencyGraph | None = None,
               structures: list[G.Structure] | None = None) -> None:
    """Prune ``model.denoising_unet`` in place by ``plan`` ({structure path: unit indices}) and re-attach the bundle."""
    if not any(plan.values()):
        return
    dg = dg if dg is not None else G.build_graph(model)
    structures = structures if structures is not None else G.find_structures(model.denoising_unet)
    by_path = {s.path: s for s in structures}
    for path, units in plan.items():
        if units:
            G.prune_units(dg, by_path[path], units)
    # torch-pruning edits the modules in place, so the bundle's attention processors and pose hooks stay attached
    # (no re-attach: on a deep-copied bundle, re-attaching would remove the *original's* hooks through the copied
    # RemovableHandles, whose weakrefs deepcopy does not copy).
    G.sync_attributes(model.denoising_unet)


def unet_macs(model: Pose2VideoModel, inputs: dict) -> float:
    """MACs of one denoising-UNet evaluation on ``inputs`` (``portrait.flops``, SDPA included)."""
    from portrait.flops import count_flops
    from prune.count import _call

    return count_flops(lambda: _call(model, inputs)).macs


def prune_model(model: Pose2VideoModel, spec: PruneSpec | None = None, *, ratio: float | None = None,
                importance: str | None = None, target_mac_reduction: float | None = None,
                batches: Iterable | None = None, timesteps: torch.Tensor | None = None, tolerance: float = 0.01,
                count_frames: int = 2, reference_macs: float | None = None) -> dict:
    """Prune ``model.denoising_unet`` in place. Returns a report (ratio, widths, MACs/params before and after).

    ``batches``: [(ClipDataset batch, generators)] for Taylor importance. ``target_mac_reduction``: find the global
    ratio by bisection so that counted MACs drop by that fraction (± ``tolerance``) relative to ``reference_macs``
    (default: this model's MACs now; iterative rounds pass the unpruned source's, at ``count_frames`` frames).
    """
    spec = copy.deepcopy(spec) if spec is not None else PruneSpec()
    if ratio is not None:
        spec.ratio = ratio
    if importance is not None:
        spec.importance = importance
    spec.validate()
    imp = get_importance(spec.importance)
    if spec.importance == "taylor":
        if batches is None:
            raise ValueError("Taylor importance needs clips: pass batches=[(batch, generators), ...]")
        seen = accumulate_task_gradients(model, batches, timesteps)
    else:
        seen = 0
    inputs = G.example_inputs(model, frames=count_frames)
    macs0, params0 = unet_macs(model, inputs), count_parameters(model.denoising_unet)
    base = base_units(model, spec.kinds)
    dg = G.build_graph(model, inputs)
    structures = G.find_structures(model.denoising_unet, tuple(spec.kinds))
    scores = compute_scores(model, dg, structures, imp)
    model.denoising_unet.zero_grad(set_to_none=True)
    chosen = spec.ratio
    if target_mac_reduction is not None:
        chosen = search_ratio(model, structures, scores, spec, base, target_mac_reduction, macs0, tolerance, inputs,
                              reference_macs=reference_macs)
    plan = plan_removals(structures, scores, spec, base, chosen)
    apply_plan(model, plan, dg, structures)
    macs1, params1 = unet_macs(model, inputs), count_parameters(model.denoising_unet)
    return {"importance": spec.importance, "scope": spec.scope, "ratio": chosen, "block_ratios": dict(spec.block_ratios),
            "kind_ratios": dict(spec.kind_ratios), "kinds": list(spec.kinds), "taylor_clips": seen,
            "units_removed": sum(len(v) for v in plan.values()),
            "macs_before": macs0, "macs_after": macs1, "mac_reduction": 1 - macs1 / macs0,
            "params_before": params0, "params_after": params1, "param_reduction": 1 - params1 / params0}


def unit_costs(model: Pose2VideoModel, structures: list[G.Structure], inputs: dict) -> dict[str, float]:
    """MACs of one UNet evaluation that removing one unit of each structure saves ({path: MACs per unit}).

    With residual streams fixed, every layer a structure touches has exactly one pruned dimension (conv1/time_emb_proj
    outputs and conv2 inputs; q/k/v outputs, SDPA heads and to_out inputs; GEGLU proj outputs and net.2 inputs), so a
    structure's MACs are linear in its width and structures do not interact: counted MACs after pruning are exactly
    ``macs0 - sum(removed units x unit cost)`` (checked against a real count by the tests).
    """
    from prune.count import _call

    fc = count_flops_by_module(lambda: _call(model, inputs), model.denoising_unet)
    out = {}
    for s in structures:
        if s.kind == "resnet":
            flops = sum(fc.get(f"{s.path}.{n}", 0) for n in ("conv1", "conv2", "time_emb_proj"))
        else:
            flops = fc.get(s.path, 0)
        out[s.path] = flops / 2 / s.units
    return out


def count_flops_by_module(fn, module) -> dict[str, int]:
    """{module path relative to ``module``: FLOPs} of ``fn()``."""
    from portrait.flops import count_flops

    prefix = type(module).__name__ + "."
    return {k[len(prefix):]: v for k, v in count_flops(fn, module=module).by_module.items() if k.startswith(prefix)}


def search_ratio(model: Pose2VideoModel, structures, scores, spec: PruneSpec, base: dict, target: float, macs0: float,
                 tolerance: float, inputs: dict, iters: int = 30, reference_macs: float | None = None) -> float:
    """Bisection on the global ratio until the predicted MACs (:func:`unit_costs`, exact) are ``(1 - target)`` of
    ``reference_macs`` (default ``macs0``, the model's MACs now)."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target_mac_reduction must be in (0, 1), got {target}")
    costs = unit_costs(model, structures, inputs)

    ref = reference_macs or macs0

    def reduction(r: float) -> float:
        plan = plan_removals(structures, scores, spec, base, r)
        return 1 - (macs0 - sum(len(u) * costs[p] for p, u in plan.items())) / ref

    lo, hi = 0.0, 0.95
    if reduction(hi) < target - tolerance:
        raise ValueError(f"cannot remove {target:.0%} of the UNet MACs by pruning internal widths only "
                         f"(ratio 0.95 gives {reduction(hi):.1%}); residual streams stay fixed")
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reduction(mid) < target else (lo, mid)
    return hi


def describe_widths(model: Pose2VideoModel) -> dict[str, int]:
    """{structure path: current width in channels} of the denoising UNet (for cards and logs)."""
    return {s.path: s.width for s in G.find_structures(model.denoising_unet)}


__all__ = ["PruneSpec", "prune_model", "plan_removals", "apply_plan", "compute_scores", "accumulate_task_gradients",
           "inference_task_loss", "inference_timesteps", "get_importance", "magnitude_importance", "taylor_importance"]

