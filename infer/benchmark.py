"""End-to-end speed/quality benchmark: every reduction, composed, measured in one run against the teacher.

    python -m infer.benchmark --config configs/bench/tiny.yaml                      # tiny models, CPU, quality + speed
    python -m infer.benchmark --config configs/bench/tiny.yaml clips=2 repeats=2 threads=1
    python -m infer.benchmark --config configs/bench/aniportrait_speed.yaml          # full size, random weights, CUDA
    python -m infer.benchmark --config configs/bench/aniportrait_speed.yaml device=cpu allow_cpu=true \
        model_config=configs/model/tiny.yaml frames=20                             # speed mode smoke test on CPU
    python -m infer.benchmark --readme runs/bench/tiny/report.md                    # regenerate README "Results"

A **variant** composes a model folder (teacher, guidance-distilled, 1/2/4-step student, pruned) with steps,
guidance, sampler, keyframes + interpolator, dtype, int8 dynamic quantisation (torchao), ``torch.compile``, the
legacy (upstream) or fixed loop, and the VAE decode batch size (``VariantConfig``). Every variant runs on the
same held-out clips (``infer.evaluate.load_eval_clips``) with the same noise (seed 1000 + clip index).

Speed is end to end: decoded reference + pose frames in memory -> frames -> h264 mp4 written to disk, model
loading excluded (reported as ``load_sec``). Each variant gets ``warmup`` untimed generations, then ``repeats``
timed passes over all clips; ``sec_per_frame`` is the median pass, with min/max. With ``schedule: interleaved``
the passes of all variants alternate (round r times every variant once), so slow drifts of a shared machine's
load hit every row alike; ``sequential`` loads one variant at a time (full size). Speed-ups are against the two
teacher rows of the same run: ``shipped`` (legacy loop, upstream's waste) and ``fixed`` (the lossless fixes).

Quality (``mode: quality``) uses ``infer.metrics``: PSNR/SSIM vs ground truth, PSNR vs the shipped teacher's output
(identical output -> the 100 dB cap), landmark error (the shipped probe), mouth-region PSNR and flicker; with
keyframes also split into keyframes and in-between frames. ``mode: speed`` builds random-weight models (timing
does not depend on weights) and refuses quality metrics.

Outputs in ``out_dir/name/``: report.json, report.md, pareto.png, side_by_side.mp4/.gif, config.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from infer import bench_lib as L
from infer import bench_report as R
from infer.pipeline import GenerationConfig, Pose2VideoPipeline
from portrait import config as config_lib

QUALITY_METRICS = ("psnr_gt", "ssim_gt", "psnr_teacher", "landmark_error", "mouth_psnr", "flicker")


@dataclass
class VariantConfig:
    name: str = ""
    model: str = "runs/teacher/tiny/model"  # a model folder; "random" (speed mode): built from model_config + model_overrides
    model_overrides: list[str] = field(default_factory=list)  # ModelConfig key=value for "random", e.g. pruned widths
    steps: int | None = None  # None: the folder's default_steps (students record theirs), else 25
    guidance: float = 3.5  # CFG scale; the embedded w of guidance-distilled students
    sampler: str | None = None  # None: the folder's own sampler, else ddim
    keyframes: str = "none"  # none | fixed:K (every K-th frame) | adaptive:EPS
    interpolator: str | None = None  # with keyframes: an interpolator model folder, or "blend" (linear cross-fade)
    decoder: str | None = None  # a tiny (TAESD-architecture) decoder folder in place of the KL VAE decoder; None: the VAE's
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    quantize: str = "none"  # none | int8_dynamic (torchao, Linear layers)
    compile: bool = False  # torch.compile the denoising UNet and the VAE decoder
    legacy_loop: bool = False  # upstream's loop: pose guider every step, CFG halves apart, VAE 1 frame per call
    decode_batch_size: int = 16  # frames per VAE decode call (fixed loop)
    context_frames: int = 16
    context_overlap: int = 4


@dataclass
class BudgetConfig:
    """The picker's quality budget, relative to ``reference`` (default: the fixed teacher row). None = no limit."""

    max_psnr_loss_db: float | None = 1.0
    max_landmark_ratio: float | None = 1.25
    min_psnr_teacher_db: float | None = None
    reference: str | None = None


