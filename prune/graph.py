"""torch-pruning dependency graph of our denoising UNet (``UNetMotionModel`` + reference attention + pose hooks).

The graph is traced by torch-pruning (``tp.DependencyGraph().build_dependency``) with **dict** ``example_inputs``, a
``forward_fn`` that runs the UNet inside this bundle's reference-bank and pose-injection contexts (the UNet's forward
needs the bank: see ``Pose2VideoModel.denoise``) and ``output_transform=lambda o: o.sample`` (DESIGN §4).

What we prune (internal widths only; DESIGN §1, issue 5) -- a :class:`Structure` per prunable unit family:

* ``resnet``: ``conv1`` output together with ``norm2`` and ``time_emb_proj`` (and ``conv2``'s input). The unit is one
  *whole GroupNorm group* of ``norm2`` (``channels / num_groups`` channels); ``norm2.num_groups`` is reduced after.
  Removing whole groups leaves the statistics of the surviving channels unchanged, which works for 1 channel per group
  (tiny block 0). torch-pruning's own GroupNorm handling keeps ``num_groups`` and thins every group (tp
  ``GroupNormPruner.get_out_channel_groups``), which cannot prune a 1-channel-per-group norm at all and interacts
  badly with ``round_to`` -- the GroupNorm trap.
* ``attention`` / ``motion_attention``: whole heads of ``attn1``/``attn2`` (spatial) and of the motion modules'
  temporal attentions. The group is rooted at ``to_out.0``'s input channels, as torch-pruning itself does for
  attention (``BasePruner._downstream_node_as_root_if_attention``), and reaches ``to_q/to_k/to_v``' outputs through
  SDPA. ``attn.heads`` / ``attn.inner_dim`` are set afterwards. head_dim is never changed, so the SDPA scale
  (1/sqrt(head_dim); diffusers' ``AttnProcessor2_0`` does not pass ``attn.scale``) stays what the model was trained
  with -- the SDPA-scale trap.
* ``geglu`` / ``motion_geglu``: the GEGLU inner width, rooted at ``ff.net.2``'s input channels so that the
  dependency graph maps each kept channel ``i`` onto *both* ``proj`` rows ``i`` (value) and ``i + inner`` (gate) of
  the ``chunk(2)`` (checked in :func:`structure_group`).

What stays fixed: every residual stream -- skip concatenations, pose-feature additions, the reference bank (its
tokens come from the unpruned reference UNet and enter ``to_k/to_v`` inputs), the motion modules' inputs/outputs and
their inner stream (where the sinusoidal position-encoding buffer ``pos_embed.pe`` is added). Each group is checked:
if it would change the output width of any layer outside its structure, :class:`PruneGraphError` is raised. Because
``pe`` is never on a pruned stream it stays a buffer (DESIGN §4's "make it a 2-D parameter" is only needed when the
motion-module stream itself is pruned, which we refuse). ``Downsample2D/Upsample2D.channels`` are re-synced from
their convs after pruning (:func:`sync_attributes`). Gradient checkpointing hides layers from the tracer
(``CheckpointFunctionBackward``), so :func:`build_graph` refuses a UNet with it enabled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from portrait.models.bundle import Pose2VideoModel

KINDS = ("resnet", "attention", "geglu", "motion_attention", "motion_geglu")


class PruneGraphError(RuntimeError):
    """The dependency graph would prune something that must stay fixed, or cannot be built."""


@dataclass
class Structure:
    """One prunable internal width of the UNet.

    path: module path of the owner (resnet block, ``Attention`` or ``FeedForward``).
    kind: one of :data:`KINDS`. root: the layer whose *input* (``geglu``, attention) or *output* (resnet) channels root
    the torch-pruning group. unit: channels per prunable unit (GroupNorm group, head, 1). allowed: module paths whose
    output width may change together with this structure.
    """

    path: str
    kind: str
    root: nn.Module
    root_out: bool
    unit: int
    width: int
    allowed: set[str] = field(default_factory=set)

    @property
    def units(self) -> int:
        return self.width // self.unit

    @property
    def block(self) -> str:
        """``down_blocks.0`` / ``mid_block`` / ``up_blocks.2`` (for per-block ratios)."""
        parts = self.path.split(".")
        return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


def find_structures(unet: nn.Module, kinds: tuple[str, ...] | list[str] = KINDS) -> list[Structure]:
    """Every prunable internal width of ``unet`` of the given kinds, in module order."""
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown structure kind {k!r}; choose from {KINDS}")
    out = []
    for name, m in unet.named_modules():
        motion = ".motion_modules." in f".{name}."
        if isinstance(m, ResnetBlock2D) and "resnet" in kinds:
            if not isinstance(m.norm2, nn.GroupNorm) or m.time_emb_proj is None:
                continue
            cpg = m.norm2.num_channels // m.norm2.num_groups
            out.append(Structure(name, "resnet", m.conv1, True, cpg, m.conv1.out_channels,
                                 {f"{name}.conv1", f"{name}.norm2", f"{name}.time_emb_proj"}))
        elif isinstance(m, Attention):
            kind = "motion_attention" if motion else "attention"
            if kind not in kinds:
                continue
            head_dim = m.to_q.out_features // m.heads
            out.append(Structure(name, kind, m.to_out[0], False, head_dim, m.to_out[0].in_features,
                                 {f"{name}.to_q", f"{name}.to_k", f"{name}.to_v"}))
        elif isinstance(m, FeedForward):
            kind = "motion_geglu" if motion else "geglu"
            if kind not in kinds:
                continue
            act, proj_out = m.net[0], m.net[2]
            if type(act).__name__ != "GEGLU":
                continue
            out.append(Structure(name, kind, proj_out, False, 1, proj_out.in_features, {f"{name}.net.0.proj"}))
    return out


# ------------------------------------------------------------------------------------------------
# Example inputs and tracing
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def example_inputs(model: Pose2VideoModel, frames: int = 2, batch: int = 1, seed: int = 0, size: int | None = None) -> dict:
    """Dict example inputs for one denoising-UNet evaluation of ``model`` (random, deterministic by ``seed``).

    Returns ``{"sample": (B, 4, F, h, w), "timestep": (B,), "encoder_states": (B, 1, D), "pose_feats": 5 maps
    (B*F, C_i, h_i, w_i), "bank": {path: (B, N, C)}}`` on the model's device. ``size``: pixel size (default: the
    model's resolution). Works on the meta device too.
    """
    dev, dt = model.device, model.dtype
    g = torch.Generator().manual_seed(seed)
    size = size or model.config.resolution
    h = size // model.vae_scale_factor
    c = model.denoising_unet.config.in_channels
    d = model.denoising_unet.config.cross_attention_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dev, dt) if dev.type != "meta" else torch.empty(*shape, device=dev, dtype=dt)

    ref = rand(batch, c, h, h)
    enc = rand(batch, 1, d)
    bank = model.compute_bank(ref, enc)
    pose = rand(batch, 3, frames, size, size)
    feats = [f.detach() for f in model.pose_features(pose)]
    return {"sample": rand(batch, c, frames, h, h), "timestep": torch.full((batch,), 500, device=dev, dtype=torch.long),
            "encoder_states": enc, "pose_feats": feats, "bank": bank}


@contextlib.contextmanager
def bundle_context(model: Pose2VideoModel, unet: nn.Module, inputs: dict) -> Iterator[dict]:
    """Enter the reference-read and pose-injection contexts of ``model`` for ``unet`` (its own or an attached copy)."""
    f = inputs["sample"].shape[2]
    injection = model.pose_injection if unet is model.denoising_unet else model._extra_injection(unet)
    with model.reference.read(inputs["bank"], f), injection.use(inputs["pose_feats"]):
        yield {"encoder_hidden_states": inputs["encoder_states"].repeat_interleave(f, dim=0)}


def make_forward_fn(model: Pose2VideoModel):
    """``forward_fn(unet, inputs)`` for torch-pruning: the stock UNet call (returning its ``UNet3DConditionOutput``)
    inside the bundle's contexts; pair it with ``output_transform=lambda o: o.sample``."""

    def forward_fn(unet: nn.Module, inputs: dict):
        with bundle_context(model, unet, inputs) as extra:
            return unet(inputs["sample"], inputs["timestep"], **extra, timestep_cond=inputs.get("timestep_cond"))

    return forward_fn


