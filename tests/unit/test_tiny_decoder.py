"""The tiny (TAESD-architecture) decoder: folders, errors, latent-space checks, and its use in the pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from infer.pipeline import GenerationConfig, Pose2VideoPipeline
from portrait.models import tiny_decoder as TD


def _tiny(seed: int = 0, arch: str = "tiny"):
    torch.manual_seed(seed)
    return TD.build_tiny_decoder(arch).eval()


def test_arch_upsampling_matches_the_vaes_it_is_for(tiny_model):
    assert TD.upsampling_factor(_tiny()) == tiny_model.vae_scale_factor == 4  # the embedded teacher's 3-block VAE
    assert TD.upsampling_factor(_tiny(arch="taesd")) == 8  # SD1.5 / AniPortrait
    TD.check_compatible(_tiny(), tiny_model)
    with pytest.raises(TD.DecoderFolderError, match="at 8x, but the model's VAE has 4 channels at 4x"):
        TD.check_compatible(_tiny(arch="taesd"), tiny_model)
    with pytest.raises(ValueError, match="unknown tiny-decoder arch 'nope'"):
        TD.build_tiny_decoder("nope")


def test_save_load_round_trip_and_plain_diffusers_folder(tmp_path):
    tiny = _tiny(1)
    z = torch.randn(2, 4, 16, 16)
    ref = TD.decode(tiny, z)
    out = TD.save_tiny_decoder(tiny, tmp_path / "dec", {"metrics": {"val_psnr_tiny_vs_kl": 30.0}, "steps": 7})
    assert not list(tmp_path.glob("dec.tmp-*"))  # written atomically: no temp sibling left
    loaded = TD.load_tiny_decoder(out)
    assert loaded.fastportrait["kind"] == TD.KIND and loaded.fastportrait["steps"] == 7
    assert torch.equal(TD.decode(loaded, z), ref)
    assert "val_psnr_tiny_vs_kl" in (out / "README.md").read_text()
    # a plain diffusers AutoencoderTiny folder (as madebyollin/taesd is published) loads without our metadata
    tiny.save_pretrained(tmp_path / "plain")
    plain = TD.load_tiny_decoder(tmp_path / "plain")
    assert plain.fastportrait == {} and torch.equal(TD.decode(plain, z), ref)
    # re-export over a decoder folder is allowed; over another folder it is refused
    TD.save_tiny_decoder(tiny, out, {"steps": 8})
    assert TD.read_decoder_info(out)["steps"] == 8
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a tiny-decoder folder"):
        TD.save_tiny_decoder(tiny, tmp_path / "other", {})
    assert (tmp_path / "other" / "keep.txt").read_text() == "x"


def test_bad_folders_are_named_errors(tmp_path, tiny_model_dir):
    with pytest.raises(TD.DecoderFolderError, match="decoder folder not found"):
        TD.load_tiny_decoder(tmp_path / "missing")
    with pytest.raises(TD.DecoderFolderError, match="is a Pose2Video model folder"):
        TD.load_tiny_decoder(tiny_model_dir)
    with pytest.raises(TD.DecoderFolderError, match="holds a AutoencoderKL model"):
        TD.load_tiny_decoder(tiny_model_dir / "vae")
    out = TD.save_tiny_decoder(_tiny(), tmp_path / "dec", {})
    weights = out / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    with pytest.raises(TD.DecoderFolderError, match="cannot load the decoder weights"):
        TD.load_tiny_decoder(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(TD.DecoderFolderError, match="corrupt"):
        TD.load_tiny_decoder(out)
    bad = TD.save_tiny_decoder(_tiny(), tmp_path / "dec2", {})
    (bad / TD.META_FILE).write_text(json.dumps({"kind": "interpolator"}))
    with pytest.raises(TD.DecoderFolderError, match="not a tiny_decoder"):
        TD.load_tiny_decoder(bad)


def test_pipeline_decodes_with_the_tiny_decoder(tiny_model, tmp_path):
    tiny = _tiny(2)
    z = torch.randn(1, 4, 5, 16, 16)
    kl_pipe = Pose2VideoPipeline(tiny_model)
    pipe = Pose2VideoPipeline(tiny_model, decoder=TD.save_tiny_decoder(tiny, tmp_path / "dec", {}))
    want = ((TD.decode(tiny, z[0].permute(1, 0, 2, 3)) + 1) / 2).clamp(0, 1)
    got = pipe.decode(z, batch_size=2)  # 3 calls of <= 2 frames: batching must not change a frame
    assert torch.allclose(got, want, atol=1e-6)
    assert pipe.counters["vae_decode_calls"] == 3
    assert not torch.allclose(got, kl_pipe.decode(z, 16), atol=1e-2)  # it really replaced the KL decoder
    # end to end: same noise, same latents; only the decode differs
    ref = torch.rand(3, 64, 64)
    pose = torch.rand(5, 3, 64, 64)
    gen = GenerationConfig(steps=2, guidance=1.0)
    frames = pipe(ref, pose, gen, torch.Generator().manual_seed(0))
    assert frames.shape == (5, 3, 64, 64) and frames.min() >= 0 and frames.max() <= 1
    with pytest.raises(TD.DecoderFolderError, match="at 8x"):
        Pose2VideoPipeline(tiny_model, decoder=_tiny(arch="taesd"))


def test_benchmark_counts_the_tiny_decoder_as_vae_decode(tiny_model):
    from infer import bench_lib as L

    tiny = _tiny()
    comps = L.component_modules(tiny_model, decoder=tiny)
    assert comps["vae_decode"] == [tiny.decoder]
    pipe = Pose2VideoPipeline(tiny_model, decoder=tiny)
    z = torch.randn(1, 4, 2, 16, 16)
    kl = L.count_component_flops(lambda: Pose2VideoPipeline(tiny_model).decode(z, 16), L.component_modules(tiny_model))
    td = L.count_component_flops(lambda: pipe.decode(z, 16), comps)
    assert 0 < td["vae_decode"] < 0.5 * kl["vae_decode"]  # arch "tiny": 0.43x the KL decoder's MACs


def test_a_decoder_of_another_vae_is_refused(tiny_model, tmp_path):
    import copy

    from portrait.models import ModelConfig, Pose2VideoModel

    own = TD.save_tiny_decoder(_tiny(), tmp_path / "own", {"vae_signature": TD.vae_signature(tiny_model.vae)})
    Pose2VideoPipeline(tiny_model, decoder=own)  # same VAE: accepted
    half = copy.deepcopy(tiny_model).to(torch.bfloat16)  # the same VAE in bf16 (infer.animate --dtype bf16): accepted
    Pose2VideoPipeline(half, decoder=own)
    other = Pose2VideoModel.from_config(ModelConfig(), seed=5)  # same shapes, other weights
    assert not TD.signature_matches(TD.vae_signature(other.vae), TD.vae_signature(tiny_model.vae))
    with pytest.raises(TD.DecoderFolderError, match="distilled from another VAE"):
        Pose2VideoPipeline(other, decoder=own)