@dataclass
class BenchConfig:
    name: str = "tiny"
    out_dir: str = "runs/bench"
    teacher: str = "portrait/assets/tiny_teacher"  # variants may say model: ${teacher} (one override switches every teacher row)
    models: str = "runs"  # root of the other model folders; variants may say model: ${models}/distill/... (quickstart: runs/quickstart)
    interpolator: str = "portrait/assets/tiny_fast_interpolator"  # variants may say interpolator: ${interpolator} (the shipped one)
    decoder: str = "portrait/assets/tiny_decoder"  # variants may say decoder: ${decoder} (the shipped distilled tiny decoder)
    mode: str = "quality"  # quality | speed (random weights, no quality)
    data: str = "runs/data/synthetic64"
    split: str = "test"
    protocol: str = "self"  # self | cross (infer.evaluate.PROTOCOLS)
    clips: int = 4
    frames: int = 16
    metrics: list[str] | None = None  # None: all in quality mode, none in speed mode
    warmup: int = 1  # untimed generations of clip 0 per variant (compilation happens here)
    repeats: int = 3  # timed passes over all clips per variant
    schedule: str = "auto"  # auto (interleaved for quality, sequential for speed) | interleaved | sequential
    count_flops: bool = True
    threads: int = 0  # torch threads; 0 = all cores
    device: str = "auto"  # auto | cpu | cuda
    fps: float = 25.0
    shipped: str = "teacher_shipped"  # the teacher as shipped (must run, legacy loop)
    fixed: str = "teacher_fixed"  # the teacher with the lossless fixes
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    video_variants: int = 3  # variants shown beside ground truth and teacher
    model_config: str = "configs/model/aniportrait.yaml"  # speed mode: architecture of "random" models
    allow_cpu: bool = False  # speed mode on CPU (testing only; needs a tiny model_config)
    seed: int = 0
    skip: list[str] = field(default_factory=list)  # variant names reported as skipped, e.g. skip=[teacher_bf16] on a CPU without bf16
    variants: list[VariantConfig] = field(default_factory=lambda: [
        VariantConfig(name="teacher_shipped", model="${teacher}", legacy_loop=True), VariantConfig(name="teacher_fixed", model="${teacher}")])


class BenchError(ValueError):
    """A bad benchmark config or a missing required input; the message names it."""


class VariantError(RuntimeError):
    """This variant cannot run as asked (e.g. keyframes before the pipeline supports them): an ``error:`` row."""


def parse_keyframes(spec: str) -> tuple[str, float | None]:
    """"none" | "fixed:K" | "adaptive:EPS[:max_gap=G]" -> (kind, K or EPS); the pipeline's parser when it has one."""
    try:
        from infer.keyframes import parse_keyframes as parse
    except ImportError:  # before keyframed generation lands: accept the documented forms, the pipeline refuses them
        kind, _, val = spec.partition(":")
        try:
            if kind == "none" and not val:
                return "none", None
            if kind == "fixed" and int(val) >= 2:
                return "fixed", int(val)
            if kind == "adaptive" and float(val.split(":")[0]) >= 0:
                return "adaptive", float(val.split(":")[0])
        except ValueError:
            pass
        raise BenchError(f"bad keyframes {spec!r}: use none, fixed:K (K >= 2) or adaptive:EPS[:max_gap=G]") from None
    try:
        k = parse(spec)
    except ValueError as e:
        raise BenchError(f"bad keyframes {spec!r}: {e}") from None
    return k.mode, (k.interval if k.mode == "fixed" else k.eps if k.mode == "adaptive" else None)


