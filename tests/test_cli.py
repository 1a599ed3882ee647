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


def test_run_until_stops_after_the_named_stage(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(["run", "--until", "panoptic"]).until == "panoptic"
    assert build_parser().parse_args(["run"]).until == "self-train"  # every stage
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--until", "evaluat"])
    assert "invalid choice: 'evaluat'" in capsys.readouterr().err
