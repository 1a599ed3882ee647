"""Training samples for the panoptic model from the `panoptic/` artifact (docs/method.md stage 6).

`panoptic/` holds what detectron2's "separated" panoptic format needs: `instances.json`
(COCO instances, RLE masks, thing classes 1..K), `panoptic.json` (its categories: K things,
S stuff) and `semantic/<name>.png` (0 things, 1..S stuff, 255 void). `read_training_set`
reads the light part (one record per image, the photo's path from the run's image listing);
`training_sample` decodes one record into the arrays a training step takes, resized so
that its short side is one of `short_sides` (at random) and its long side at most
`max_side`, flipped left-right at random. Pixels are read only there, so the samples can be
made on CPU workers apart from the GPUs (a Ray Data `map`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from u2seg.data.coco import load_json, panoptic_file_names, rle_to_mask
from u2seg.data.images import read_image
from u2seg.ops.copy_paste import boxes_of, copy_paste

SAMPLE_KEYS = ("image", "masks", "boxes", "labels", "semantic")


class TrainingDataError(ValueError):
    """A `panoptic/` artifact that cannot be trained on; the message names the file."""


@dataclass(frozen=True)
class TrainingSet:
    """The records of a `panoptic/` artifact: one per image with at least one instance.

    Each record: image_id, file_name, path (the photo), semantic (URL of its semantic PNG),
    height, width, annotations (JSON text of its COCO annotations: RLE, category_id).
    """

    records: list[dict[str, Any]]
    num_things: int
    num_stuff: int


def read_training_set(panoptic_dir: str, photos: Mapping[str, str]) -> TrainingSet:
    """The training records of `panoptic_dir`; `photos`: file name -> path of the run's
    images (an image the labels name but the listing lacks is an error naming it)."""
    root = panoptic_dir.rstrip("/")
    what = "training labels (from `u2seg panoptic`)"
    instances = load_json(f"{root}/instances.json", what, TrainingDataError)
    categories = load_json(f"{root}/panoptic.json", what, TrainingDataError).get("categories", [])
    num_things = sum(1 for c in categories if c.get("isthing"))
    num_stuff = len(categories) - num_things
    if num_things < 1:
        raise TrainingDataError(f"{root}/panoptic.json lists no thing category")
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in instances.get("annotations", []):
        if not 1 <= int(ann["category_id"]) <= num_things:
            raise TrainingDataError(
                f"{root}/instances.json: annotation {ann.get('id')} has category "
                f"{ann['category_id']}, not a thing class 1..{num_things}"
            )
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    images = instances.get("images", [])
    pngs = panoptic_file_names([im["file_name"] for im in images])
    records = []
    for im in images:
        anns = by_image.get(int(im["id"]))
        if not anns:
            continue
        name = im["file_name"]
        if name not in photos:
            raise TrainingDataError(
                f"{root}/instances.json names {name}, which the image listing does not have"
            )
        records.append(
            {
                "image_id": int(im["id"]),
                "file_name": name,
                "path": photos[name],
                "semantic": f"{root}/semantic/{pngs[name]}",
                "height": int(im["height"]),
                "width": int(im["width"]),
                "annotations": json.dumps(
                    [{"segmentation": a["segmentation"], "category_id": a["category_id"]}
                     for a in anns]
                ),
            }
        )  # fmt: skip
    if not records:
        raise TrainingDataError(f"{root}: no image has a pseudo instance to train on")
    return TrainingSet(records, num_things, num_stuff)


def target_size(height: int, width: int, short_side: int, max_side: int) -> tuple[int, int]:
    """(H', W') with the short side `short_side`, scaled down so the long side is at most
    `max_side` (detectron2's ResizeShortestEdge), rounded to whole pixels."""
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_side:
        scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample))


def training_sample(
    record: Mapping[str, Any],
    short_sides: Sequence[int],
    max_side: int,
    flip: bool,
    rng: np.random.Generator,
    max_pixels: int = 178_956_970,
) -> dict[str, np.ndarray]:
    """One record -> image uint8 (H, W, 3), masks uint8 (N, H, W), boxes float32 (N, 4),
    labels int64 (N,), semantic uint8 (H, W); masks emptied by the resize are dropped."""
    image = read_image(str(record["path"]), max_pixels)
    height, width = image.shape[:2]
    if (height, width) != (int(record["height"]), int(record["width"])):
        raise TrainingDataError(
            f"{record['path']} is {width}x{height} but its labels are "
            f"{record['width']}x{record['height']}"
        )
    with fsspec.open(str(record["semantic"]), "rb") as fh:
        semantic = np.asarray(Image.open(io.BytesIO(fh.read())))
    if semantic.shape != (height, width):
        raise TrainingDataError(f"{record['semantic']} is not {width}x{height}")
    anns = json.loads(str(record["annotations"]))
    size = target_size(height, width, int(rng.choice(np.asarray(short_sides))), max_side)
    image = _resize(image, size, Image.Resampling.BILINEAR)
    semantic = _resize(semantic, size, Image.Resampling.NEAREST)
    masks = np.stack(
        [_resize(rle_to_mask(a["segmentation"]).astype(np.uint8), size, Image.Resampling.NEAREST)
         for a in anns]
    )  # fmt: skip
    labels = np.asarray([int(a["category_id"]) for a in anns], dtype=np.int64)
    if flip and rng.random() < 0.5:
        image, semantic, masks = image[:, ::-1], semantic[:, ::-1], masks[:, :, ::-1]
    keep = masks.reshape(len(masks), -1).any(axis=1)
    masks, labels = masks[keep], labels[keep]
    return {
        "image": np.ascontiguousarray(image),
        "masks": np.ascontiguousarray(masks),
        "boxes": boxes_of(masks.astype(bool)),
        "labels": labels,
        "semantic": np.ascontiguousarray(semantic),
    }


def paste_round_robin(
    samples: list[dict[str, np.ndarray]],
    rng: np.random.Generator,
    scale: Sequence[float],
    spare: dict[str, np.ndarray] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Copy-paste within a group: each sample gets instances of the next one (the last, of
    the first) pasted; a lone sample gets those of `spare` (another image), or none."""
    if len(samples) == 1:
        return [copy_paste(samples[0], spare, rng, scale)] if spare is not None else samples
    n = len(samples)
    return [copy_paste(s, samples[(i + 1) % n], rng, scale) for i, s in enumerate(samples)]
