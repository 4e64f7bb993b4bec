"""AniPortrait importer: 1:1 key/shape mapping at full and tiny size, strict loading, bit-exact import.

The full-size models are built on the meta device (no memory, no init) and compared with the key/shape
manifests of AniPortrait's released files (``shared/fixtures/aniportrait``). The import round trip runs on
a fake tiny ``pretrained_model/`` folder fabricated from the tiny manifests (tests/fakes_aniportrait.py).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from portrait.checkpoint import aniportrait as ap
from portrait.checkpoint.import_aniportrait import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fakes_aniportrait as fakes  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(fakes.fixtures_dir() is None, reason="AniPortrait manifests not found")

SIZES = {
    "full": dict(prefix="", unet=lambda: fakes.load_json("full_size_configs.json")["sd15_unet_config"]),
    "tiny": dict(prefix="tiny_", unet=fakes.tiny_unet_config),
}


def shapes(module_or_sd) -> dict[str, tuple[int, ...]]:
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, nn.Module) else module_or_sd
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in sd.items()}


def meta_denoising_unet(unet_cfg: dict):
    from diffusers import UNetMotionModel

    with torch.device("meta"):
        return UNetMotionModel(**ap.unet_motion_config_from_sd15(unet_cfg))


def meta_reference_unet(unet_cfg: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**ap.unet2d_kwargs(unet_cfg))


# ---------------------------------------------------------------------------------------------------
# 1:1 mapping onto the manifests (pure key/shape tables, meta-device models)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["full", "tiny"])
def test_motion_key_rules_match_fixture_key_map(size):
    key_map = fakes.load_json("diffusers_unet_motion_model_mapping.json")[f"key_map_{size}"]
    assert len(key_map) > 0
    got = {k: ap.convert_motion_key(k) for k in key_map}
    assert got == key_map


@pytest.mark.parametrize("size", ["full", "tiny"])
def test_denoising_unet_maps_1to1(size):
    p = SIZES[size]["prefix"]
    model = meta_denoising_unet(SIZES[size]["unet"]())
    converted = ap.convert_denoising_unet(fakes.manifest(f"{p}denoising_unet.json"), fakes.manifest(f"{p}motion_module.json"))
    missing, unexpected, mismatched = ap.diff_state_dict(model.state_dict(), converted)
    assert (missing, unexpected, mismatched) == ([], [], [])
    assert shapes(converted) == shapes(model)
    assert len(converted) == {"full": 1253, "tiny": 793}[size]


@pytest.mark.parametrize("size", ["full", "tiny"])
def test_motion_keys_may_sit_in_either_file(size):
    p = SIZES[size]["prefix"]
    den, mot = fakes.manifest(f"{p}denoising_unet.json"), fakes.manifest(f"{p}motion_module.json")
    reference = ap.convert_denoising_unet(den, mot)
    moved = dict(list(mot.items())[::2])  # half the motion keys in denoising_unet.pth
    both = ap.convert_denoising_unet({**den, **moved}, {k: v for k, v in mot.items() if k not in moved})
    assert both == reference
    # ... or all of them in one file, or duplicated with equal values
    assert ap.convert_denoising_unet({**den, **mot}, {}) == reference
    assert ap.convert_denoising_unet({**den, **mot}, mot) == reference


@pytest.mark.parametrize("size", ["full", "tiny"])
def test_reference_unet_maps_1to1_with_zero_head(size):
    p = SIZES[size]["prefix"]
    model = meta_reference_unet(SIZES[size]["unet"]())
    file_shapes = fakes.manifest(f"{p}reference_unet.json")
    assert not set(ap.REFERENCE_HEAD_KEYS) & set(file_shapes)
    converted = ap.convert_reference_unet(file_shapes, model.state_dict())
    assert shapes(converted) == shapes(model)


@pytest.mark.parametrize("size", ["full", "tiny"])
def test_pose_guider_maps_1to1_and_architecture_is_derived(size):
    from portrait.models.pose_guider import PoseGuider

    p = SIZES[size]["prefix"]
    file_shapes = fakes.manifest(f"{p}pose_guider.json")
    cfg = ap.pose_guider_config_from_state_dict(file_shapes)
    n = {"full": 320, "tiny": 32}[size]
    assert cfg == dict(noise_latent_channels=n, conditioning_channels=3, num_downsamples=3, attention_heads=16,
                       attention_head_dim=88, channel_mult=[1, 2, 4, 4], mode="faithful")
    with torch.device("meta"):
        model = PoseGuider(**cfg)
    assert shapes(ap.convert_pose_guider(file_shapes)) == shapes(model)
    assert list(model.state_dict()) == list(file_shapes)  # even the order matches upstream


@pytest.mark.parametrize("size", ["full", "tiny"])
def test_unet_motion_config_equals_from_unet2d(size):
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet_cfg = SIZES[size]["unet"]()
    mine = ap.unet_motion_config_from_sd15(unet_cfg)
    kwargs = ap.unet2d_kwargs(unet_cfg)
    with torch.device("meta" if size == "full" else "cpu"):
        adapter = MotionAdapter(block_out_channels=kwargs["block_out_channels"], motion_layers_per_block=kwargs["layers_per_block"],
                                motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32,
                                use_motion_mid_block=True)
        ref = UNetMotionModel.from_unet2d(UNet2DConditionModel(**kwargs), adapter, load_weights=size == "tiny")
    expected = {k: ap._jsonable(v) for k, v in ref.config.items() if not k.startswith("_")}
    assert mine == expected
    fixture = fakes.load_json("diffusers_unet_motion_model_mapping.json")["diffusers_configs_used"][size]["unet_motion_model_config"]
    assert {k: mine[k] for k in fixture} == fixture


def test_unet2d_kwargs_ignores_private_and_unknown_keys():
    raw = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "some_legacy_key": 1, **fakes.tiny_unet_config()}
    kwargs = ap.unet2d_kwargs(raw)
    assert "_class_name" not in kwargs and "some_legacy_key" not in kwargs
    assert kwargs["block_out_channels"] == [32, 64, 128, 128]


def test_scheduler_config_reproduces_upstream_timesteps():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**ap.ANIPORTRAIT_SCHEDULER_CONFIG)
    sched.set_timesteps(25)
    assert sched.timesteps.tolist() == fakes.load_json("full_size_configs.json")["ddim_timesteps_25_steps"]


# ---------------------------------------------------------------------------------------------------
# Converter and strict-loader errors (small synthetic dicts)
# ---------------------------------------------------------------------------------------------------

MM = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."


def test_conflicting_duplicate_motion_key_is_an_error():
    a = {MM + "attention_blocks.0.to_q.weight": torch.zeros(2, 2)}
    b = {MM + "attention_blocks.0.to_q.weight": torch.ones(2, 2)}
    assert ap.convert_denoising_unet(a, dict(a)) == {"down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight": a[MM + "attention_blocks.0.to_q.weight"]}
    with pytest.raises(ap.CheckpointMismatchError, match="attn1.to_q.weight") as e:
        ap.convert_denoising_unet(a, b)
    assert "motion_module.pth" in str(e.value) and "denoising_unet.pth" in str(e.value)


def test_dropped_second_pos_encoding_must_equal_the_kept_one():
    pe = fakes.sinusoid_pe(32, 8)
    ok = {MM + "attention_blocks.0.pos_encoder.pe": pe, MM + "attention_blocks.1.pos_encoder.pe": pe.clone()}
    out = ap.convert_denoising_unet({}, ok)
    assert list(out) == ["down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe"]
    bad = dict(ok)
    bad[MM + "attention_blocks.1.pos_encoder.pe"] = pe + 1
    with pytest.raises(ap.CheckpointMismatchError, match="attention_blocks.1.pos_encoder.pe"):
        ap.convert_denoising_unet({}, bad)


def test_pose_guider_layout_errors_are_explained():
    sd = fakes.manifest("tiny_pose_guider.json")
    with pytest.raises(ap.CheckpointMismatchError, match="module."):
        ap.convert_pose_guider({f"module.{k}": v for k, v in sd.items()})
    with pytest.raises(ap.CheckpointMismatchError, match="use_ca=False"):
        ap.convert_pose_guider({k: v for k, v in sd.items() if not k.startswith("cross_attn")})


def _tiny_module() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_load_strict_assigns_into_meta_and_copies_into_cpu():
    src = _tiny_module().state_dict()
    with torch.device("meta"):
        m = _tiny_module()
    ap.load_strict(m, src, "x.pth -> tiny")
    assert all(not t.is_meta for t in m.state_dict().values())
    assert m[0].weight.data_ptr() == src["0.weight"].data_ptr()  # assigned, not copied
    assert isinstance(m[0].weight, nn.Parameter)
    cpu = _tiny_module()
    ap.load_strict(cpu, src, "x.pth -> tiny")
    assert all(torch.equal(cpu.state_dict()[k], v) for k, v in src.items())
    assert cpu[0].weight.data_ptr() != src["0.weight"].data_ptr()


def test_load_strict_one_error_lists_missing_unexpected_and_shapes():
    src = _tiny_module().state_dict()
    src["0.weightt"] = src.pop("0.weight")
    src["1.bias"] = torch.zeros(5)
    src["extra"] = torch.zeros(1)
    m = _tiny_module()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ap.CheckpointMismatchError) as e:
        ap.load_strict(m, src, "foo.pth -> tiny module")
    msg = str(e.value)
    assert msg.startswith("foo.pth -> tiny module")
    assert "1 missing, 2 unexpected, 1 shape conflicts" in msg
    assert "0.weight\n" in msg and "0.weightt" in msg and "extra" in msg and "1.bias: file [5] vs model [4]" in msg
    assert e.value.missing == ["0.weight"] and e.value.unexpected == ["0.weightt", "extra"]
    assert isinstance(e.value, ValueError)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())  # untouched


def test_mismatch_error_truncates_long_lists():
    err = ap.CheckpointMismatchError("f.pth -> m", missing=[f"k{i:03d}" for i in range(100)])
    msg = str(err)
    assert "k000" in msg and "k099" not in msg and "... and 80 more" in msg
    assert len(err.missing) == 100


def test_load_strict_refuses_unfillable_meta_buffers():
    class WithNonPersistent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(3.0), persistent=False)

    src = WithNonPersistent().state_dict()
    with torch.device("meta"):
        m = WithNonPersistent()
    with pytest.raises(ap.CheckpointMismatchError, match="table"):
        ap.load_strict(m, src, "x.pth -> m")
    built = ap.build_on_meta(WithNonPersistent)  # falls back to CPU construction
    ap.load_strict(built, src, "x.pth -> m")
    assert torch.equal(built.table, torch.arange(3.0))


# ---------------------------------------------------------------------------------------------------
# Import of a fake tiny AniPortrait folder
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("aniportrait") / "pretrained_model"
    written = fakes.make_fake_aniportrait_dir(root)
    return root, written


@pytest.fixture(scope="module")
def imported(fake_src, tmp_path_factory):
    src, _ = fake_src
    out = tmp_path_factory.mktemp("imported") / "model"
    assert main(["--src", str(src), "--out", str(out), "--quiet"]) == 0
    return out


def _assert_bit_exact(model, written, dtype=torch.float32):
    def cast(t):
        return t.to(dtype) if t.is_floating_point() else t

    den = ap.convert_denoising_unet(written["denoising_unet.pth"], written["motion_module.pth"])
    checks = [
        (model.denoising_unet, {k: cast(v) for k, v in den.items()}),
        (model.reference_unet, {k: cast(v) for k, v in written["reference_unet.pth"].items()}),
        (model.pose_guider, {k: cast(v) for k, v in written["pose_guider.pth"].items()}),
    ]
    n = 0
    for module, expected in checks:
        got = module.state_dict()
        for k, v in expected.items():
            assert got[k].dtype == v.dtype, k
            assert torch.equal(got[k], v), k
            n += 1
    ref = model.reference_unet.state_dict()
    for k in ap.REFERENCE_HEAD_KEYS:
        assert ref[k].abs().sum() == 0
    # every parameter of the three modules came from the files (or is the documented zero head)
    assert n + len(ap.REFERENCE_HEAD_KEYS) == sum(len(m.state_dict()) for m, _ in checks)


def test_import_round_trip_is_bit_exact(fake_src, imported):
    from portrait.models.bundle import Pose2VideoModel

    src, written = fake_src
    model = Pose2VideoModel.from_pretrained(imported)
    _assert_bit_exact(model, written)
    assert model.pose_guider.config.mode == "faithful"
    assert model.config.uncond_reference == "self"
    assert model.config.resolution == 64
    assert model.metadata["pose_guider_mode"] == "faithful" and model.metadata["uncond_reference"] == "self"
    source = model.metadata["source"]
    assert source["path"] == str(src.resolve())
    for name in ap.PTH_FILES:
        assert source["sha256"][name] == hashlib.sha256((src / name).read_bytes()).hexdigest()
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert "AniPortrait" in (imported / "README.md").read_text()
    # VAE / image encoder are the folder's weights
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionModelWithProjection

    vae = AutoencoderKL.from_pretrained(src / "sd-vae-ft-mse")
    assert all(torch.equal(model.vae.state_dict()[k], v) for k, v in vae.state_dict().items())
    enc = CLIPVisionModelWithProjection.from_pretrained(src / "image_encoder")
    assert all(torch.equal(model.image_encoder.state_dict()[k], v) for k, v in enc.state_dict().items())
    # plain diffusers loads the UNet folders (every parameter is present)
    from diffusers import UNet2DConditionModel, UNetMotionModel

    UNet2DConditionModel.from_pretrained(imported / "reference_unet")
    UNetMotionModel.from_pretrained(imported / "denoising_unet")


def test_import_fp16(fake_src, tmp_path):
    from portrait.models.bundle import Pose2VideoModel

    src, written = fake_src
    out = tmp_path / "fp16"
    assert main(["--src", str(src), "--out", str(out), "--dtype", "fp16", "--quiet"]) == 0
    from safetensors import safe_open

    with safe_open(out / "denoising_unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # stored as fp16
    model = Pose2VideoModel.from_pretrained(out, dtype=torch.float16)
    _assert_bit_exact(model, written, torch.float16)
    assert model.vae.dtype == torch.float16 and model.image_encoder.dtype == torch.float16
    assert model.metadata["dtype"] == "fp16"


def test_cli_as_module_subprocess(fake_src, tmp_path):
    src, written = fake_src
    out = tmp_path / "sub"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "portrait.checkpoint.import_aniportrait", "--src", str(src), "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    pg = load_file(out / "pose_guider" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(pg[k], v) for k, v in written["pose_guider.pth"].items())


def test_refuses_to_overwrite_without_force(fake_src, imported, tmp_path, capsys):
    src, _ = fake_src
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--src", str(src), "--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--src", str(src), "--out", str(empty), "--quiet"]) == 0  # an empty folder is fine
    assert main(["--src", str(src), "--out", str(out), "--quiet", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "fastportrait.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "existing"]  # no temp folders left


# ---------------------------------------------------------------------------------------------------
# Bad inputs: one clear error, nothing at --out
# ---------------------------------------------------------------------------------------------------


def _bad_copy(src: Path, dst: Path, name: str | None = None, edit=None) -> Path:
    """Symlink-copy the fake folder, rewriting (``edit(sd)``) or deleting (``edit=None``) file ``name``."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name != name:
            (dst / p.name).symlink_to(p)
    if name is not None and edit is not None:
        sd = torch.load(src / name, weights_only=True)
        edit(sd)
        torch.save(sd, dst / name)
    return dst