def validate(cfg: BenchConfig) -> None:
    if cfg.mode not in ("quality", "speed"):
        raise BenchError(f"mode must be quality or speed, got {cfg.mode!r}")
    if cfg.schedule not in ("auto", "interleaved", "sequential"):
        raise BenchError(f"schedule must be auto, interleaved or sequential, got {cfg.schedule!r}")
    if cfg.clips < 1 or cfg.frames < 2 or cfg.repeats < 1 or cfg.warmup < 0:
        raise BenchError("need clips >= 1, frames >= 2, repeats >= 1, warmup >= 0")
    names = [v.name for v in cfg.variants]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise BenchError(f"every variant needs a unique non-empty name; got {names}")
    for role in ("shipped", "fixed"):
        if getattr(cfg, role) not in names:
            raise BenchError(f"{role}={getattr(cfg, role)!r} names no variant; variants are {names}")
    unknown = [n for n in cfg.skip if n not in names]
    if unknown:
        raise BenchError(f"skip names no variant: {unknown}; variants are {names}")
    if {cfg.shipped, cfg.fixed} & set(cfg.skip):
        raise BenchError(f"cannot skip the reference rows {cfg.shipped!r} / {cfg.fixed!r}: every speed-up is measured against them")
    shipped = cfg.variants[names.index(cfg.shipped)]
    if not shipped.legacy_loop:
        raise BenchError(f"the 'as shipped' teacher row {cfg.shipped!r} must use legacy_loop: true (upstream's loop)")
    for v in cfg.variants:
        where = f"variant {v.name!r}"
        if v.dtype not in L.DTYPES:
            raise BenchError(f"{where}: dtype must be one of {sorted(L.DTYPES)}, got {v.dtype!r}")
        if v.quantize not in L.QUANTIZE:
            raise BenchError(f"{where}: quantize must be one of {L.QUANTIZE}, got {v.quantize!r}")
        if v.steps is not None and v.steps < 1:
            raise BenchError(f"{where}: steps must be >= 1")
        kind, _ = parse_keyframes(v.keyframes)
        if kind != "none" and not v.interpolator:
            raise BenchError(f"{where}: keyframes {v.keyframes!r} need an interpolator (a folder or 'blend')")
        if kind == "adaptive" and cfg.mode == "speed":
            raise BenchError(f"{where}: adaptive keyframes select from landmarks, which speed-only mode (random frames) lacks; use fixed:K")
        if v.model == "random" and cfg.mode != "speed":
            raise BenchError(f"{where}: model 'random' is only allowed in mode: speed (random weights have no quality)")
    if cfg.mode == "speed":
        if cfg.metrics:
            raise BenchError(f"speed-only mode reports no quality (random weights), but metrics={cfg.metrics} were requested; "
                             "drop them or use mode: quality with trained model folders")
    else:
        bad = [m for m in (cfg.metrics or []) if m not in QUALITY_METRICS]
        if bad:
            raise BenchError(f"unknown metrics {bad}; choose from {list(QUALITY_METRICS)}")


# -- clips ---------------------------------------------------------------------------------------------------
@dataclass
class Clip:
    ref: np.ndarray  # (H, W, 3) uint8
    pose: np.ndarray  # (F, H, W, 3) uint8
    index: int
    target: torch.Tensor | None = None  # (F, 3, H, W) in [0, 1]
    landmarks: torch.Tensor | None = None  # (F, 68, 2)


def make_clips(cfg: BenchConfig, resolution: int) -> list[Clip]:
    if cfg.mode == "speed":  # content does not change the work done; random frames keep it data-free
        g = np.random.default_rng(cfg.seed)
        return [Clip(g.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8),
                     g.integers(0, 256, (cfg.frames, resolution, resolution, 3), dtype=np.uint8), i) for i in range(cfg.clips)]
    from infer.evaluate import load_eval_clips

    if not Path(cfg.data).exists():
        raise BenchError(f"data not found: {cfg.data} (python -m portrait.data.synthetic --out {cfg.data} ...)")
    return [Clip(c.ref, c.pose, c.index, c.target, c.landmarks) for c in load_eval_clips(cfg.data, cfg.split, cfg.clips, cfg.frames, cfg.protocol)]


# -- one variant ----------------------------------------------------------------------------------------------
@dataclass
class Runner:
    v: VariantConfig
    row: dict
    pipe: Pose2VideoPipeline | None = None
    gen: GenerationConfig | None = None
    call_kwargs: dict = field(default_factory=dict)
    interpolator: torch.nn.Module | None = None
    times: list = field(default_factory=list)  # seconds per pass
    outputs: list = field(default_factory=list)  # (F, 3, H, W) per clip, from the first timed pass
    keyframes: list = field(default_factory=list)  # keyframe indices per clip (if any)
    mem: L.PeakMemory | None = None

    @property
    def ok(self) -> bool:
        return self.row["status"] == "ok"


