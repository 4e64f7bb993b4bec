"""Which schema each ``configs/<group>/`` folder's YAML files follow (used by tests and ``--dry-run`` tools).

Each job registers its schema here when it lands, so that every YAML under ``configs/`` is validated.
Schemas of ``train/`` scripts are imported lazily (train/ is not a package that libraries import).
"""

from __future__ import annotations

import importlib

from portrait.models.bundle import ModelConfig
from portrait.training import DataConfig


def _lazy(module: str, name: str) -> type:
    return getattr(importlib.import_module(module), name)


class _Schemas(dict):
    _LAZY = {"teacher": ("train.teacher", "TeacherConfig"), "distill": ("train.distill", "DistillConfig"), "interpolator": ("train.interpolator", "InterpolatorTrainConfig"), "bench": ("infer.benchmark", "BenchConfig"), "prune": ("train.prune", "PruneConfig"), "decoder": ("train.decoder", "DecoderTrainConfig")}

    def __missing__(self, key):
        if key in self._LAZY:
            value = _lazy(*self._LAZY[key])
            self[key] = value
            return value
        raise KeyError(f"no schema registered for configs/{key}/")


SCHEMAS: dict[str, type] = _Schemas(model=ModelConfig, data=DataConfig)