def _run_bad(src: Path, tmp_path: Path, capsys) -> str:
    out = tmp_path / "out"
    assert main(["--src", str(src), "--out", str(out), "--quiet"]) == 1
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    return capsys.readouterr().err


def test_renamed_key_names_the_key_and_file(fake_src, tmp_path, capsys):
    src, _ = fake_src

    def rename(sd):
        sd["conv_in.weights"] = sd.pop("conv_in.weight")

    bad = _bad_copy(src, tmp_path / "bad", "denoising_unet.pth", rename)
    with pytest.raises(ap.CheckpointMismatchError) as e:
        ap.import_aniportrait(bad, progress=False)
    assert e.value.missing == ["conv_in.weight"] and e.value.unexpected == ["conv_in.weights"]
    assert "denoising_unet.pth" in str(e.value)
    err = _run_bad(bad, tmp_path, capsys)
    assert "conv_in.weight" in err and "conv_in.weights (file key denoising_unet.pth:conv_in.weights)" in err


def test_renamed_motion_key_names_the_source_key(fake_src, tmp_path):
    src, _ = fake_src
    key = "up_blocks.1.motion_modules.1.temporal_transformer.transformer_blocks.0.ff_norm.weight"

    def rename(sd):
        sd[key.replace("ff_norm", "ff_nrm")] = sd.pop(key)

    bad = _bad_copy(src, tmp_path / "bad", "motion_module.pth", rename)
    with pytest.raises(ap.CheckpointMismatchError) as e:
        ap.import_aniportrait(bad, progress=False)
    assert e.value.missing == ["up_blocks.1.motion_modules.1.transformer_blocks.0.norm3.weight"]
    assert f"motion_module.pth:{key.replace('ff_norm', 'ff_nrm')}" in str(e.value)