def load_interpolator(spec: str, device) -> torch.nn.Module:
    """An interpolator folder or "blend" -> module (fp32: it is small and runs on decoded frames)."""
    try:
        from portrait.models.interpolator import load_interpolator as load
    except ImportError as e:
        raise VariantError(f"keyframe interpolation needs portrait.models.interpolator.load_interpolator, which this checkout lacks ({e})") from None
    return load(spec, device=device).eval()


def generation_config(v: VariantConfig, model) -> tuple[GenerationConfig, int]:
    steps = v.steps if v.steps is not None else int(model.metadata.get("default_steps", 25))
    kw = dict(steps=steps, guidance=v.guidance, sampler=v.sampler, context_frames=v.context_frames,
              context_overlap=v.context_overlap, legacy_loop=v.legacy_loop, decode_batch_size=v.decode_batch_size)
    if parse_keyframes(v.keyframes)[0] != "none":
        fields = {f.name for f in dataclasses.fields(GenerationConfig)}
        if "keyframes" not in fields:
            raise VariantError(f"keyframes {v.keyframes!r} need GenerationConfig.keyframes in infer/pipeline.py, which this "
                               "checkout lacks (the interpolator issue adds it); refusing to run without keyframes")
        kw["keyframes"] = v.keyframes
    return GenerationConfig(**kw), steps


def load_runner(r: Runner, cfg: BenchConfig, device: torch.device) -> None:
    """Load (or build) the variant's model and pipeline; sets ``row['status']`` on failure instead of raising."""
    from portrait.models.bundle import ModelConfig, ModelFolderError, Pose2VideoModel
    from portrait.models.tiny_decoder import DecoderFolderError

    v = r.v
    dtype = L.DTYPES[v.dtype]
    t0 = time.perf_counter()
    if v.name in cfg.skip:
        r.row["status"] = "skipped: by config (skip)"
        return
    try:
        if v.model == "random":
            mcfg = config_lib.load(ModelConfig, cfg.model_config, v.model_overrides)
            model = Pose2VideoModel.from_config(mcfg, seed=cfg.seed).to(device, dtype).eval()
        else:
            if not Path(v.model, "fastportrait.json").is_file():
                r.row["status"] = f"skipped: model folder {v.model} not found (train or export it first)"
                return
            model = Pose2VideoModel.from_pretrained(v.model, device=device, dtype=dtype)
        if v.interpolator and v.interpolator != "blend" and not Path(v.interpolator).exists():
            r.row["status"] = f"skipped: interpolator folder {v.interpolator} not found"
            return
        if v.decoder and not Path(v.decoder).exists():
            r.row["status"] = f"skipped: decoder folder {v.decoder} not found (train one with `bash launch.sh decoder`)"
            return
        r.gen, steps = generation_config(v, model)
        r.pipe = Pose2VideoPipeline(model, decoder=v.decoder)
        if parse_keyframes(v.keyframes)[0] != "none":
            import inspect

            params = inspect.signature(Pose2VideoPipeline.__call__).parameters
            if "interpolator" not in params or "landmarks" not in params:
                raise VariantError("Pose2VideoPipeline.__call__ takes no interpolator/landmarks yet (infer/pipeline.py); cannot run keyframes")
            r.interpolator = load_interpolator(v.interpolator, device)
            r.call_kwargs["interpolator"] = r.interpolator
        r.row["config"].update(steps_resolved=steps, sampler_resolved=r.pipe.sampler_name(r.gen))
        r.row["weights_mb"] = L.parameter_mb(model)
        r.row["load_sec"] = time.perf_counter() - t0
        r.row["status"] = "ok"
    except (ModelFolderError, DecoderFolderError, config_lib.ConfigError) as e:
        r.row["status"] = f"error: {e}"
    except VariantError as e:
        r.row["status"] = f"error: {e}"
    except L.Unsupported as e:
        r.row["status"] = f"unsupported: {e}"


def call_kwargs(r: Runner, clip: Clip) -> dict:
    kw = dict(r.call_kwargs)
    if "interpolator" in kw and clip.landmarks is not None:
        kw["landmarks"] = clip.landmarks  # adaptive selection and the interpolator's flow prior read them
    return kw


