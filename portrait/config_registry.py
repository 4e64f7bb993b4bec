"""Which schema each ``configs/<group>/`` folder's YAML files follow (used by tests and ``--dry-run`` tools).

Each job registers its schema here when it lands, so that every YAML under ``configs/`` is validated.
"""

from __future__ import annotations

from portrait.models.bundle import ModelConfig

SCHEMAS: dict[str, type] = {"model": ModelConfig}
