"""Hand-made panoptic scenes for the evaluation tests, written in COCO formats."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from u2seg.data.coco import mask_to_annotation
from u2seg.data.groundtruth import write_coco_panoptic

# Ground truth: two thing and two stuff categories.
GT_CATEGORIES = [
    {"id": 1, "name": "cat", "isthing": 1, "supercategory": "animal"},
    {"id": 2, "name": "dog", "isthing": 1, "supercategory": "animal"},
    {"id": 3, "name": "grass", "isthing": 0, "supercategory": "plant"},
    {"id": 4, "name": "sky", "isthing": 0, "supercategory": "sky"},
]
# Predictions: pseudo classes (things 1..2, stuff 3..4), named as the pipeline names them.
PRED_CATEGORIES = [
    {"id": 1, "name": "thing-1", "isthing": 1},
    {"id": 2, "name": "thing-2", "isthing": 1},
    {"id": 3, "name": "stuff-0", "isthing": 0},
    {"id": 4, "name": "stuff-1", "isthing": 0},
]
IDENTITY = {1: 1, 2: 2, 3: 3, 4: 4}
SWAPPED = {1: 2, 2: 1, 3: 4, 4: 3}  # GT category -> predicted pseudo class
Scene = tuple[dict[str, Any], np.ndarray, list[dict[str, Any]]]


def segment_info(segments: np.ndarray, seg_id: int, category: int, crowd: int = 0) -> dict:
    ys, xs = np.nonzero(segments == seg_id)
    box = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
    return {
        "id": seg_id,
        "category_id": category,
        "isthing": int(category in (1, 2)),
        "area": int(len(xs)),
        "bbox": box,
        "iscrowd": crowd,
    }


def scene(image_id: int, seed: int, size: int = 64) -> Scene:
    """Sky over grass with a cat and a dog box at random places (segment ids 1..4)."""
    rng = np.random.default_rng(seed)
    segments = np.ones((size, size), dtype=np.int64)  # 1: sky
    segments[size // 2 :] = 2  # 2: grass
    for seg_id in (3, 4):
        h, w = rng.integers(10, 20, size=2)
        y, x = rng.integers(0, size - 20, size=2)
        segments[y : y + h, x : x + w] = seg_id
    cats = {1: 4, 2: 3, 3: 1, 4: 2}
    info = [segment_info(segments, k, cats[k]) for k in range(1, 5) if (segments == k).any()]
    entry = {"id": image_id, "file_name": f"img{image_id:03d}.jpg", "height": size, "width": size}
    return entry, segments, info


def relabel(scenes: Sequence[Scene], permutation: dict[int, int]) -> list[Scene]:
    """The same segments with categories renamed: GT category -> predicted category."""
    out = []
    for entry, segments, info in scenes:
        infos = [{**s, "category_id": permutation[s["category_id"]]} for s in info]
        out.append((entry, segments.copy(), infos))
    return out


def write_ground_truth(folder: Path, scenes: Sequence[Scene]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_coco_panoptic(folder / "panoptic.json", scenes, GT_CATEGORIES)
    return folder / "panoptic.json"


def write_prediction(
    folder: Path,
    scenes: Sequence[Scene],
    categories: Sequence[dict[str, Any]] = PRED_CATEGORIES,
    scores: dict[tuple[int, int], float] | None = None,
) -> Path:
    """A prediction directory: panoptic.json + PNGs and instances.json of the thing
    segments (score 1.0, or scores[(image_id, segment id)])."""
    folder.mkdir(parents=True, exist_ok=True)
    write_coco_panoptic(folder / "panoptic.json", scenes, categories)
    things = {c["id"] for c in categories if c["isthing"]}
    annotations = []
    for entry, segments, info in scenes:
        for s in info:
            if s["category_id"] in things:
                score = (scores or {}).get((entry["id"], s["id"]), 1.0)
                annotations.append(
                    mask_to_annotation(
                        segments == s["id"], entry["id"], len(annotations) + 1,
                        s["category_id"], score,
                    )
                )  # fmt: skip
    instances = {
        "images": [e for e, _, _ in scenes],
        "annotations": annotations,
        "categories": [c for c in categories if c["isthing"]],
    }
    (folder / "instances.json").write_text(json.dumps(instances))
    return folder
