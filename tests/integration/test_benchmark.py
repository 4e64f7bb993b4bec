"""`python -m infer.benchmark`: report files at minimal size, identical variants, picker, FLOPs with SDPA, speed mode."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from infer import bench_lib as L
from infer import bench_report as R
from infer import benchmark as B
from portrait import config as config_lib


def tiny_cfg(model_dir, data, out, **kw) -> B.BenchConfig:
    variants = kw.pop("variants", None) or [
        B.VariantConfig(name="shipped", model=str(model_dir), steps=1, legacy_loop=True),
        B.VariantConfig(name="same", model=str(model_dir), steps=1, legacy_loop=True),  # identical to "shipped"
    ]
    base = dict(name="t", out_dir=str(out), data=str(data), clips=1, frames=8, repeats=2, warmup=0, threads=1,
                shipped="shipped", fixed="same", variants=variants, video_variants=1)
    base.update(kw)
    return B.BenchConfig(**base)


def test_two_variant_benchmark_writes_every_report_file(tiny_model_dir, train_dataset, tmp_path):
    extra = B.VariantConfig(name="missing", model=str(tmp_path / "no_such_model"), steps=1)
    unwanted = B.VariantConfig(name="unwanted", model=str(tiny_model_dir), steps=1)
    cfg = tiny_cfg(tiny_model_dir, train_dataset, tmp_path, skip=["unwanted"], variants=[
        B.VariantConfig(name="shipped", model=str(tiny_model_dir), steps=1, legacy_loop=True),
        B.VariantConfig(name="same", model=str(tiny_model_dir), steps=1, legacy_loop=True), extra, unwanted])
    report = B.main(cfg)
    out = tmp_path / "t"
    for f in ("report.json", "report.md", "pareto.png", "side_by_side.mp4", "side_by_side.gif", "config.yaml"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    saved = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["shipped", "same", "missing", "unwanted"]
    assert saved["variants"][2]["status"].startswith("skipped: model folder")
    assert saved["variants"][3]["status"] == "skipped: by config (skip)" and saved["variants"][3].get("sec_per_frame") is None
    row = saved["variants"][1]
    for key in ("name", "sec_per_frame", "fps", "peak_mem_mb", "unet_evals_per_frame", "flops_per_frame", "speedup_vs_shipped",
                "speedup_vs_fixed", "psnr_gt", "ssim_gt", "psnr_teacher", "landmark_error", "mouth_psnr", "flicker"):
        assert row.get(key) is not None, key
    assert set(row["flops_per_frame"]) == {*L.COMPONENTS, "total"}
    assert row["flops_per_frame"]["denoising_unet"] > 0 and row["flops_per_frame"]["vae_decode"] > 0
    assert row["unet_evals_per_frame"] == 2  # 1 step x 2 CFG halves, one window
    # identical variants: the same frames (PSNR vs teacher at the cap) and, loosely, the same speed
    assert row["psnr_teacher"] == pytest.approx(100.0)
    assert 0.2 < row["speedup_vs_shipped"] < 5
    assert report["pick"]["name"] in ("shipped", "same")
    assert "| shipped |" in (out / "report.md").read_text()


def test_picker_names_the_fastest_variant_within_budget():
    def row(name, speed, psnr, lmk, psnr_t=30.0):
        return {"name": name, "status": "ok", "speedup_vs_shipped": speed, "psnr_gt": psnr, "landmark_error": lmk, "psnr_teacher": psnr_t}

    report = {"variants": [row("teacher", 1.2, 25.0, 0.10, 100.0), row("fast_bad_psnr", 50, 23.5, 0.10),
                           row("fast_bad_lmk", 40, 25.0, 0.13), row("ok_slow", 10, 24.5, 0.12), row("ok_fast", 30, 24.1, 0.124),
                           {"name": "broken", "status": "error: x"}]}
    p = R.pick(report, {"max_psnr_loss_db": 1.0, "max_landmark_ratio": 1.25}, "teacher")
    assert p["name"] == "ok_fast"
    assert set(p["rejected"]) == {"fast_bad_psnr", "fast_bad_lmk"}
    assert R.pick(report, {"max_psnr_loss_db": None, "max_landmark_ratio": None}, "teacher")["name"] == "fast_bad_psnr"
    assert R.pick(report, {"max_psnr_loss_db": 0.0, "max_landmark_ratio": 1.0}, "teacher")["name"] == "teacher"
    assert R.pick(report, {"min_psnr_teacher_db": 50.0}, "teacher")["name"] == "teacher"
    with pytest.raises(ValueError, match="nope"):
        R.pick(report, {}, "nope")
    assert R.pareto_front([(1, 25), (50, 23.5), (40, 25), (30, 24.1)]) == [2, 1]


def test_flop_counter_counts_sdpa_in_a_real_tiny_unet(tiny_model):
    """The counted total with SDPA minus the total with the attention kernels replaced by a free stand-in equals
    the explicit SDPA count (QK^T and PV, 2 FLOPs per multiply-add) of every attention call."""
    m = tiny_model
    x = torch.randn(1, 4, 4, 16, 16)
    enc = torch.randn(1, 1, m.config.unet["cross_attention_dim"])
    pose = m.pose_features(torch.randn(1, 3, 4, 64, 64))
    comps = L.component_modules(m)
    real = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def recording(q, k, v, *a, **kw):
        calls.append((q.shape, k.shape))
        return real(q, k, v, *a, **kw)

    def free(q, k, v, *a, **kw):
        return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)

    def run():
        return m.denoise(x, torch.tensor(500), enc, pose, None)

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
        with_sdpa = L.count_component_flops(run, comps)
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", free)
        without = L.count_component_flops(run, comps)
    finally:
        mp.undo()
    # (B, H, Lq, D) x (B, H, Lk, D): QK^T and PV are B H Lq Lk D multiply-adds each
    expected = sum(4 * q[:-1].numel() * k[-2] * q[-1] for q, k in calls)
    assert len(calls) > 0 and expected > 0
    assert with_sdpa["denoising_unet"] - without["denoising_unet"] == expected
    assert with_sdpa["denoising_unet"] > without["denoising_unet"]


def test_counts_extrapolated_from_two_short_runs_equal_a_direct_count(tiny_model):
    import numpy as np

    from infer.pipeline import GenerationConfig, Pose2VideoPipeline

    pipe = Pose2VideoPipeline(tiny_model)
    g = np.random.default_rng(0)
    ref, pose = g.integers(0, 256, (64, 64, 3), dtype=np.uint8), g.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    comps = L.component_modules(tiny_model)

    def count(steps, legacy):
        gen = GenerationConfig(steps=steps, legacy_loop=legacy)
        return L.count_component_flops(lambda: pipe(ref, pose, gen, torch.Generator().manual_seed(0)), comps, unet=tiny_model.denoising_unet)

    for legacy in (True,):  # the legacy loop: the pose guider also scales with steps
        direct = count(3, legacy)
        assert L.extrapolate_counts(count(1, legacy), count(2, legacy), 3) == direct
        assert direct["unet_frame_evals"] == 3 * 2 * 4


def test_speed_mode_refuses_quality_metrics(tmp_path, capsys):
    cfg = B.BenchConfig(mode="speed", metrics=["psnr_gt"], variants=[
        B.VariantConfig(name="teacher_shipped", model="random", legacy_loop=True), B.VariantConfig(name="teacher_fixed", model="random")])
    with pytest.raises(B.BenchError, match="speed-only mode reports no quality"):
        B.validate(cfg)
    code = B.cli(["--config", "configs/bench/aniportrait_speed.yaml", "metrics=[psnr_gt]", f"out_dir={tmp_path}"])
    assert code == 2 and "speed-only mode reports no quality" in capsys.readouterr().err
    # full size on CPU is refused without the explicit tiny override
    if not torch.cuda.is_available():
        assert B.cli(["--config", "configs/bench/aniportrait_speed.yaml", f"out_dir={tmp_path}"]) == 2
        assert "allow_cpu" in capsys.readouterr().err


def test_speed_mode_runs_tiny_on_cpu_without_quality(tmp_path):
    cfg = config_lib.load(B.BenchConfig, "configs/bench/aniportrait_speed.yaml", [
        "device=cpu", "allow_cpu=true", "model_config=configs/model/tiny.yaml", "frames=6", "clips=1", "repeats=1", "warmup=0",
        "threads=1", f"out_dir={tmp_path}", "name=s"])
    cfg.variants = [dataclasses.replace(v, steps=1, model_overrides=[o for o in v.model_overrides if "block_out_channels" not in o])
                    for v in cfg.variants[:2]]
    report = B.main(cfg)
    rows = report["variants"]
    assert all(r["status"] == "ok" for r in rows)
    assert not any(k in r for r in rows for k in B.QUALITY_METRICS)
    assert "Timing does not depend on the weights" in " ".join(report["notes"])
    assert (tmp_path / "s" / "report.md").is_file() and not (tmp_path / "s" / "pareto.png").exists()


def test_keyframes_without_pipeline_support_is_a_clear_error(tiny_model, monkeypatch):
    @dataclasses.dataclass
    class OldGenerationConfig:  # infer.pipeline before keyframed generation
        steps: int = 25
        guidance: float = 3.5
        sampler: str | None = None
        context_frames: int = 16
        context_overlap: int = 4
        legacy_loop: bool = False
        decode_batch_size: int = 16

    monkeypatch.setattr(B, "GenerationConfig", OldGenerationConfig)
    v = B.VariantConfig(name="kf", keyframes="fixed:3", interpolator="blend")
    with pytest.raises(B.VariantError, match="GenerationConfig.keyframes"):
        B.generation_config(v, tiny_model)
    B.generation_config(B.VariantConfig(name="plain"), tiny_model)  # no keyframes: fine


def test_bad_config_is_named(tmp_path, capsys):
    assert B.cli(["--config", "configs/bench/tiny.yaml", "variants.0.dtype=fp8", "--dry-run"]) == 2
    assert "fp8" in capsys.readouterr().err
    assert B.cli(["--config", "configs/bench/tiny.yaml", "shipped=nope", "--dry-run"]) == 2
    assert "nope" in capsys.readouterr().err
    assert B.cli(["--config", "configs/bench/tiny.yaml", "variants.1.keyframes=fixed:x", "--dry-run"]) == 2
    assert "fixed:x" in capsys.readouterr().err
    assert B.cli(["--config", "configs/bench/tiny.yaml", "skip=[teacher_bf17]", "--dry-run"]) == 2
    assert "teacher_bf17" in capsys.readouterr().err
    assert B.cli(["--config", "configs/bench/tiny.yaml", "skip=[teacher_fixed]", "--dry-run"]) == 2
    assert "reference rows" in capsys.readouterr().err
    assert B.cli(["--config", "configs/bench/tiny.yaml", "skip=[teacher_bf16]", "--dry-run"]) == 0
    # the shipped teacher's folder must exist
    assert B.cli(["--config", "configs/bench/tiny.yaml", f"teacher={tmp_path}/none", f"out_dir={tmp_path}"]) == 2
    assert "as shipped" in capsys.readouterr().err


def test_readme_section_is_generated_between_markers(tmp_path):
    report = tmp_path / "runs" / "tiny" / "report.md"
    report.parent.mkdir(parents=True)
    report.write_text("# Benchmark `tiny`\n\n| variant | s/frame |\n|---|---|\n| a | 1 |\n")
    (report.parent / "pareto.png").write_bytes(b"png")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n## Results\n{R.README_BEGIN}\nold\n{R.README_END}\n\n## After\n")
    assert B.cli(["--readme", str(report), "--readme-file", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "### Benchmark `tiny`" in text and "| a | 1 |" in text and text.endswith("## After\n")
    assert "docs/results/tiny_pareto.png" in text and (tmp_path / "docs" / "results" / "tiny_pareto.png").is_file()
    readme.write_text("no markers")
    assert B.cli(["--readme", str(report), "--readme-file", str(readme)]) == 2


def test_keyframed_variant_reports_keyframes_and_inbetweens_separately(tiny_model_dir, train_dataset, tmp_path):
    from infer.pipeline import GenerationConfig

    if "keyframes" not in {f.name for f in dataclasses.fields(GenerationConfig)}:
        pytest.skip("infer/pipeline.py has no keyframed generation yet")
    cfg = tiny_cfg(tiny_model_dir, train_dataset, tmp_path, repeats=1, variants=[
        B.VariantConfig(name="shipped", model=str(tiny_model_dir), steps=1, legacy_loop=True),
        B.VariantConfig(name="same", model=str(tiny_model_dir), steps=1),
        B.VariantConfig(name="kf", model=str(tiny_model_dir), steps=1, keyframes="fixed:3", interpolator="blend")])
    kf = B.main(cfg)["variants"][2]
    assert kf["status"] == "ok" and set(kf["by_frame_type"]) == {"keyframes", "inbetween"}
    for kind in ("keyframes", "inbetween"):
        assert set(kf["by_frame_type"][kind]) == set(B.QUALITY_METRICS)
    assert kf["unet_evals_per_frame"] == 2 * 4 / 8  # keyframes 0, 3, 6, 7 of 8 frames, 1 step x 2 CFG halves


def test_cpu_bf16_capability_is_read_from_the_cpu_flags(monkeypatch):
    amd = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    spr = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert B.cpu_has_native_bf16(amd) is False
    assert B.cpu_has_native_bf16(spr) is True
    assert B.cpu_has_native_bf16("no flags line") is None
    # the report says so when a bf16 row runs on a CPU without bf16 arithmetic, and only then
    cfg = dataclasses.replace(B.BenchConfig(), variants=[B.VariantConfig(name="a", model="m"),
                                                         B.VariantConfig(name="b", model="m", dtype="bf16")])
    cpu = torch.device("cpu")
    monkeypatch.setattr(B, "cpu_has_native_bf16", lambda: False)
    assert any("bf16 is emulated" in n for n in B.notes(cfg, cpu, "interleaved"))
    assert not any("bf16 is emulated" in n for n in B.notes(dataclasses.replace(cfg, variants=cfg.variants[:1]), cpu, "interleaved"))
    assert not any("bf16 is emulated" in n for n in B.notes(dataclasses.replace(cfg, skip=["b"]), cpu, "interleaved"))
    monkeypatch.setattr(B, "cpu_has_native_bf16", lambda: True)
    assert not any("bf16 is emulated" in n for n in B.notes(cfg, cpu, "interleaved"))


def test_decoder_variants_load_the_tiny_decoder_or_report_why_not(tiny_model_dir, tmp_path):
    from portrait.models.tiny_decoder import build_tiny_decoder, save_tiny_decoder

    good = save_tiny_decoder(build_tiny_decoder("tiny"), tmp_path / "td", {})
    wrong = save_tiny_decoder(build_tiny_decoder("taesd"), tmp_path / "taesd", {})  # 8x: another latent space
    cfg = tiny_cfg(tiny_model_dir, tmp_path, tmp_path)

    def load(decoder):
        v = B.VariantConfig(name="td", model=str(tiny_model_dir), steps=1, decoder=decoder)
        r = B.Runner(v, {"name": v.name, "model": v.model, "config": config_lib.to_dict(v), "status": "pending"})
        B.load_runner(r, cfg, torch.device("cpu"))
        return r

    r = load(str(good))
    assert r.ok and r.pipe.decoder is not None
    assert L.component_modules(r.pipe.model, None, r.pipe.decoder)["vae_decode"] == [r.pipe.decoder.decoder]
    assert "tiny decoder td" in R.variant_desc(r.row)
    assert load(str(tmp_path / "none")).row["status"].startswith("skipped: decoder folder")
    assert "at 8x, but the model's VAE" in load(str(wrong)).row["status"]
    assert load(None).pipe.decoder is None
