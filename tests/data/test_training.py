"""Training samples from a panoptic/ artifact: resize rules, flips, targets, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from u2seg.data.coco import mask_to_annotation
from u2seg.data.training import (
    TrainingDataError,
    paste_round_robin,
    read_training_set,
    target_size,
    training_sample,
)


def _artifact(tmp: Path) -> tuple[str, dict[str, str]]:
    """A 60 x 80 photo with one 20 x 10 instance (class 2 of 2), stuff 1 on the left half,
    and a second photo without instances (not a training image)."""
    photos = tmp / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(photos / name)
    mask = np.zeros((60, 80), dtype=bool)
    mask[10:20, 50:70] = True
    panoptic = tmp / "panoptic"
    (panoptic / "semantic").mkdir(parents=True)
    semantic = np.full((60, 80), 255, dtype=np.uint8)
    semantic[:, :40] = 1
    semantic[mask] = 0
    Image.fromarray(semantic).save(panoptic / "semantic" / "a.png")
    images = [{"id": 1, "file_name": "a.jpg", "height": 60, "width": 80},
              {"id": 2, "file_name": "b.jpg", "height": 60, "width": 80}]  # fmt: skip
    anns = [mask_to_annotation(mask, 1, 1, 2)]
    (panoptic / "instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
    categories = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 1}, {"id": 3, "isthing": 0}]
    (panoptic / "panoptic.json").write_text(json.dumps({"categories": categories}))
    return str(panoptic), {n: str(photos / n) for n in ("a.jpg", "b.jpg")}


def test_short_side_and_max_side_rules() -> None:
    assert target_size(480, 640, 240, 1333) == (240, 320)
    assert target_size(100, 1000, 800, 1333) == (133, 1333)  # the long side caps the scale
    assert target_size(640, 480, 320, 1333) == (427, 320)


def test_samples_carry_resized_targets(tmp_path: Path) -> None:
    panoptic, photos = _artifact(tmp_path)
    training = read_training_set(panoptic, photos)
    assert (training.num_things, training.num_stuff) == (2, 1)
    assert [r["file_name"] for r in training.records] == ["a.jpg"]  # b has no instance
    rng = np.random.default_rng(0)
    sample = training_sample(training.records[0], [30], 1000, False, rng)
    assert sample["image"].shape == (30, 40, 3)
    assert sample["masks"].shape == (1, 30, 40) and sample["labels"].tolist() == [2]
    np.testing.assert_array_equal(sample["boxes"], [[25, 5, 35, 10]])  # halved, xyxy
    assert sample["semantic"][0, 0] == 1 and sample["semantic"][0, -1] == 255
    flipped = [training_sample(training.records[0], [30], 1000, True, np.random.default_rng(s))
               for s in range(8)]  # fmt: skip
    lefts = {float(s["boxes"][0, 0]) for s in flipped}
    assert lefts == {25.0, 5.0}  # flipped or not, at random; the box follows the mask
    for s in flipped:
        assert s["semantic"][0, 0 if s["boxes"][0, 0] == 25 else -1] == 1


def test_bad_artifacts_are_named(tmp_path: Path) -> None:
    panoptic, photos = _artifact(tmp_path)
    with pytest.raises(TrainingDataError, match=r"names a\.jpg, which the image listing"):
        read_training_set(panoptic, {"b.jpg": photos["b.jpg"]})
    with pytest.raises(TrainingDataError, match=r"not found: .*nowhere/instances\.json"):
        read_training_set(str(tmp_path / "nowhere"), photos)
    record = read_training_set(panoptic, photos).records[0]
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(photos["a.jpg"])
    with pytest.raises(TrainingDataError, match=r"a\.jpg is 10x10 but its labels are 80x60"):
        training_sample(record, [30], 1000, False, np.random.default_rng(0))


def test_copy_paste_pairs_the_samples_of_a_group(tmp_path: Path) -> None:
    panoptic, photos = _artifact(tmp_path)
    (record,) = read_training_set(panoptic, photos).records
    one = training_sample(record, [60], 1000, False, np.random.default_rng(0))
    other = {"image": one["image"][:, ::-1].copy(), "masks": one["masks"][:, :, ::-1].copy(),
             "labels": one["labels"], "semantic": one["semantic"][:, ::-1].copy()}  # fmt: skip
    other["boxes"] = np.array([[10, 10, 30, 20]], np.float32)  # the mirrored instance
    rng = np.random.default_rng(3)
    pasted = paste_round_robin([one, other], rng, (1.0, 1.0))
    for sample in pasted:  # each got the other's instance: 2 instances, 2 boxes, 2 labels
        assert len(sample["masks"]) == len(sample["boxes"]) == len(sample["labels"]) == 2
        assert (sample["semantic"][sample["masks"].any(axis=0) > 0] == 0).all()
    assert paste_round_robin([one], rng, (1.0, 1.0)) == [one]  # alone: nothing to paste
    (spared,) = paste_round_robin([one], rng, (1.0, 1.0), spare=other)
    assert len(spared["masks"]) == 2