def generate(r: Runner, clip: Clip) -> torch.Tensor:
    out = r.pipe(clip.ref, clip.pose, r.gen, torch.Generator().manual_seed(1000 + clip.index), **call_kwargs(r, clip))
    if len(r.keyframes) < clip.index + 1:
        r.keyframes.append(getattr(r.pipe, "last_keyframes", None))
    return out


def end_to_end(r: Runner, clip: Clip, tmp: Path, fps: float) -> tuple[torch.Tensor, float]:
    """Inputs -> written mp4, timed (synchronised on CUDA)."""
    from infer.io import write_video

    def run():
        frames = generate(r, clip)
        video = (frames.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        write_video(tmp / f"{r.v.name}_{clip.index}.mp4", video, fps)
        return frames

    return L.timed(run, r.pipe.model.device)


def count_runner(r: Runner, clip: Clip) -> None:
    """FLOPs per output frame by component and UNet frame-evaluations per frame (before quantise/compile)."""
    comps = L.component_modules(r.pipe.model, r.interpolator, r.pipe.decoder)

    def count(steps: int) -> dict:
        gen = dataclasses.replace(r.gen, steps=steps)
        return L.count_component_flops(lambda: r.pipe(clip.ref, clip.pose, gen, torch.Generator().manual_seed(1000 + clip.index),
                                                      **call_kwargs(r, clip)), comps, unet=r.pipe.model.denoising_unet)

    steps = r.gen.steps
    try:
        c = count(steps) if steps <= 2 else L.extrapolate_counts(count(1), count(2), steps)
    except Exception:  # noqa: BLE001  a sampler that cannot run 1 or 2 steps: count the real run
        c = count(steps)
    f = len(clip.pose)
    r.row["unet_evals_per_frame"] = c.pop("unet_frame_evals") / f
    r.row["flops_per_frame"] = {k: v / f for k, v in c.items() if k in L.COMPONENTS or k == "total"}


def keyframe_mask(r: Runner, clip: Clip) -> torch.Tensor | None:
    """Which frames of this clip were diffused (keyframes): the pipeline's ``last_keyframes`` if it records them,
    else every K-th frame plus the last for ``fixed:K``; None without keyframes."""
    kind, k = parse_keyframes(r.v.keyframes)
    if kind == "none":
        return None
    f = len(clip.pose)
    idx = r.keyframes[clip.index] if clip.index < len(r.keyframes) else None
    if idx is None and kind == "fixed":
        idx = sorted(set(range(0, f, int(k))) | {f - 1})
    if idx is None:
        return None
    mask = torch.zeros(f, dtype=torch.bool)
    mask[list(idx)] = True
    return mask


def quality(r: Runner, clips: list[Clip], teacher: Runner, probe, metrics: list[str]) -> None:
    from infer.metrics import video_metrics

    def mean(ms):
        return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]} if ms else {}

    per, kinds = [], {"keyframes": [], "inbetween": []}
    for c, out, ref in zip(clips, r.outputs, teacher.outputs):
        per.append(video_metrics(out, c.target, c.landmarks, probe=probe, teacher=ref))
        mask = keyframe_mask(r, c)
        if mask is not None and mask.any() and (~mask).any():
            kinds["keyframes"].append(video_metrics(out, c.target, c.landmarks, probe=probe, teacher=ref, frame_mask=mask))
            kinds["inbetween"].append(video_metrics(out, c.target, c.landmarks, probe=probe, teacher=ref, frame_mask=~mask))
    m = mean(per)
    r.row.update({k: m[k] for k in metrics if k in m})
    if kinds["keyframes"]:
        r.row["by_frame_type"] = {k: {n: x for n, x in mean(v).items() if n in metrics} for k, v in kinds.items()}


# -- main ---------------------------------------------------------------------------------------------------------
def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()} {os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()}), "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16); None where unknown (no /proc/cpuinfo).
    Without it oneDNN emulates bf16 and a bf16 row is several times *slower* than fp32 (BENCHMARKS.md)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags))


