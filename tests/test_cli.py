from __future__ import annotations

import json
from pathlib import Path

import pytest

from u2seg.cli import build_parser, main


@pytest.mark.parametrize("command", ["features", "run", "demo", "train", "predict", "evaluate"])
def test_help_explains_inputs_and_outputs(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "key=value" in text and "--config" in text
    if command == "features":
        assert "in:" in text and "out:" in text and "errors.parquet" in text
    if command == "evaluate":
        assert "evaluate.gt_format=coco" in text and "metrics.json" in text
    if command == "train":
        assert "train.strategy=deepspeed" in text and "model.pt" in text
    if command == "predict":
        assert "instances.json" in text and "panoptic.json" in text


def test_every_subcommand_is_listed() -> None:
    text = build_parser().format_help()
    for command in ("features", "run", "demo", "train", "predict", "evaluate"):
        assert command in text


def test_print_config_applies_overrides(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("features:\n  batch_size: 3\n")
    assert main(["features", "--config", str(path), "--print-config", "data.source=/x"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["features"]["batch_size"] == 3
    assert cfg["data"]["source"] == "/x"


def test_bad_key_exits_2_and_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["features", "features.batch_sise=3"]) == 2
    assert "features.batch_sise" in capsys.readouterr().err


def test_missing_source_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["features", f"output={tmp_path}"]) == 2
    assert "data.source" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ray
def test_demo_end_to_end(
    tmp_path: Path, weights_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", f"output={out}", f"backbone.cache_dir={weights_cache}"]) == 0
    manifest = json.loads((out / "features" / "manifest.json").read_text())
    assert manifest["counts"]["ok"] == manifest["counts"]["images"] >= 8
    assert manifest["config"]["backbone"]["weights"] == "packaged"
    assert (out / "data" / "annotations" / "instances.json").is_file()
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())["predictions"]
    assert set(metrics) == {"maskcut", "semantic", "panoptic", "predict", "self-train"}
    for name in ("predict", "self-train"):
        assert {"class_agnostic", "instance", "semantic", "panoptic"} <= set(metrics[name])
    rounds = json.loads((out / "self-train" / "manifest.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1] and rounds[0]["train"]["steps"] == 10
    assert rounds[0]["from"] == f"file://{out / 'train' / 'model.pt'}"
    train = json.loads((out / "train" / "manifest.json").read_text())
    assert train["training"]["deepspeed"] and train["training"]["zero_stage"] == 2
    assert train["training"]["world_size"] == 2 and train["training"]["ranks_agree"]
    assert [e["step"] for e in train["curve"]] == list(range(5, 41, 5))
    assert (out / "visualize" / "predict" / "sheet.png").is_file()
    assert {"class_agnostic", "instance", "semantic", "panoptic"} <= set(metrics["panoptic"])
    assert metrics["maskcut"]["images"]["scored"] == 3  # the photos with ground truth
    printed = capsys.readouterr().out
    assert "[features]" in printed and "[evaluate]" in printed
    assert "| predictions | PQ |" in printed


def test_run_until_stops_after_the_named_stage(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(["run", "--until", "panoptic"]).until == "panoptic"
    assert build_parser().parse_args(["run"]).until == "self-train"  # every stage
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--until", "evaluat"])
    assert "invalid choice: 'evaluat'" in capsys.readouterr().err
