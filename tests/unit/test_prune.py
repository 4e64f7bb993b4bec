"""Pruning the denoising UNet (prune/): dependency graph, exactness of removals, width manifests, MAC counting."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from portrait.models.bundle import ModelFolderError, Pose2VideoModel
from prune import graph as G
from prune import pruner
from prune.count import _call, count_unet_macs


@pytest.fixture(scope="module")
def model(tiny_model):
    """The tiny model with non-zero motion-module outputs (a fresh motion module's proj_out is zero-initialised,
    so its heads would not matter)."""
    m = copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, mod in m.denoising_unet.named_modules():
            if name.split(".")[-1] == "proj_out" and ".motion_modules." in f".{name}":
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.2 / mod.weight.shape[1] ** 0.5)
    return m


@pytest.fixture(scope="module")
def inputs(model):
    return G.example_inputs(model, frames=2, batch=1, seed=1)


def _out(m, inp):
    with torch.no_grad():
        return _call(m, inp)


def test_graph_builds_on_tiny_unet_with_motion_modules(model, inputs):
    dg = G.build_graph(model, inputs)
    structures = G.find_structures(model.denoising_unet)
    kinds = {s.kind for s in structures}
    assert kinds == set(G.KINDS)  # resnets, spatial + motion attention, spatial + motion GEGLU
    assert sum(".motion_modules." in s.path for s in structures) >= 2 * len([n for n, _ in model.denoising_unet.named_modules() if n.endswith("motion_modules")])
    for s in structures:  # every group stays inside its structure (residual streams fixed); GEGLU pairs checked
        G.structure_group(dg, s, list(range(s.unit)))


def test_residual_stream_guard_fires(model, inputs):
    dg = G.build_graph(model, inputs)
    s = next(s for s in G.find_structures(model.denoising_unet) if s.kind == "resnet")
    bad = G.Structure(s.path, "resnet", model.denoising_unet.get_submodule(s.path).conv2, True, 1, 32, set(s.allowed))
    with pytest.raises(G.PruneGraphError, match="residual stream"):
        G.structure_group(dg, bad, [0])


def test_gradient_checkpointing_refused(model, inputs):
    m = copy.deepcopy(model)
    m.denoising_unet.enable_gradient_checkpointing()
    with pytest.raises(G.PruneGraphError, match="gradient checkpointing"):
        G.build_graph(m, inputs)


def test_ratio_zero_is_exact_noop(model, inputs):
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.denoising_unet.state_dict().items()}
    y0 = _out(m, inputs)
    report = pruner.prune_model(m, ratio=0.0, count_frames=1)
    after = m.denoising_unet.state_dict()
    assert report["units_removed"] == 0 and report["mac_reduction"] == 0.0
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_out(m, inputs), y0)


def _mask(m, s: G.Structure, unit: int) -> None:
    """Zero the consumer's input columns of ``unit`` (what removing the unit must be equivalent to)."""
    owner = m.denoising_unet.get_submodule(s.path)
    cols = slice(unit * s.unit, (unit + 1) * s.unit)
    with torch.no_grad():
        if s.kind == "resnet":
            owner.conv2.weight[:, cols] = 0
        elif s.kind.endswith("attention"):
            owner.to_out[0].weight[:, cols] = 0
        else:
            owner.net[2].weight[:, cols] = 0


@pytest.mark.parametrize("kind", ["attention", "motion_attention", "resnet", "geglu", "motion_geglu"])
def test_removing_units_equals_masking_them(model, inputs, kind):
    structures = [s for s in G.find_structures(model.denoising_unet) if s.kind == kind]
    # spatial attn1 reads the reference bank, attn2 is cross-attention: take both (and a mid/up one)
    chosen = structures[:2] + structures[-1:]
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    plan = {s.path: [1] for s in chosen}
    for s in chosen:
        _mask(masked, s, 1)
    pruner.apply_plan(pruned, plan)
    for s in chosen:
        owner = pruned.denoising_unet.get_submodule(s.path)
        if kind.endswith("attention"):
            assert owner.heads == s.units - 1 and owner.to_q.out_features == (s.units - 1) * s.unit
            assert owner.scale == s.unit ** -0.5  # head_dim unchanged: the SDPA scale is unchanged
        elif kind == "resnet":
            assert owner.norm2.num_groups == s.units - 1 and owner.conv1.out_channels == s.width - s.unit
    y_masked, y_pruned = _out(masked, inputs), _out(pruned, inputs)
    assert not torch.allclose(y_masked, _out(model, inputs), atol=1e-6)  # the units mattered
    torch.testing.assert_close(y_pruned, y_masked, atol=2e-5, rtol=1e-4)


