"""The teacher's architecture: per-frame motion norm, reference attention, pose injection, model folder."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from portrait.models import ModelFolderError, Pose2VideoModel
from portrait.models.reference import PerFrameGroupNorm


def _inputs(model, frames=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(1, 3, 64, 64, generator=g)
    pose = torch.rand(1, 3, frames, 64, 64, generator=g) * 2 - 1
    x = torch.randn(1, 4, frames, 16, 16, generator=g)
    with torch.no_grad():
        z = model.encode_images(ref * 2 - 1)
        enc = model.encode_reference_embeds(ref)
        bank = model.compute_bank(z, enc)
        feats = model.pose_features(pose)
    return x, enc, bank, feats


def test_motion_norms_are_per_frame(tiny_model):
    unet = tiny_model.denoising_unet
    mm = unet.down_blocks[0].motion_modules[0]
    assert isinstance(mm.norm, PerFrameGroupNorm)
    captured = []
    handle = mm.norm.register_forward_hook(lambda mod, i, o: captured.append(o.detach().clone()))
    x, enc, bank, feats = _inputs(tiny_model)
    x2 = x.clone()
    x2[:, :, 3] = torch.randn_like(x2[:, :, 3]) * 3 + 1  # change only frame 3
    try:
        with torch.no_grad():
            tiny_model.denoise(x, torch.tensor([500]), enc, None, None)
            tiny_model.denoise(x2, torch.tensor([500]), enc, None, None)
    finally:
        handle.remove()
    a, b = captured  # (B, C, F, H, W) normalised motion-module input
    torch.testing.assert_close(a[:, :, 0], b[:, :, 0], rtol=0, atol=1e-6)
    assert (a[:, :, 3] - b[:, :, 3]).abs().max() > 1e-2
    # the check can fail: diffusers' stock norm pools statistics over frames, so frame 0 would move
    y, y2 = torch.randn(1, 32, 4, 4, 4), None
    y2 = y.clone()
    y2[:, :, 3] = y2[:, :, 3] * 3 + 1
    stock = torch.nn.GroupNorm(32, 32)
    assert (stock(y)[:, :, 0] - stock(y2)[:, :, 0]).abs().max() > 1e-3


def test_per_frame_norm_keeps_weight_names(tiny_model):
    keys = set(tiny_model.denoising_unet.state_dict())
    assert "down_blocks.0.motion_modules.0.norm.weight" in keys
    assert not any("norm.norm" in k for k in keys)


def test_reference_image_changes_output(tiny_model):
    x, enc, bank, feats = _inputs(tiny_model, seed=0)
    _, enc2, bank2, _ = _inputs(tiny_model, seed=1)
    t = torch.tensor([400])
    with torch.no_grad():
        a = tiny_model.denoise(x, t, enc, feats, bank)
        b = tiny_model.denoise(x, t, enc, feats, bank2)
    assert (a - b).abs().max() > 1e-4


def test_empty_bank_equals_unet_without_reference_attention(tiny_model):
    x, enc, bank, feats = _inputs(tiny_model)
    t = torch.tensor([700])
    plain = copy.deepcopy(tiny_model.denoising_unet)
    plain.set_attn_processor({name: AttnProcessor2_0() for name in plain.attn_processors})
    for h in list(plain.conv_in._forward_hooks):
        plain.conv_in._forward_hooks.pop(h)
    for blk in plain.down_blocks:
        blk._forward_hooks.clear()
    with torch.no_grad():
        ours = tiny_model.denoise(x, t, enc, None, {})
        ref = plain(x, t, encoder_hidden_states=enc.repeat_interleave(x.shape[2], 0)).sample
        with_bank = tiny_model.denoise(x, t, enc, None, bank)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (with_bank - ref).abs().max() > 1e-4  # the bank is actually read


def test_bank_has_every_spatial_self_attention(tiny_model):
    _, _, bank, _ = _inputs(tiny_model)
    names = [n for n in tiny_model.denoising_unet.attn_processors if ".attentions." in n and n.endswith("attn1.processor") and "motion" not in n]
    assert sorted(bank) == sorted(n[: -len(".processor")] for n in names)
    assert len(bank) > 0


def test_pose_features_injected_at_the_five_points(tiny_model):
    """feature 0 right after conv_in (and in the first skip); features 1..4 after each down block, not in its skips."""
    unet = tiny_model.denoising_unet
    x, enc, bank, feats = _inputs(tiny_model)
    t = torch.tensor([300])
    f = x.shape[2]

    def run(features):
        rec = {}
        hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: rec.__setitem__("conv_in", o.clone()))]
        for i, blk in enumerate(unet.down_blocks):
            hooks.append(blk.register_forward_hook(lambda m, inp, o, i=i: rec.__setitem__(f"down{i}", (o[0].clone(), [s.clone() for s in o[1]]))))
        hooks.append(unet.up_blocks[-1].register_forward_pre_hook(
            lambda m, a, kw: rec.__setitem__("first_skip", kw["res_hidden_states_tuple"][0].clone()), with_kwargs=True))
        try:
            with torch.no_grad():
                tiny_model.denoise(x, t, enc, features, None)
        finally:
            for h in hooks:
                h.remove()
        return rec

    zeros = [torch.zeros_like(a) for a in feats]
    base = run(zeros)
    assert len(feats) == 5 and [a.shape[0] for a in feats] == [f] * 5
    # feature 0: conv_in output shifted by exactly feats[0], and the first skip carries it
    only0 = [feats[0]] + zeros[1:]
    r0 = run(only0)
    torch.testing.assert_close(r0["conv_in"] - base["conv_in"], feats[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(r0["first_skip"], r0["conv_in"], rtol=0, atol=0)
    # features 1..4: block k-1's returned sample shifted by feats[k]; its skips unchanged
    for k in range(1, 5):
        rk = run(zeros[:k] + [feats[k]] + zeros[k + 1:])
        sample, skips = rk[f"down{k - 1}"]
        base_sample, base_skips = base[f"down{k - 1}"]
        torch.testing.assert_close(sample - base_sample, feats[k], rtol=0, atol=1e-5)
        for s, bs in zip(skips, base_skips):
            torch.testing.assert_close(s, bs, rtol=0, atol=0)


def test_faithful_pose_guider_ignores_ref_pose_and_uses_batch_stats(tiny_model):
    pg = tiny_model.pose_guider
    assert pg.config.mode == "faithful"
    pose = torch.rand(1, 3, 4, 64, 64) * 2 - 1
    with torch.no_grad():
        a = pg(pose, ref_pose=torch.rand(1, 3, 64, 64))
        b = pg(pose, ref_pose=torch.rand(1, 3, 64, 64))
        # batch statistics: frame 0's features depend on the other frames of the window
        pose2 = pose.clone()
        pose2[:, :, 1:] = torch.rand_like(pose2[:, :, 1:])
        c = pg(pose2)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert (a[0][0] - c[0][0]).abs().max() > 1e-5


def test_model_folder_round_trip(tiny_model, tiny_model_dir):
    loaded = Pose2VideoModel.from_pretrained(tiny_model_dir)
    for name in ("vae", "reference_unet", "denoising_unet", "pose_guider", "image_encoder"):
        sa, sb = getattr(tiny_model, name).state_dict(), getattr(loaded, name).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"
    x, enc, bank, feats = _inputs(tiny_model)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.denoise(x, torch.tensor([10]), enc, feats, bank),
                                   loaded.denoise(x, torch.tensor([10]), enc, feats, bank), rtol=0, atol=0)


def test_components_load_with_plain_diffusers(tiny_model_dir):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNetMotionModel

    UNetMotionModel.from_pretrained(tiny_model_dir / "denoising_unet")
    UNet2DConditionModel.from_pretrained(tiny_model_dir / "reference_unet")
    AutoencoderKL.from_pretrained(tiny_model_dir / "vae")
    sched = DDIMScheduler.from_pretrained(tiny_model_dir / "scheduler")
    assert sched.config.prediction_type == "v_prediction" and sched.config.rescale_betas_zero_snr
    assert sched.config.timestep_spacing == "trailing"


def test_wrong_or_incomplete_folder_is_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(ModelFolderError, match="not found"):
        Pose2VideoModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "diffusers_unet").mkdir()
    (tmp_path / "diffusers_unet" / "config.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="not a fastportrait model folder"):
        Pose2VideoModel.from_pretrained(tmp_path / "diffusers_unet")
    other = tmp_path / "interp"
    other.mkdir()
    (other / "fastportrait.json").write_text(json.dumps({"format_version": 1, "kind": "fastportrait.interpolator"}))
    with pytest.raises(ModelFolderError, match="interpolator"):
        Pose2VideoModel.from_pretrained(other)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "pose_guider")
    with pytest.raises(ModelFolderError, match="pose_guider"):
        Pose2VideoModel.from_pretrained(broken)
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_model_dir, trunc)
    f = trunc / "denoising_unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelFolderError, match="cannot load"):
        Pose2VideoModel.from_pretrained(trunc)


def test_save_is_atomic_and_keeps_previous_on_failure(tmp_path, tiny_model, monkeypatch):
    dst = tmp_path / "m"
    tiny_model.save_pretrained(dst)
    before = sorted(p.name for p in dst.rglob("*"))

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tiny_model.pose_guider), "save_pretrained", boom)
    with pytest.raises(OSError, match="No space"):
        tiny_model.save_pretrained(dst)
    assert sorted(p.name for p in dst.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"


def test_save_sweeps_temp_folders_of_dead_exports_only(tmp_path, tiny_model):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = tmp_path / f".m.tmp-{dead.stdout.strip()}-abc"  # a SIGKILLed export of the same folder
    live = tmp_path / f".m.tmp-{os.getpid()}-xyz"  # a concurrent export still running
    other = tmp_path / ".other.tmp-1-abc"  # another folder's export
    for d in (stale, live, other):
        (d / "vae").mkdir(parents=True)
    tiny_model.save_pretrained(tmp_path / "m")
    assert not stale.exists()
    assert live.is_dir() and other.is_dir()
    assert sorted(p.name for p in tmp_path.glob(".m.tmp-*")) == [live.name]


def test_full_size_config_builds_aniportrait_shapes_on_meta():
    """configs/model/aniportrait.yaml builds exactly AniPortrait's parameter counts (fixture manifests)."""
    from pathlib import Path

    import fakes_aniportrait

    from portrait import config as config_lib
    from portrait.models.bundle import ModelConfig

    repo = Path(__file__).resolve().parents[2]
    fixtures = fakes_aniportrait.fixtures_dir()
    if fixtures is None:
        pytest.skip("AniPortrait manifests not found (tests/fixtures/aniportrait)")
    cfg = config_lib.load(ModelConfig, repo / "configs/model/aniportrait.yaml")
    with torch.device("meta"):
        model = Pose2VideoModel.from_config(cfg, seed=None)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    man = {name: json.loads((fixtures / f"{name}.json").read_text()) for name in ("denoising_unet_with_motion_modules", "pose_guider", "reference_unet")}
    full = json.loads((fixtures / "full_size_configs.json").read_text())
    assert count(model.denoising_unet) == man["denoising_unet_with_motion_modules"]["num_params"]
    assert count(model.pose_guider) == man["pose_guider"]["num_params"]
    # reference_unet.pth lacks the 4 output-head tensors that UNet2DConditionModel has (filled with zeros on import)
    head = sum(p.numel() for p in list(model.reference_unet.conv_out.parameters()) + list(model.reference_unet.conv_norm_out.parameters()))
    assert count(model.reference_unet) - head == man["reference_unet"]["num_params"]
    assert count(model.vae) == full["vae"]["num_params"]
    assert count(model.image_encoder) == full["image_encoder"]["num_params"]
    pg = {k: list(v.shape) for k, v in model.pose_guider.state_dict().items()}
    assert pg == man["pose_guider"]["tensors"]


