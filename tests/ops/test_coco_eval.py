"""Class-agnostic AP scores the images pycocotools scores."""

from __future__ import annotations

import numpy as np
import pytest

from u2seg.data.coco import image_info, mask_to_annotation
from u2seg.ops.coco_eval import class_agnostic_ap


def test_class_agnostic_ap_scores_every_ground_truth_image() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 3:15] = True
    gt = {
        "images": [image_info(1, "a.jpg", 20, 20), image_info(2, "b.jpg", 20, 20)],
        "annotations": [mask_to_annotation(mask, 1, 1, category_id=4)],
        "categories": [{"id": 4, "name": "cat"}],
    }
    hit = mask_to_annotation(mask, 1, 1, score=0.5)
    stray = mask_to_annotation(mask, 2, 2, score=0.9)  # on an image with no annotation
    # pycocotools scores image 2 too: the stray detection ranks first as a false positive.
    assert class_agnostic_ap(gt, [hit, stray])["AP"] == pytest.approx(50.0)  # precision 1/2
    # Restricted to the annotated image it does not count.
    assert class_agnostic_ap(gt, [hit, stray], image_ids=[1])["AP"] == pytest.approx(100.0)


def test_box_only_ground_truth_is_scored_by_box_and_refused_for_masks() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 3:15] = True
    boxes_only = {  # as a detection dataset writes it: bbox and area, no segmentation
        "images": [image_info(1, "a.jpg", 20, 20)],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [3, 2, 12, 10],
                "area": 120,
                "iscrowd": 0,
            }
        ],  # fmt: skip
        "categories": [{"id": 1, "name": "tree"}],
    }
    hit = mask_to_annotation(mask, 1, 1, score=0.9)
    miss = {**mask_to_annotation(mask, 1, 2, score=0.5), "bbox": [14, 14, 5, 5]}
    assert class_agnostic_ap(boxes_only, [hit], "bbox")["AP"] == pytest.approx(100.0)
    assert class_agnostic_ap(boxes_only, [miss], "bbox")["AP"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="annotation 1 has no segmentation"):
        class_agnostic_ap(boxes_only, [hit], "segm")
