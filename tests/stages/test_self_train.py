"""`u2seg self-train` on tiny data: two rounds, each from the previous round's weights, new
labels from kept predictions plus old masks added back, and the final predictions that
`evaluate` scores as the set `self-train`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import u2seg
from tests.trainset import train_config, write_trainset
from u2seg.config import ConfigError
from u2seg.data.coco import mask_to_annotation
from u2seg.data.weights import read_model_file
from u2seg.stages._panoptic_model import build_from_spec
from u2seg.stages.self_train import relabel_image

pytestmark = [pytest.mark.slow, pytest.mark.ray]
LOCAL = ["train.strategy=local", "train.max_iter=2", "train.ims_per_batch=2", "train.base_lr=0.02",
         "predict.short_side=128", "predict.max_side=128", "predict.batch_size=2",
         "predict.concurrency=1", "predict.num_cpus=0.5"]  # fmt: skip


ROUNDS = ["self_train.max_iter=2", "self_train.base_lr=1e-12", "self_train.score_thresh=[0.0]",
          "self_train.detections_per_image=5"]  # fmt: skip


def _summary(r: dict) -> tuple:
    """What a round made (its counts of reused shards aside)."""
    return r["round"], r["from"], r["labels"]["instances"], r["train"]["steps"], r["loss"]


def _parameters(path: Path) -> dict[str, torch.Tensor]:
    state, meta = read_model_file(str(path))
    model = build_from_spec(meta["spec"], torch.device("cpu"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def test_two_rounds_each_start_from_the_previous_weights(tmp_path: Path) -> None:
    photos, run = write_trainset(tmp_path)
    u2seg.run_train(train_config(photos, run, *LOCAL))
    # A learning rate of ~0 in the rounds: their weights stay those they started from.
    one = u2seg.run_self_train(train_config(photos, run, *LOCAL, *ROUNDS, "self_train.rounds=1"))
    assert one["predictions"] == "final-1/predict"
    cfg = train_config(photos, run, *LOCAL, *ROUNDS, "self_train.rounds=2")
    manifest = u2seg.run_self_train(cfg)  # one more round: round 1 is kept, not redone
    assert manifest["counts"]["rounds"] == 2
    assert _summary(manifest["rounds"][0]) == _summary(one["rounds"][0])
    assert manifest["rounds"][0]["predicted"]["resumed_shards"] == 2
    first, second = manifest["rounds"]
    round_dir = run / "self-train"
    assert first["from"] == f"file://{run / 'train' / 'model.pt'}"
    assert second["from"] == f"file://{round_dir / 'round-1' / 'train' / 'model.pt'}"
    for r in (1, 2):
        for step in ("predict", "panoptic", "train"):
            assert (round_dir / f"round-{r}" / step / "manifest.json").is_file(), (r, step)
    # Threshold 0: every prediction kept (at most 5 per image), labels rebuilt from them.
    assert first["labels"]["kept"] == first["predicted"]["instances"] > 0
    labels = json.loads((round_dir / "round-1" / "panoptic" / "instances.json").read_text())
    assert labels["annotations"] and len(labels["images"]) == 4
    round0 = _parameters(run / "train" / "model.pt")
    fresh_model = build_from_spec(
        read_model_file(str(run / "train" / "model.pt"))[1]["spec"], torch.device("cpu")
    )
    fresh = {k: v for k, v in fresh_model.state_dict().items() if k in round0}
    assert any(not torch.allclose(round0[k], fresh[k]) for k in round0)  # round 0 learned
    for r in (1, 2):
        weights = _parameters(round_dir / f"round-{r}" / "train" / "model.pt")
        for key, value in round0.items():  # started from round 0 (then round 1), not afresh
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)
    assert (round_dir / "final-2" / "predict" / "instances.json").is_file()
    assert manifest["predictions"] == "final-2/predict"


def _rle(box: tuple[int, int, int, int], image_id: int = 1) -> dict:
    mask = np.zeros((40, 40), bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask_to_annotation(mask, image_id, 1)["segmentation"]


def test_old_masks_come_back_where_no_kept_prediction_covers_them() -> None:
    old = [{"segmentation": _rle((0, 0, 10, 10)), "category_id": 1},
           {"segmentation": _rle((20, 20, 40, 40)), "category_id": 2}]  # fmt: skip
    predictions = [
        {"segmentation": _rle((0, 0, 10, 11)), "category_id": 3, "score": 0.9},  # ~ old 1
        {"segmentation": _rle((0, 20, 10, 30)), "category_id": 1, "score": 0.4},  # too low
    ]
    item = {"old": old, "predictions": predictions}
    new, counts = relabel_image(item, threshold=0.7, add_back_iou=0.5)
    assert [a["category_id"] for a in new] == [3, 2]  # the kept one, then old 2 added back
    assert counts == {"kept": 1, "added_back": 1, "kept_old": 0}
    kept_old, counts = relabel_image(item, threshold=0.95, add_back_iou=0.5)
    assert kept_old == old and counts == {"kept": 0, "added_back": 0, "kept_old": 1}


def test_bad_self_training_settings_are_refused_by_name(tmp_path: Path) -> None:
    photos, run = write_trainset(tmp_path)
    with pytest.raises(ConfigError, match=r"self_train\.score_thresh=\[1\.5\]"):
        u2seg.run_self_train(train_config(photos, run, "self_train.score_thresh=[1.5]"))
