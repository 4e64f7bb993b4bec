"""FLOP/MAC counting with ``torch.utils.flop_counter``, scaled-dot-product attention included on every device.

torch's counter has formulas for the CUDA SDPA kernels (flash, efficient, cuDNN) but not for the CPU flash kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``), so on CPU every attention layer counts as 0 FLOPs. Importing
this module registers that formula (same maths as the CUDA kernels: ``QK^T`` plus ``PV``). All counting in the
project (pruning cards, the benchmark) goes through :func:`count_flops`.

    from portrait.flops import count_flops
    n = count_flops(lambda: unet(x, t, enc).sample)       # total FLOPs of one call
    n.total, n.macs, n.by_module["down_blocks.0"]

FLOPs here follow torch's convention: one multiply-add = 2 FLOPs, so ``macs = flops / 2``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

_REGISTERED = False


def register_cpu_sdpa() -> None:
    """Register the CPU flash-attention kernels with torch's flop counter (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fwd is not None:
        @register_flop_formula(fwd)
        def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
            return sdpa_flop_count(query, key, value)

    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if bwd is not None:
        @register_flop_formula(bwd)
        def _cpu_sdpa_bwd_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
            return sdpa_backward_flop_count(grad_out, query, key, value)

    _REGISTERED = True


register_cpu_sdpa()


@dataclass
class FlopCount:
    """FLOPs of one call: ``total``, per module path (``by_module``, torch's hierarchy) and per op (``by_op``)."""

    total: int
    by_module: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)
    result: Any = None

    @property
    def macs(self) -> float:
        return self.total / 2


def count_flops(fn: Callable[[], Any], module: torch.nn.Module | None = None) -> FlopCount:
    """Run ``fn()`` under a FlopCounterMode (no grad) and return its counted FLOPs.

    With ``module`` the per-module breakdown uses that module's child names (e.g. ``down_blocks.0``).
    """
    mode = FlopCounterMode(module, display=False) if module is not None else FlopCounterMode(display=False)
    with torch.no_grad(), mode:
        result = fn()
    counts = mode.get_flop_counts()
    by_module: dict[str, int] = {}
    by_op: dict[str, int] = {}
    for name, ops in counts.items():
        total = int(sum(ops.values()))
        by_module[name] = total
        if name == "Global":
            by_op = {str(k): int(v) for k, v in ops.items()}
    return FlopCount(total=int(mode.get_total_flops()), by_module=by_module, by_op=by_op, result=result)
