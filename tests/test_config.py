from __future__ import annotations

from pathlib import Path

import pytest

from u2seg.config import ConfigError, PipelineConfig, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_paper_scale() -> None:
    cfg = load_config()
    assert cfg == PipelineConfig()
    assert cfg.backbone.name == "dino_vitb8"
    assert cfg.features.image_size == 480
    assert cfg.output_dir == "runs/u2seg"


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nfeatures:\n  batch_size: 3\n  image_size: 224\n")
    cfg = load_config(path, ["features.batch_size=5", "data.source=/imgs", "output=o"])
    assert cfg.name == "x"
    assert cfg.features.batch_size == 5  # override wins over YAML
    assert cfg.features.image_size == 224  # YAML wins over default
    assert cfg.data.source == "/imgs"
    assert cfg.output_dir == "o"


def test_unknown_key_in_yaml_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("features:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"features\.batch_sise"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.sorce=/x", r"data\.sorce"),
        ("features.batch_size=many", r"features\.batch_size"),
        ("ray.progress_bars=maybe", r"ray\.progress_bars"),
        ("nonsense.key=1", r"nonsense"),
    ],
)
def test_bad_override_is_named(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[override])


def test_override_needs_equals_and_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["features.batch_size"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.features.batch_size = 2  # type: ignore[misc]


@pytest.mark.parametrize("name", ["demo", "coco", "imagenet", "cityscapes"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.name == name
    assert to_dict(cfg)["backbone"]["name"] == cfg.backbone.name
