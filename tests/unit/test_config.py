"""Config system: every YAML validates; unknown keys and wrong types are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from portrait import config as config_lib
from portrait.config import ConfigError
from portrait.models.bundle import ModelConfig, validate_model_config

REPO = Path(__file__).resolve().parents[2]


def schemas():
    """configs/<dir>/ -> the schema its YAML files must satisfy."""
    from portrait.config_registry import SCHEMAS

    return SCHEMAS


def test_every_yaml_under_configs_validates():
    import yaml

    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) > 0
    checked = 0
    for f in files:
        group = f.relative_to(REPO / "configs").parts[0]
        if group == "accelerate":
            data = yaml.safe_load(f.read_text())
            assert isinstance(data, dict) and ("distributed_type" in data or "compute_environment" in data), f
            checked += 1
            continue
        schema = schemas()[group]
        cfg = config_lib.load(schema, f)
        if isinstance(cfg, ModelConfig):
            validate_model_config(cfg)
        checked += 1
    assert checked == len(files)


@pytest.mark.parametrize("group", ["teacher", "distill", "interpolator", "prune"])
def test_running_a_train_script_without_config_is_its_tiny_yaml(group):
    """Each tiny YAML says it equals running the script with no --config: keep the two from drifting."""
    schema = schemas()[group]
    name = {"distill": "tiny_4step", "interpolator": "tiny_fast"}.get(group, "tiny")  # the CPU default of each script
    path = REPO / "configs" / group / f"{name}.yaml"
    from_yaml = config_lib.to_dict(config_lib.load(schema, path))
    defaults = config_lib.to_dict(schema())
    diff = {k: (defaults.get(k), v) for k, v in from_yaml.items() if defaults.get(k) != v}
    assert not diff, f"{path.name} differs from {schema.__name__}() defaults (default, yaml): {diff}"


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("name: x\nresolutoin: 64\n")
    with pytest.raises(ConfigError, match="resolutoin"):
        config_lib.load(ModelConfig, p)
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        config_lib.load(ModelConfig, None, ["nope=1"])


def test_wrong_type_is_named(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("resolution: sixty-four\n")
    with pytest.raises(ConfigError, match="resolution"):
        config_lib.load(ModelConfig, p)


def test_overrides_and_dump_round_trip():
    cfg = config_lib.load(ModelConfig, REPO / "configs/model/tiny.yaml", ["resolution=128", "pose_guider.mode=clean"])
    assert cfg.resolution == 128 and cfg.pose_guider["mode"] == "clean"
    again = config_lib.from_dict(ModelConfig, config_lib.to_dict(cfg))
    assert again == cfg
    assert "resolution: 128" in config_lib.dump(cfg)


def test_unknown_component_key_is_named():
    cfg = ModelConfig(unet={"block_out_chanels": [1]})  # component dicts are checked against the class signature
    with pytest.raises(ConfigError, match="block_out_chanels"):
        validate_model_config(cfg)


def test_build_cli_rejects_unknown_key(tmp_path):
    from portrait.models import build

    assert build.main(["--out", str(tmp_path / "m"), "resolutoin=64"]) == 2
    assert not (tmp_path / "m").exists()