def test_wrong_shape_names_the_key(fake_src, tmp_path, capsys):
    src, _ = fake_src

    def reshape(sd):
        sd["cross_attn2.proj_out.bias"] = torch.zeros(65)

    bad = _bad_copy(src, tmp_path / "bad", "pose_guider.pth", reshape)
    with pytest.raises(ap.CheckpointMismatchError) as e:
        ap.import_aniportrait(bad, progress=False)
    assert e.value.mismatched == [("cross_attn2.proj_out.bias", (65,), (64,))]
    assert "pose_guider.pth" in str(e.value)
    assert "cross_attn2.proj_out.bias: file [65] vs model [64]" in _run_bad(bad, tmp_path, capsys)


def test_reference_unet_shape_conflict(fake_src, tmp_path, capsys):
    src, _ = fake_src

    def reshape(sd):
        sd["mid_block.attentions.0.proj_in.weight"] = torch.zeros(128, 128)

    bad = _bad_copy(src, tmp_path / "bad", "reference_unet.pth", reshape)
    err = _run_bad(bad, tmp_path, capsys)
    assert "reference_unet.pth" in err and "mid_block.attentions.0.proj_in.weight: file [128, 128] vs model [128, 128, 1, 1]" in err


@pytest.mark.parametrize("missing", ["motion_module.pth", "sd-vae-ft-mse", "image_encoder", "stable-diffusion-v1-5"])
def test_missing_piece_names_the_path(fake_src, tmp_path, capsys, missing):
    src, _ = fake_src
    bad = _bad_copy(src, tmp_path / "bad", missing)
    with pytest.raises(ap.AniPortraitLayoutError) as e:
        ap.read_aniportrait_dir(bad)
    assert missing in str(e.value) and "expected AniPortrait" in str(e.value)
    assert missing in _run_bad(bad, tmp_path, capsys)