def test_predicted_macs_equal_counted_and_target_reduction(model):
    m = copy.deepcopy(model)
    report = pruner.prune_model(m, target_mac_reduction=0.3, spec=pruner.PruneSpec(scope="global"), count_frames=1)
    assert report["mac_reduction"] == pytest.approx(0.3, abs=0.02)
    assert report["params_after"] < report["params_before"]
    assert 0 < report["ratio"] < 0.95


def test_per_block_ratios_only_touch_that_block(model):
    m = copy.deepcopy(model)
    before = pruner.describe_widths(m)
    structures = G.find_structures(m.denoising_unet)
    zeros = {s.path: torch.zeros(s.units) for s in structures}
    spec = pruner.PruneSpec(ratio=0.0, block_ratios={"mid_block": 0.5})
    pruner.apply_plan(m, pruner.plan_removals(structures, zeros, spec, pruner.base_units(m)))
    after = pruner.describe_widths(m)
    changed = {p for p in before if before[p] != after[p]}
    assert changed and all(p.startswith("mid_block.") for p in changed)


@pytest.mark.slow
def test_taylor_importance_from_own_objective(model, train_dataset):
    from portrait.data.dataset import ClipDataset
    from portrait.training import load_items, sample_generator

    ds = ClipDataset(train_dataset, "train", num_frames=2, strides=[1], reference="first", seed=0)
    batch = load_items(ds, [(0, 0, 0)])
    batches = [(batch, [sample_generator(0, 0, "taylor")])]
    m = copy.deepcopy(model)
    n = pruner.accumulate_task_gradients(m, batches, pruner.inference_timesteps(m, 4))
    assert n == 1 and m.denoising_unet.down_blocks[0].resnets[0].conv1.weight.grad is not None
    dg = G.build_graph(m)
    s = next(s for s in G.find_structures(m.denoising_unet) if s.kind == "attention")
    taylor = G.unit_importance(dg, s, pruner.taylor_importance())
    assert taylor.shape == (s.units,) and torch.isfinite(taylor).all() and taylor.abs().sum() > 0
    structures = G.find_structures(m.denoising_unet)
    scores = pruner.compute_scores(m, dg, structures, pruner.taylor_importance())
    plan = pruner.plan_removals(structures, scores, pruner.PruneSpec(ratio=0.25), pruner.base_units(m))
    assert plan[s.path] == torch.argsort(taylor, stable=True)[: len(plan[s.path])].tolist()  # lowest Taylor scores go
    pruner.apply_plan(m, plan, dg, structures)
    assert sum(pruner.describe_widths(m).values()) < sum(pruner.describe_widths(model).values())


def test_pruned_model_saves_loads_identically(model, inputs, tmp_path, tiny_model_dir):
    m = copy.deepcopy(model)
    structures = G.find_structures(m.denoising_unet)
    scores = {s.path: torch.rand(s.units, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(structures)}
    pruner.apply_plan(m, pruner.plan_removals(structures, scores, pruner.PruneSpec(ratio=0.4, scope="global"), pruner.base_units(m)))
    y = _out(m, inputs)
    m.save_pretrained(tmp_path / "p", metadata={"pruning": {"ratio": 0.4}})
    assert (tmp_path / "p" / "denoising_unet" / "widths.json").is_file()
    assert not (tiny_model_dir / "denoising_unet" / "widths.json").exists()  # an unpruned folder has no manifest
    loaded = Pose2VideoModel.from_pretrained(tmp_path / "p")
    assert pruner.describe_widths(loaded) == pruner.describe_widths(m)
    y2 = _out(loaded, inputs)
    assert torch.equal(y2, y), (y2 - y).abs().max()
    Pose2VideoModel.from_pretrained(tiny_model_dir)  # unpruned folders still load


def test_manifest_tensor_mismatch_is_a_clear_error(model, tmp_path):
    m = copy.deepcopy(model)
    structures = G.find_structures(m.denoising_unet)
    pruner.apply_plan(m, {s.path: [0] for s in structures if s.kind == "resnet"})
    m.save_pretrained(tmp_path / "p")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "p", bad)
    mf = bad / "denoising_unet" / "widths.json"
    manifest = json.loads(mf.read_text())
    name, spec = next((k, v) for k, v in manifest["layers"].items() if k.endswith("conv1"))
    spec["out"] += 1
    mf.write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="disagrees with the tensors"):
        Pose2VideoModel.from_pretrained(bad)
    mf.write_text("{not json")
    with pytest.raises(ModelFolderError, match="corrupt"):
        Pose2VideoModel.from_pretrained(bad)
    mf.unlink()  # pruned tensors without a manifest: diffusers refuses, and the error names the folder
    with pytest.raises(ModelFolderError, match="denoising_unet|size|shape"):
        Pose2VideoModel.from_pretrained(bad)