def test_default_scheduler_reproduces_aniportrait_timesteps():
    import fakes_aniportrait

    if fakes_aniportrait.fixtures_dir() is None:
        pytest.skip("AniPortrait manifests not found (tests/fixtures/aniportrait)")
    fixtures = fakes_aniportrait.fixtures_dir() / "full_size_configs.json"
    from diffusers import DDIMScheduler

    from portrait.models.bundle import TEACHER_SCHEDULER

    sched = DDIMScheduler(**TEACHER_SCHEDULER)
    sched.set_timesteps(25)
    assert sched.timesteps.tolist() == json.loads(fixtures.read_text())["ddim_timesteps_25_steps"]


def test_reset_motion_modules_restores_identity_and_keeps_spatial_layers(tiny_model):
    from portrait.models.unets import motion_modules, motion_modules_are_identity, reset_motion_modules

    model = copy.deepcopy(tiny_model)
    unet = model.denoising_unet
    assert motion_modules_are_identity(unet)  # a fresh model: stage 1's state
    x, enc, bank, feats = _inputs(model)
    t = torch.tensor([500])
    with torch.no_grad():
        before = model.denoise(x, t, enc, feats, bank)
        for m in motion_modules(unet):  # what stage 2 does to them
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        trained = model.denoise(x, t, enc, feats, bank)
    assert not motion_modules_are_identity(unet) and not torch.allclose(before, trained, atol=1e-4)
    spatial = {k: v.clone() for k, v in unet.state_dict().items() if "motion_modules" not in k}
    assert reset_motion_modules(unet, seed=3) == len(motion_modules(unet)) > 0
    assert motion_modules_are_identity(unet)
    with torch.no_grad():
        after = model.denoise(x, t, enc, feats, bank)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)  # identity again: the spatial UNet's output
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in spatial.items())
    # the inner weights are re-drawn (not left as stage 2 trained them), deterministically by seed
    inner = {k: v.clone() for k, v in unet.state_dict().items() if "motion_modules" in k and "proj_in.weight" in k}
    reset_motion_modules(unet, seed=3)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in inner.items())
