"""Evaluation against ground truth (METHOD.md stage 7).

Class-agnostic AP is the CutLER protocol: every ground-truth and predicted category is
collapsed into one, then pycocotools' COCOeval scores masks (or boxes) with maxDets 100.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

_SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _collapsed(dataset: dict[str, Any], image_ids: set[int]) -> dict[str, Any]:
    """A copy of a COCO dataset restricted to `image_ids`, every category made id 1."""
    out = copy.deepcopy({k: v for k, v in dataset.items() if k != "annotations"})
    out["images"] = [im for im in dataset["images"] if im["id"] in image_ids]
    out["categories"] = [{"id": 1, "name": "object"}]
    out["annotations"] = [
        {**ann, "category_id": 1} for ann in dataset["annotations"] if ann["image_id"] in image_ids
    ]
    return out


def class_agnostic_ap(
    ground_truth: dict[str, Any],
    predictions: Sequence[dict[str, Any]],
    iou_type: str = "segm",
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """AP, AP50, AP75, APs/m/l (in %) of `predictions` with all categories collapsed.

    `ground_truth`: a COCO instances dataset (dict). `predictions`: COCO result dicts
    (image_id, segmentation and/or bbox, score). `image_ids`: images to score; default the
    images with at least one ground-truth annotation. maxDets 100. A size range without
    ground truth gives NaN; no prediction at all gives 0.
    """
    if image_ids is None:
        image_ids = sorted({a["image_id"] for a in ground_truth["annotations"]})
    ids = set(image_ids)
    gt = COCO()
    gt.dataset = _collapsed(ground_truth, ids)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    results = [{**p, "category_id": 1} for p in predictions if p["image_id"] in ids]
    if not results:
        return dict.fromkeys(_SUMMARY, 0.0)
    if iou_type == "bbox" and "bbox" not in results[0]:
        raise ValueError("box AP needs a 'bbox' in each prediction")
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(gt, dt, iouType=iou_type)
        evaluator.params.imgIds = sorted(ids)
        evaluator.params.maxDets = [1, 10, 100]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[: len(_SUMMARY)]
    pairs = zip(_SUMMARY, stats, strict=True)
    return {k: float(v * 100) if v >= 0 else float("nan") for k, v in pairs}


def best_iou(ground_truth: np.ndarray, masks: Sequence[np.ndarray]) -> float:
    """Highest IoU of any bool mask in `masks` with the bool `ground_truth` (same shape)."""
    best = 0.0
    for mask in masks:
        union = np.logical_or(ground_truth, mask).sum()
        if union:
            best = max(best, float(np.logical_and(ground_truth, mask).sum() / union))
    return best