def main(cfg: BenchConfig, command: str = "") -> dict:
    # 1. setup
    validate(cfg)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    torch.set_flush_denormal(True)  # denormals slow CPU maths 10-100x (see portrait/training.py)
    metrics = [] if cfg.mode == "speed" else list(cfg.metrics or QUALITY_METRICS)
    resolution = 0
    if cfg.mode == "speed":
        from portrait.models.bundle import ModelConfig

        resolution = config_lib.load(ModelConfig, cfg.model_config).resolution
        if device.type == "cpu" and not cfg.allow_cpu:
            raise BenchError("speed-only mode measures full size on CUDA; no GPU here. To test it on CPU pass allow_cpu=true "
                             "with a tiny model_config (e.g. model_config=configs/model/tiny.yaml)")
        if device.type == "cpu" and resolution > 128:
            raise BenchError(f"speed-only mode on CPU is for tests: model_config {cfg.model_config} is {resolution}x{resolution}; "
                             "use a tiny one (<= 128) or a GPU")
    shipped = next(v for v in cfg.variants if v.name == cfg.shipped)
    if shipped.model != "random" and not Path(shipped.model, "fastportrait.json").is_file():
        raise BenchError(f"the 'as shipped' teacher row {cfg.shipped!r} needs its model folder {shipped.model}, which is missing "
                         "(bash launch.sh teacher, or override variants.N.model)")
    out_dir = Path(cfg.out_dir) / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    R.atomic_write_text(out_dir / "config.yaml", config_lib.dump(cfg))

    # 2. models and clips
    runners = [Runner(v, {"name": v.name, "model": v.model, "config": config_lib.to_dict(v), "status": "pending"}) for v in cfg.variants]
    if cfg.mode == "quality":
        from portrait.models.landmark_probe import load_probe

        clips = make_clips(cfg, 0)
        probe = load_probe() if "landmark_error" in metrics else None
    else:
        clips = make_clips(cfg, resolution)
    schedule = cfg.schedule if cfg.schedule != "auto" else ("sequential" if cfg.mode == "speed" else "interleaved")
    groups = [runners] if schedule == "interleaved" else [[r] for r in runners]
    total_frames = sum(len(c.pose) for c in clips)
    progress = tqdm(total=len(runners) * (cfg.repeats + cfg.warmup), desc="benchmark", unit="pass")

    # 3. measure: load -> count -> quantise/compile -> warm up -> interleaved timed passes
    with tempfile.TemporaryDirectory(prefix=".videos-", dir=out_dir) as tmp:
        for group in groups:
            for r in group:
                load_runner(r, cfg, device)
                if not r.ok:
                    tqdm.write(f"{r.v.name}: {r.row['status']}")
                    progress.total -= cfg.warmup + cfg.repeats
                    progress.refresh()
                    continue
                try:
                    if cfg.count_flops:
                        count_runner(r, clips[0])
                    L.prepare_variant_model(r.pipe.model, r.v.quantize, r.v.compile, r.pipe.decoder)
                    r.mem = L.PeakMemory(device)
                    t0 = time.perf_counter()
                    for _ in range(cfg.warmup):
                        with r.mem.measure():
                            end_to_end(r, clips[0], Path(tmp), cfg.fps)
                        progress.update(1)
                    r.row["warmup_sec"] = time.perf_counter() - t0
                except L.Unsupported as e:
                    r.row["status"] = f"unsupported: {e}"
                except Exception as e:  # noqa: BLE001  one broken variant must not cost the others' rows
                    r.row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if not r.ok:
                    tqdm.write(f"{r.v.name}: {r.row['status']}")
                    if r.v.name == cfg.shipped:
                        raise BenchError(f"the 'as shipped' teacher row {cfg.shipped!r} cannot run: {r.row['status']}")
            for rep in range(cfg.repeats):
                for r in group:
                    if not r.ok:
                        continue
                    if rep == 0:  # per-frame counters and keyframe indices of exactly one pass
                        r.keyframes = []
                        r.pipe.counters.update(dict.fromkeys(r.pipe.counters, 0))
                    secs, outs = 0.0, []
                    try:
                        with r.mem.measure():
                            for c in clips:
                                out, dt = end_to_end(r, c, Path(tmp), cfg.fps)
                                secs += dt
                                if rep == 0 and cfg.mode == "quality":
                                    outs.append(out.cpu())
                    except Exception as e:  # noqa: BLE001
                        r.row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        tqdm.write(f"{r.v.name}: {r.row['status']}")
                        continue
                    if rep == 0:
                        r.outputs = outs
                        r.row["counters_per_frame"] = {k: v / total_frames for k, v in r.pipe.counters.items()}
                    r.times.append(secs / total_frames)
                    progress.update(1)
            for r in group:  # free the models (full size: one at a time)
                if r.pipe is not None:
                    r.row["peak_mem_mb"] = r.mem.peak_mb if r.mem else None
                    r.pipe = None
                    r.interpolator = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    progress.close()

    # 4. speed columns
    by_name = {r.v.name: r for r in runners}
    if not by_name[cfg.shipped].ok:
        raise BenchError(f"the 'as shipped' teacher row {cfg.shipped!r} did not run: {by_name[cfg.shipped].row['status']}")
    fixed_ok = by_name[cfg.fixed].ok
    for r in runners:
        if r.ok:
            t = sorted(r.times)
            r.row.update(sec_per_frame=float(np.median(t)), sec_per_frame_min=t[0], sec_per_frame_max=t[-1], sec_per_frame_runs=r.times,
                         spread_pct=100 * (t[-1] - t[0]) / float(np.median(t)))
            r.row["fps"] = 1.0 / r.row["sec_per_frame"]
    for r in runners:
        if r.ok:
            r.row["speedup_vs_shipped"] = by_name[cfg.shipped].row["sec_per_frame"] / r.row["sec_per_frame"]
            r.row["speedup_vs_fixed"] = by_name[cfg.fixed].row["sec_per_frame"] / r.row["sec_per_frame"] if fixed_ok else None

    # 5. quality
    if cfg.mode == "quality":
        for r in runners:
            if r.ok:
                quality(r, clips, by_name[cfg.shipped], probe, metrics)

    # 6. report
    report = {
        "name": cfg.name, "mode": cfg.mode, "machine": machine(device), "device": str(device), "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": command, "schedule": schedule,
        "clips": len(clips), "frames_per_clip": cfg.frames, "protocol": cfg.protocol if cfg.mode == "quality" else None,
        "split": cfg.split if cfg.mode == "quality" else None, "shipped": cfg.shipped, "fixed": cfg.fixed,
        "config": config_lib.to_dict(cfg), "variants": [r.row for r in runners], "notes": notes(cfg, device, schedule),
    }
    report["summary"] = (f"{len(clips)} clip(s) x {cfg.frames} frames, {cfg.repeats} timed passes after {cfg.warmup} warm-up "
                         f"({schedule}), on {report['machine']}; {report['date']}.")
    if cfg.mode == "quality":
        budget = {k: v for k, v in config_lib.to_dict(cfg.budget).items() if k != "reference"}
        ref = cfg.budget.reference or (cfg.fixed if fixed_ok else cfg.shipped)
        report["pick"] = R.pick(report, budget, ref)
        picked = next((r.row for r in runners if r.v.name == report["pick"]["name"]), None)
        flops = {k: v for k, v in ((picked or {}).get("flops_per_frame") or {}).items() if k != "total"}
        if flops and sum(flops.values()) > 0:  # where the next speed work goes
            top = max(flops, key=flops.get)
            report["pick"]["dominant_component"] = {"name": top, "share": flops[top] / sum(flops.values())}
    write_report(report, out_dir, cfg, runners, clips)
    bad = [r for r in runners if r.row["status"].startswith("error")]
    print(R.to_markdown(report))
    print(f"report: {out_dir / 'report.json'}\ntable:  {out_dir / 'report.md'}")
    for name in ("pareto.png", "side_by_side.mp4", "side_by_side.gif"):
        if (out_dir / name).is_file():
            print(f"{name.split('.')[0].replace('_', '-')}: {out_dir / name}")
    if bad:
        print(f"error: {len(bad)} variant(s) failed: " + "; ".join(f"{r.v.name}: {r.row['status']}" for r in bad), file=sys.stderr)
    return report


