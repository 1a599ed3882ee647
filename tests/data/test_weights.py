"""The model file: round trip, and refusal by name of cut, foreign and mismatched files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from u2seg.artifacts import StageDir
from u2seg.data.weights import ModelFileError, check_state_dict, read_model_file, write_model_file


def _state() -> dict[str, torch.Tensor]:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).state_dict()


def test_round_trip_keeps_weights_and_meta(tmp_path: Path) -> None:
    stage = StageDir(str(tmp_path), "train")
    write_model_file(stage, "model.pt", _state(), {"num_things": 5, "backbone": "vit"})
    state, meta = read_model_file(stage.file("model.pt"))
    assert meta == {"num_things": 5, "backbone": "vit"}
    check_state_dict(state, _state(), "model.pt")
    assert not list((tmp_path / "train").glob(".tmp-*"))


def test_cut_foreign_and_mismatched_files_are_refused_by_name(tmp_path: Path) -> None:
    stage = StageDir(str(tmp_path), "train")
    write_model_file(stage, "model.pt", _state(), {})
    whole = (tmp_path / "train" / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelFileError, match=r"cut\.pt: not a complete weights-only"):
        read_model_file(str(tmp_path / "cut.pt"))
    # A pickle of an arbitrary object is never run: weights_only refuses it.
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Path("/"), protocol=2))
    with pytest.raises(ModelFileError, match=r"evil\.pt: not a complete weights-only"):
        read_model_file(str(tmp_path / "evil.pt"))
    torch.save({"weights": _state()}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match=r"other\.pt: format None, expected"):
        read_model_file(str(tmp_path / "other.pt"))
    wider = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 2)).state_dict()
    with pytest.raises(
        ModelFileError, match=r"m\.pt holds another architecture: .*0\.weight \(8, 3\) != \(4, 3\)"
    ):
        check_state_dict(wider, _state(), "m.pt")
    with pytest.raises(ModelFileError, match=r"not found: .*nothing\.pt"):
        read_model_file(str(tmp_path / "nothing.pt"))