def test_truncated_pth_names_the_file(fake_src, tmp_path, capsys):
    src, _ = fake_src
    bad = _bad_copy(src, tmp_path / "bad", "reference_unet.pth")
    data = (src / "reference_unet.pth").read_bytes()
    (bad / "reference_unet.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ap.CheckpointReadError, match="reference_unet.pth"):
        ap.read_pth(bad / "reference_unet.pth")
    err = _run_bad(bad, tmp_path, capsys)
    assert "reference_unet.pth" in err and "truncated or corrupt" in err


def test_components_that_do_not_fit_are_refused(fake_src, tmp_path, capsys):
    src, _ = fake_src
    bad = _bad_copy(src, tmp_path / "bad", "image_encoder")
    fakes.save_tiny_image_encoder(bad / "image_encoder", projection_dim=16)  # UNet cross_attention_dim is 32
    with pytest.raises(ap.CheckpointMismatchError, match="projection_dim 16"):
        ap.import_aniportrait(bad, progress=False)
    assert "cross_attention_dim 32" in _run_bad(bad, tmp_path, capsys)


def test_corrupt_vae_folder_names_the_folder(fake_src, tmp_path, capsys):
    src, _ = fake_src
    bad = _bad_copy(src, tmp_path / "bad", "sd-vae-ft-mse")
    (bad / "sd-vae-ft-mse").mkdir()
    (bad / "sd-vae-ft-mse" / "config.json").write_text((src / "sd-vae-ft-mse" / "config.json").read_text())
    (bad / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ap.CheckpointReadError, match="sd-vae-ft-mse"):
        ap.import_aniportrait(bad, progress=False)
    assert "VAE folder" in _run_bad(bad, tmp_path, capsys)


def test_garbage_pth_is_a_read_error(tmp_path):
    p = tmp_path / "pose_guider.pth"
    p.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ap.CheckpointReadError, match="pose_guider.pth"):
        ap.read_pth(p)
    torch.save([torch.zeros(1)], p)
    with pytest.raises(ap.CheckpointReadError, match="not a flat"):
        ap.read_pth(p)


# ---------------------------------------------------------------------------------------------------
# Exact tiny-manifest shapes (the 1408-wide pose guider: 0.5 GB of random tensors)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_import_exact_tiny_manifest_shapes(tmp_path):
    from portrait.models.bundle import Pose2VideoModel

    src = tmp_path / "pretrained_model"
    written = fakes.make_fake_aniportrait_dir(src, pose_inner_dim=fakes.UPSTREAM_POSE_INNER)
    assert shapes(written["pose_guider.pth"]) == fakes.manifest("tiny_pose_guider.json")
    out = tmp_path / "model"
    assert main(["--src", str(src), "--out", str(out), "--quiet"]) == 0
    model = Pose2VideoModel.from_pretrained(out)
    assert model.pose_guider.config.attention_head_dim == 88
    _assert_bit_exact(model, written)
