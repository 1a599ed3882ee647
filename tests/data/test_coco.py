"""COCO encoding of masks: annotations, RLE forms, a dataset pycocotools loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from u2seg.data import coco as coco_format


def disk(size: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    """Bool (H, W) disk."""
    yy, xx = np.mgrid[: size[0], : size[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def test_annotation_of_a_rectangle() -> None:
    mask = np.zeros((60, 80), dtype=bool)
    mask[5:35, 10:50] = True  # 30 rows x 40 cols at x=10, y=5
    ann = coco_format.mask_to_annotation(mask, image_id=3, annotation_id=7)
    assert ann["bbox"] == [10.0, 5.0, 40.0, 30.0]
    assert ann["area"] == 1200
    assert ann["iscrowd"] == 0 and ann["category_id"] == 1
    assert ann["image_id"] == 3 and ann["id"] == 7 and "score" not in ann
    assert isinstance(ann["segmentation"]["counts"], str)
    assert ann["segmentation"]["size"] == [60, 80]
    np.testing.assert_array_equal(coco_format.rle_to_mask(ann["segmentation"]), mask)
    scored = coco_format.mask_to_annotation(mask, 3, 8, category_id=5, score=0.25)
    assert scored["score"] == 0.25 and scored["category_id"] == 5
    with pytest.raises(ValueError, match="empty"):
        coco_format.mask_to_annotation(np.zeros((4, 4), dtype=bool), 3, 9)


def test_rle_round_trip_and_other_rle_forms() -> None:
    mask = np.random.default_rng(2).random((37, 53)) > 0.6
    rle = coco_format.mask_to_rle(mask)
    np.testing.assert_array_equal(coco_format.rle_to_mask(rle), mask)
    as_bytes = {"size": rle["size"], "counts": rle["counts"].encode()}
    np.testing.assert_array_equal(coco_format.rle_to_mask(as_bytes), mask)
    # Uncompressed RLE: alternating run lengths in column-major order, starting with zeros.
    column_major = np.array([[0, 1, 1], [0, 1, 0]], dtype=bool)
    uncompressed = {"size": [2, 3], "counts": [2, 3, 1]}
    np.testing.assert_array_equal(coco_format.rle_to_mask(uncompressed), column_major)


def test_masks_to_rles_is_mask_to_rle_of_each() -> None:
    """The stack's runs found in tensor ops give pycocotools' own strings, for masks that
    start on a foreground pixel, empty, full, random and thin."""
    rng = np.random.default_rng(3)
    stack = rng.random((6, 37, 53)) > 0.6
    stack[0] = True
    stack[1] = False
    stack[2, 0, 0], stack[3, 0, 0] = True, False
    stack[4] = disk((37, 53), (18, 26), 9)
    stack[5] = False
    stack[5, :, 30] = True
    rles = coco_format.masks_to_rles(torch.from_numpy(stack))
    assert rles == [coco_format.mask_to_rle(mask) for mask in stack]
    assert coco_format.masks_to_rles(torch.zeros((0, 5, 5), dtype=torch.bool)) == []
    ann = coco_format.rle_to_annotation(rles[4], 2, 3, score=0.5)
    assert ann == coco_format.mask_to_annotation(stack[4], 2, 3, score=0.5)
    with pytest.raises(ValueError, match="empty"):
        coco_format.rle_to_annotation(rles[1], 2, 4)


def test_coco_loads_a_dataset_of_these_annotations(tmp_path: Path) -> None:
    """Two images of different, non-square sizes, so a width/height swap would show."""
    masks = {
        1: [disk((48, 64), (20, 30), 10), disk((48, 64), (35, 10), 6)],
        2: [disk((64, 40), (30, 20), 12)],
    }
    images, annotations = [], []
    for image_id, image_masks in masks.items():
        h, w = image_masks[0].shape
        images.append(coco_format.image_info(image_id, f"{image_id}.jpg", height=h, width=w))
        for m in image_masks:
            annotations.append(coco_format.mask_to_annotation(m, image_id, len(annotations) + 1))
    dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "fg", "supercategory": "fg"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dataset))
    coco = COCO(str(path))
    assert sorted(coco.getAnnIds(imgIds=[1])) == [1, 2]
    assert coco.imgs[2]["height"] == 64 and coco.imgs[2]["width"] == 40
    for ann_id, expected in zip([1, 2, 3], masks[1] + masks[2], strict=True):
        ann = coco.anns[ann_id]
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), expected)
        assert ann["area"] == int(expected.sum())