def build_graph(model: Pose2VideoModel, inputs: dict | None = None, unet: nn.Module | None = None) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model.denoising_unet`` (or an attached ``unet``), motion modules included."""
    unet = model.denoising_unet if unet is None else unet
    if getattr(unet, "is_gradient_checkpointing", False):
        raise PruneGraphError("gradient checkpointing is on: its CheckpointFunction hides the layers from torch-pruning's "
                              "tracer. Call unet.disable_gradient_checkpointing() before building the graph.")
    inputs = inputs if inputs is not None else example_inputs(model)
    if model.config.time_cond_proj_dim is not None and "timestep_cond" not in inputs:
        b = inputs["sample"].shape[0]
        inputs = dict(inputs, timestep_cond=torch.zeros(b, model.config.time_cond_proj_dim, device=model.device, dtype=model.dtype))
    was = torch.is_grad_enabled()
    try:
        torch.set_grad_enabled(True)  # tracing follows grad_fn
        return tp.DependencyGraph().build_dependency(
            unet, example_inputs=inputs, forward_fn=make_forward_fn(model), output_transform=lambda o: o.sample, verbose=False)
    finally:
        torch.set_grad_enabled(was)


# ------------------------------------------------------------------------------------------------
# Groups
# ------------------------------------------------------------------------------------------------


def _root_fn(s: Structure):
    if isinstance(s.root, nn.Conv2d):
        return tp.prune_conv_out_channels if s.root_out else tp.prune_conv_in_channels
    return tp.prune_linear_out_channels if s.root_out else tp.prune_linear_in_channels


def structure_group(dg: tp.DependencyGraph, s: Structure, idxs: list[int]):
    """The torch-pruning group that removes channels ``idxs`` (of the root) of ``s``, checked against residual streams.

    Raises :class:`PruneGraphError` when the group would change the output width of any layer outside ``s.allowed``
    (a residual stream, the motion-module stream, the pose/bank paths) or, for GEGLU, does not remove both halves.
    """
    group = dg.get_pruning_group(s.root, _root_fn(s), idxs)
    names = dg._module2name
    touched: dict[str, list[int]] = {}
    for dep, dep_idxs in group:
        mod = dep.target.module
        if not isinstance(mod, nn.Module) or not dg.is_out_channel_pruning_fn(dep.handler):
            continue
        if isinstance(mod, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)):
            touched[names.get(mod, repr(mod))] = list(dep_idxs)
    outside = sorted(set(touched) - s.allowed)
    if outside:
        raise PruneGraphError(f"pruning {s.kind} {s.path} would also change the width of {outside[:4]}"
                              f"{' ...' if len(outside) > 4 else ''}: a residual stream must stay fixed")
    if s.kind in ("geglu", "motion_geglu") and idxs:
        proj = touched.get(f"{s.path}.net.0.proj", [])
        want = sorted(set(idxs) | {i + s.width for i in idxs})
        if sorted(int(i) for i in proj) != want:
            raise PruneGraphError(f"GEGLU {s.path}: the graph prunes proj rows {sorted(proj)[:8]}..., not the value/gate "
                                  f"pairs {want[:8]}...")
    return group


def unit_importance(dg: tp.DependencyGraph, s: Structure, importance) -> torch.Tensor:
    """(units,) importance of ``s``: the torch-pruning group importance of every root channel, summed per unit."""
    group = structure_group(dg, s, list(range(s.width)))
    imp = importance(group)
    if imp is None:
        raise PruneGraphError(f"no importance for {s.path} (Taylor importance needs gradients: run the objective backward first)")
    return imp.detach().float().cpu().view(s.units, s.unit).sum(1)


def prune_units(dg: tp.DependencyGraph, s: Structure, units: list[int]) -> None:
    """Remove whole units (GroupNorm groups / heads / GEGLU channel pairs) of ``s`` and fix the attributes."""
    if not units:
        return
    if len(set(units)) >= s.units:
        raise PruneGraphError(f"{s.path}: cannot remove all {s.units} units")
    idxs = sorted(u * s.unit + j for u in set(units) for j in range(s.unit))
    structure_group(dg, s, idxs).prune()
    owner = dg.model.get_submodule(s.path)
    removed = len(set(units))
    if s.kind == "resnet":
        owner.norm2.num_groups -= removed
    elif s.kind in ("attention", "motion_attention"):
        owner.heads -= removed
        owner.inner_dim = owner.to_q.out_features
        if hasattr(owner, "inner_kv_dim"):
            owner.inner_kv_dim = owner.to_k.out_features
    s.width -= len(idxs)


def sync_attributes(unet: nn.Module) -> None:
    """Re-derive ``Downsample2D/Upsample2D.channels`` / ``out_channels`` from their convs (DESIGN §4: torch-pruning
    does not know these attributes). Attention heads and GroupNorm groups are set by :func:`prune_units`."""
    for m in unet.modules():
        if isinstance(m, Downsample2D) and getattr(m, "conv", None) is not None and isinstance(m.conv, nn.Conv2d):
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        elif isinstance(m, Upsample2D) and getattr(m, "conv", None) is not None and isinstance(m.conv, nn.Conv2d):
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
