"""Measurement helpers of the end-to-end benchmark (``python -m infer.benchmark``).

* :func:`prepare_variant_model`: dtype, int8 dynamic quantisation (torchao) and ``torch.compile`` applied to a
  loaded :class:`Pose2VideoModel`; what the platform cannot do raises :class:`Unsupported` (a row status).
* :class:`PeakMemory`: peak RSS on CPU (a sampling thread, since ``ru_maxrss`` never resets) or
  ``max_memory_allocated`` on CUDA, over a block of code.
* :func:`count_component_flops`: counted FLOPs of one generation split by component (reference UNet, pose
  guider, denoising UNet, VAE decode, interpolator, other) with ``portrait.flops`` (CPU SDPA counted), plus the
  number of denoising-UNet frame evaluations. The split uses forward hooks on the component modules that read
  the counter's running total, so it does not depend on class names or on how the pipeline calls them.
* :func:`extrapolate_counts`: counts at ``steps`` from counts at 1 and 2 steps. Every sampler repeats the same
  work per step, so each count is ``a + b * steps``; counting 2 short runs instead of one long one keeps the
  counting pass cheap at full size (checked against a direct count in the tests).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

import portrait.flops  # noqa: F401  (registers the CPU SDPA formula with torch's flop counter)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZE = ("none", "int8_dynamic")
COMPONENTS = ("reference_unet", "pose_guider", "denoising_unet", "vae_decode", "interpolator", "other")


class Unsupported(RuntimeError):
    """The platform (or the pipeline, or an optional dependency) cannot run this variant; the row says why."""


# -- model preparation ---------------------------------------------------------------------------------
def quantize_int8_dynamic(model: torch.nn.Module) -> None:
    """int8 dynamic activation + int8 weight quantisation of every ``nn.Linear`` (torchao ``quantize_``), in place.

    Raises :class:`Unsupported` when torchao is missing (``pip install 'fastportrait[int8]'``) or refuses the model.
    """
    try:
        from torchao.quantization import quantize_
    except ImportError as e:
        raise Unsupported(f"torchao is not installed ({e}); pip install 'fastportrait[int8]'") from None
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        qcfg = Int8DynamicActivationInt8WeightConfig()
    except ImportError:  # torchao < 0.9 spelled it as a function
        from torchao.quantization import int8_dynamic_activation_int8_weight

        qcfg = int8_dynamic_activation_int8_weight()
    try:
        quantize_(model, qcfg)
    except Exception as e:  # noqa: BLE001  (any failure here is a platform limitation, reported as a row status)
        raise Unsupported(f"torchao int8 dynamic quantisation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def prepare_variant_model(model, quantize: str = "none", compile: bool = False, decoder: torch.nn.Module | None = None) -> None:
    """Apply the variant's quantisation and compilation to ``model`` in place (dtype is set at load).

    ``torch.compile`` wraps the denoising UNet and the VAE decoder (in place, ``nn.Module.compile``, so the
    bundle's hooks and attention processors stay attached), or the tiny ``decoder`` that replaces it;
    compilation itself happens in the warm-up.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}; choose from {QUANTIZE}")
    if quantize == "int8_dynamic":
        quantize_int8_dynamic(model)
    if compile:
        if not hasattr(torch, "compile"):
            raise Unsupported("this torch has no torch.compile")
        model.denoising_unet.compile()
        (decoder.decoder if decoder is not None else model.vae.decoder).compile()


def parameter_mb(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


# -- memory ----------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory (MiB) over ``with`` blocks: process RSS sampled every ``interval`` s on CPU, or
    ``torch.cuda.max_memory_allocated`` on CUDA (reset at entry). ``peak_mb`` is the max over all blocks."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mb = 0.0

    @contextmanager
    def measure(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                yield self
            finally:
                torch.cuda.synchronize(self.device)
                self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated(self.device) / 2**20)
            return
        import psutil

        proc = psutil.Process(os.getpid())
        stop = threading.Event()
        peak = [proc.memory_info().rss]

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                stop.wait(self.interval)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            yield self
        finally:
            stop.set()
            th.join()
            peak[0] = max(peak[0], proc.memory_info().rss)
            self.peak_mb = max(self.peak_mb, peak[0] / 2**20)


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


# -- FLOPs -----------------------------------------------------------------------------------------------
def component_modules(model, interpolator: torch.nn.Module | None = None,
                      decoder: torch.nn.Module | None = None) -> dict[str, list[torch.nn.Module]]:
    """Component name -> the modules whose forward calls are that component's work (``decoder``: a tiny decoder
    that replaces the KL VAE's, counted as ``vae_decode``)."""
    comps = {
        "reference_unet": [model.reference_unet],
        "pose_guider": [model.pose_guider],
        "denoising_unet": [model.denoising_unet],
        "vae_decode": [decoder.decoder] if decoder is not None else [model.vae.decoder, model.vae.post_quant_conv],
    }
    if interpolator is not None:
        comps["interpolator"] = [interpolator]
    return {k: [m for m in v if m is not None] for k, v in comps.items()}


def count_component_flops(fn: Callable[[], object], components: dict[str, list[torch.nn.Module]],
                          unet: torch.nn.Module | None = None) -> dict[str, float]:
    """FLOPs of ``fn()`` by component, plus ``total`` and ``unet_frame_evals``.

    Each component's share is the growth of the counter's total between entry and exit of its outermost
    forward call; what no component claims (image encoder, VAE encode, CFG arithmetic, scheduler) is "other".
    ``unet_frame_evals`` sums batch x frames of every ``unet`` call ((B, C, F, h, w) samples).
    """
    mode = FlopCounterMode(display=False)
    totals = dict.fromkeys(COMPONENTS, 0)
    depth = {"active": None, "start": 0}
    frame_evals = [0]
    handles = []

    def pre(name):
        def hook(module, args):
            if depth["active"] is None:
                depth["active"] = (name, module)
                depth["start"] = mode.get_total_flops()
        return hook

    def post(name):
        def hook(module, args, output):
            if depth["active"] is not None and depth["active"][1] is module:
                totals[name] += mode.get_total_flops() - depth["start"]
                depth["active"] = None
        return hook

    for name, mods in components.items():
        for m in mods:
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
    if unet is not None:
        def count_frames(module, args, kwargs):
            x = args[0] if args else kwargs.get("sample")
            frame_evals[0] += int(x.shape[0] * x.shape[2]) if x.dim() == 5 else int(x.shape[0])
        handles.append(unet.register_forward_pre_hook(count_frames, with_kwargs=True))
    try:
        with torch.no_grad(), mode:
            fn()
    finally:
        for h in handles:
            h.remove()
    total = mode.get_total_flops()
    totals["other"] = total - sum(v for k, v in totals.items() if k != "other")
    out = {k: float(v) for k, v in totals.items()}
    out["total"] = float(total)
    out["unet_frame_evals"] = float(frame_evals[0])
    return out


def extrapolate_counts(c1: dict[str, float], c2: dict[str, float], steps: int) -> dict[str, float]:
    """Counts at ``steps`` from counts at 1 and 2 steps, each count being ``a + b * steps``."""
    return {k: c1[k] + (steps - 1) * (c2[k] - c1[k]) for k in c1}
