from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from u2seg.config import ConfigError, PipelineConfig, depends_on, load_config, to_dict

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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.shard_size=-1", r"data\.shard_size=-1: must be >= 1"),
        ("data.shard_size=0", r"data\.shard_size=0: must be >= 1"),
        ("maskcut.batch_size=0", r"maskcut\.batch_size=0: must be >= 1"),
        ("features.concurrency=0", r"features\.concurrency=0"),
        ("embed.image_size=-5", r"embed\.image_size=-5"),
        ("cluster.k=0", r"cluster\.k=0"),
        ("semantic.num_classes=300", r"semantic\.num_classes=300: must be in \[1, 254\]"),
        ("semantic.stego_batch_size=1", r"semantic\.stego_batch_size=1: must be >= 2"),
        ("panoptic.stuff_overlap=1.5", r"panoptic\.stuff_overlap=1\.5"),
        ("evaluate.chunk_size=0", r"evaluate\.chunk_size=0"),
        ("evaluate.min_iou=-0.1", r"evaluate\.min_iou=-0\.1"),
        ("data.read_num_cpus=0", r"data\.read_num_cpus=0\.0: must be > 0"),
    ],
)
def test_sizes_counts_and_fractions_out_of_range_are_refused_by_name(
    override: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "demo.yaml", [override])


def test_optional_limits_accept_none_and_values_inside() -> None:
    cfg = load_config(None, ["maskcut.max_concurrency=4", "maskcut.tau_quantile=0.5"])
    assert cfg.maskcut.max_concurrency == 4 and cfg.features.max_concurrency is None


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("data:\n  source: [x\n", [], r"not valid YAML \(line 3\): did not find expected"),
        ("maskcut: [1, 2]\n", [], r"bad key 'maskcut': expected a section of keys, got \[1, 2\]"),
        ("", ["evaluate.predictions=maskcut"], r"'evaluate\.predictions': expected a list: write"),
        ("", ["maskcut=3"], r"bad key 'maskcut': expected a section of keys, got 3"),
    ],
)
def test_malformed_config_gets_one_line_naming_the_key(
    tmp_path: Path, text: str, overrides: list[str], message: str
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text or "name: x\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_secrets_read_from_the_environment_never_reach_a_saved_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from u2seg.artifacts import StageDir

    monkeypatch.setenv("BUCKET_PASS", "hunter2-very-secret")
    monkeypatch.setenv("MY_API_TOKEN", "tok-123456")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data:\n  source: s3://bucket/${oc.env:BUCKET_PASS}/photos\n")
    cfg = load_config(yaml_file, ["name=${oc.env:MY_API_TOKEN}"])
    assert cfg.data.source == "s3://bucket/hunter2-very-secret/photos"  # resolved for use
    stage = StageDir(str(tmp_path / "run"), "features")
    stage.start(to_dict(cfg), depends_on(cfg, ["data"]))
    stage.start(to_dict(cfg), depends_on(cfg, ["data"]))  # a resume compares alike
    stage.write_table(stage.shard_name(0), pa.table({"image_id": [1]}))
    stage.start(to_dict(cfg), depends_on(cfg, ["data"]))
    manifest = stage.finish({}, pa.table({"image_id": pa.array([], pa.int64())}))
    for name in ("config.json", "manifest.json"):
        text = (tmp_path / "run" / "features" / name).read_text()
        assert "hunter2" not in text and "tok-123456" not in text
        assert "s3://bucket/${oc.env:BUCKET_PASS}/photos" in text
    assert manifest["config"]["name"] == "${oc.env:MY_API_TOKEN}"
    # A short value is no secret, even under a secret's name: "tokens" stays a word.
    monkeypatch.setenv("SHORT_KEY", "token")
    stage.write_json("x.json", {"feature": "tokens"})
    assert stage.read_json("x.json") == {"feature": "tokens"}