@pytest.mark.slow
def test_graph_and_counting_on_full_size_unet_meta():
    from portrait import config as config_lib
    from portrait.models.bundle import ModelConfig

    cfg = config_lib.load(ModelConfig, "configs/model/aniportrait.yaml")
    with torch.device("meta"):
        m = Pose2VideoModel.from_config(cfg, seed=None).eval()
    inp = G.example_inputs(m, frames=2, size=64)
    dg = G.build_graph(m, inp)
    structures = G.find_structures(m.denoising_unet)
    assert {s.kind for s in structures} == set(G.KINDS) and len(structures) > 100
    for s in structures:
        G.structure_group(dg, s, list(range(s.unit)))
    macs = count_unet_macs(m, frames=1)
    assert 0.5e12 < macs < 0.8e12  # DESIGN §1: about 0.63 TMAC per frame and evaluation at 512x512
    report = pruner.prune_model(m, ratio=0.5, count_frames=1)
    assert 0.2 < report["mac_reduction"] < 0.6


def test_deepcopy_of_bundle_keeps_pose_injection(model, inputs):
    clone = copy.deepcopy(model)
    assert torch.equal(_out(clone, inputs), _out(model, inputs))
    feats = [f * 0 for f in inputs["pose_feats"]]
    assert not torch.equal(_out(clone, dict(inputs, pose_feats=feats)), _out(clone, inputs))  # the copy's down hooks are its own


@pytest.mark.slow
@pytest.mark.parametrize("student", [False, True])
def test_kd_objective_task_output_and_feature_terms(student, train_dataset):
    from portrait.data.dataset import ClipDataset
    from portrait.models.bundle import ModelConfig
    from portrait.objectives import TeacherDiffusionLoss
    from portrait.training import load_items, sample_generator
    from prune.kd import PruneKDLoss

    cfg = ModelConfig(time_cond_proj_dim=16 if student else None)
    src = Pose2VideoModel.from_config(cfg, seed=0)
    if student:
        src.metadata.update(sampler="lcm", default_steps=4, sampler_options={"solver_steps": 50})
    frozen = copy.deepcopy(src.denoising_unet)
    frozen = src.attach_unet(frozen).requires_grad_(False).eval()
    structures = G.find_structures(src.denoising_unet)
    pruner.apply_plan(src, {s.path: [0] for s in structures[:6]})  # a resnet group, heads, GEGLU channels, a motion head
    ds = ClipDataset(train_dataset, "train", num_frames=2, strides=[1], reference="first", seed=0)
    batch, gens = load_items(ds, [(0, 0, 0)]), lambda: [sample_generator(0, 0, "kd")]
    task = None if student else TeacherDiffusionLoss(src)
    steps = pruner.inference_timesteps(src, 4) if student else None
    if student:
        assert steps.tolist() == [999, 759, 499, 259]  # the student's own grid
    loss, logs = PruneKDLoss(src, frozen, task, steps)(batch, gens())
    assert {"task", "out_kd", "feat_kd"} <= set(logs) and logs["out_kd"] > 0 and logs["feat_kd"] > 0
    loss.backward()
    assert all(p.grad is not None for p in src.denoising_unet.down_blocks[0].parameters() if p.requires_grad)
    assert all(p.grad is None for p in frozen.parameters())  # the frozen unpruned UNet is never trained
    loss2, logs2 = PruneKDLoss(src, frozen, task, steps, out_kd_weight=0, feat_kd_weight=0)(batch, gens())
    assert "out_kd" not in logs2 and torch.allclose(loss2, logs2["task"])  # kd=false: task only
    assert "denoise" not in src.__dict__  # the interception is undone
