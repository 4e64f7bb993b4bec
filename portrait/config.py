"""Typed configs: a YAML file merged onto a dataclass schema, then ``key=value`` overrides (DESIGN §3.2).

    cfg = load(TeacherConfig, "configs/teacher/tiny_stage2.yaml", ["train.lr=1e-4"])

* Unknown keys are errors that name the key and the file (nanoGPT-style strictness).
* Types are checked by OmegaConf against the schema (``train.lr=abc`` is an error).
* ``dump(cfg)`` gives the resolved YAML that is printed, saved in the run folder and embedded in exports.

Every script's command line is ``--config PATH [key=value ...] [--dry-run]`` (:func:`parse_cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the source."""


def _merge(base, other, source: str):
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", None) or str(e).splitlines()[0]
        raise ConfigError(f"unknown config key '{key}' in {source}. Check the spelling against the schema (run with --dry-run to print the valid config).") from None
    except ValidationError as e:
        key = getattr(e, "full_key", "?")
        msg = str(e).splitlines()[0]
        raise ConfigError(f"invalid value for config key '{key}' in {source}: {msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config in {source}: {str(e).splitlines()[0]}") from None


def load(schema: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load ``schema`` defaults, merge the YAML at ``path`` and the ``key=value`` overrides; return a dataclass."""
    cfg = OmegaConf.structured(schema)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            file_cfg = OmegaConf.load(p)
        except Exception as e:  # YAML syntax errors
            raise ConfigError(f"cannot parse config file {p}: {e}") from None
        if file_cfg is None or not OmegaConf.is_dict(file_cfg):
            raise ConfigError(f"config file {p} must hold a mapping of keys to values")
        cfg = _merge(cfg, file_cfg, str(p))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key = item.split("=", 1)[0]
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"unknown config key '{key}' in command-line override '{item}'")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"command-line override '{item}'")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"incomplete config: {str(e).splitlines()[0]}") from None


def dump(cfg: Any) -> str:
    """Resolved YAML text of a config dataclass."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(schema: type[T], data: dict, source: str = "embedded config") -> T:
    cfg = _merge(OmegaConf.structured(schema), OmegaConf.create(data), source)
    return OmegaConf.to_object(cfg)


def parse_cli(schema: type[T], argv: list[str] | None = None, description: str = "", default_config: str | None = None) -> tuple[T, bool]:
    """Parse ``--config PATH [key=value ...] [--dry-run]``; print the resolved config.

    With no ``--config`` the schema defaults (the embedded tiny CPU default) are used, unless
    ``default_config`` names a file. Exits with a one-line error on a bad config (no traceback soup).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="YAML config merged onto the schema defaults")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)
    try:
        cfg = load(schema, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg, args.dry_run


def run_script(schema: type[T], main, description: str, errors: tuple[type[BaseException], ...] = ()) -> int:
    """The ``__main__`` of every ``train/`` script: parse, honour ``--dry-run``, run, and turn the expected
    failures (bad config, NaN loss, missing inputs, ...) into one ``error:`` line and exit code 1."""
    cfg, dry = parse_cli(schema, description=description)
    if dry:
        print(dump(cfg))
        return 0
    try:
        main(cfg)
    except (ConfigError, *errors) as e:
        _close_progress_bars()  # so the error starts its own line instead of trailing a half-drawn bar
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _close_progress_bars() -> None:
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # cosmetic only
        pass


def replace(cfg: T, **changes) -> T:
    return dataclasses.replace(cfg, **changes)