def notes(cfg: BenchConfig, device: torch.device, schedule: str) -> list[str]:
    n = ["sec_per_frame: inputs (decoded reference + pose frames) -> written h264 mp4, model loading excluded (load_sec); "
         "median of the timed passes, min-max beside it.",
         "flops_per_frame: counted with torch.utils.flop_counter (portrait.flops registers CPU SDPA), per output frame, "
         "counted before quantisation/compilation (int8 rows do the same multiply-adds); extrapolated from 1- and 2-step runs.",
         "unet_evals_per_frame: denoising-UNet frame evaluations per output frame (CFG halves count twice, overlapping windows add)."]
    if device.type == "cpu":
        n.append("peak_mem_mb: peak process RSS during the variant's passes" +
                 (" (interleaved: every variant's weights are resident; weights_mb gives each one's own)." if schedule == "interleaved" else "."))
    else:
        n.append("peak_mem_mb: torch.cuda.max_memory_allocated during the variant's passes.")
    if device.type == "cpu" and any(v.dtype == "bf16" and v.name not in cfg.skip for v in cfg.variants) and cpu_has_native_bf16() is False:
        n.append("bf16 rows: this CPU has no bf16 arithmetic (no avx512_bf16 / amx_bf16 flag), so bf16 is emulated and "
                 "slower than fp32 here; on a GPU or a CPU with AMX it is the fast path.")
    if cfg.mode == "speed":
        n.append("Speed-only mode: random weights. Timing does not depend on the weights (same shapes, same kernels), "
                 "so no quality is reported.")
    else:
        n.append("psnr_teacher: against the shipped teacher's output on the same noise (identical output = 100 dB cap).")
    return n


def write_report(report: dict, out_dir: Path, cfg: BenchConfig, runners: list[Runner], clips: list[Clip]) -> None:
    R.atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    R.atomic_write_text(out_dir / "report.md", R.to_markdown(report))
    if cfg.mode != "quality":
        return
    R.plot_pareto(report, out_dir / "pareto.png")
    by_name = {r.v.name: r for r in runners}

    def u8(x: torch.Tensor) -> np.ndarray:
        return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)

    cols = [("ground truth", u8(clips[0].target)), ("teacher", u8(by_name[cfg.shipped].outputs[0]))]
    cols += [(n, u8(by_name[n].outputs[0])) for n in R.video_columns(report, cfg.video_variants)]
    R.write_side_by_side(out_dir, cols, cfg.fps)


def load_config(path: str | None, overrides: list[str]) -> BenchConfig:
    """``config_lib.load`` plus overrides that index the variant list (``variants.3.dtype=bf16``), which a plain
    dotlist merge cannot express."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    indexed = [o for o in overrides if any(part.isdigit() for part in o.split("=", 1)[0].split("."))]
    cfg = config_lib.load(BenchConfig, path, [o for o in overrides if o not in indexed])
    if not indexed:
        return cfg
    oc = OmegaConf.structured(cfg)
    for item in indexed:
        key, value = item.split("=", 1)
        if OmegaConf.select(oc, key, default="__missing__") == "__missing__":
            raise config_lib.ConfigError(f"unknown config key '{key}' in command-line override '{item}'")
        try:
            OmegaConf.update(oc, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
        except OmegaConfBaseException as e:
            raise config_lib.ConfigError(f"invalid value in command-line override '{item}': {str(e).splitlines()[0]}") from None
    return OmegaConf.to_object(oc)


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infer.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML under configs/bench/ (default: the schema's embedded default)")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--readme", metavar="REPORT_MD", default=None, help="regenerate README.md's Results section from this report.md")
    ap.add_argument("--readme-file", default="README.md", help="the README to rewrite (with --readme)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. clips=2 variants.0.model=runs/teacher/tiny_v0/model")
    args = ap.parse_args(argv)
    try:
        if args.readme:
            R.readme_section(Path(args.readme), Path(args.readme_file))
            print(f"updated the Results section of {args.readme_file} from {args.readme}")
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            validate(cfg)
            print(config_lib.dump(cfg))
            return 0
        print(config_lib.dump(cfg))
        report = main(cfg, command="python -m infer.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]))
    except (BenchError, config_lib.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if any(v["status"].startswith("error") for v in report["variants"]) else 0


if __name__ == "__main__":
    raise SystemExit(cli())
