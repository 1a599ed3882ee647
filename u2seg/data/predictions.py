"""Predictions to evaluate: a directory in one of two COCO layouts, whoever wrote it.

- instances: ``instances.json``, a COCO instances dataset (images, annotations with RLE
  `segmentation`, `bbox`, `category_id` = predicted class, optional `score`, default 1.0,
  and categories). `maskcut/` is one (a single class-agnostic category).
- panoptic: ``panoptic.json`` + the PNG folder ``panoptic/`` beside it (COCO panoptic;
  categories with `isthing`), and ``instances.json`` for the thing instances when present.
  `panoptic/` (the pseudo labels) is one; the trained model's predictions use the same
  layout, so they plug in unchanged.
- semantic: the `semantic/` stage (its Parquet shards hold a label PNG per image, stuff
  cluster c as category c + 1), scored by the semantic protocol alone (STEGO's).

`evaluate.predictions` names stages of the run (their manifest must exist) or directories.
Images are matched to the ground truth by `groundtruth.image_key` of their file names.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import numpy as np
from fsspec.core import url_to_fs
from PIL import Image

from u2seg.artifacts import MANIFEST, StageDir
from u2seg.data.coco import rgb_to_id
from u2seg.data.groundtruth import (
    Category,
    GroundTruthError,
    check_segment_ids,
    image_key,
    read_instances,
    read_panoptic,
)

INSTANCES_JSON = "instances.json"
PANOPTIC_JSON = "panoptic.json"


class PredictionError(ValueError):
    """Predictions that cannot be scored as they are; the message names the file."""


@dataclass(frozen=True)
class PredImage:
    """One predicted image: its instances (COCO annotations) and panoptic PNG, if any."""

    key: str
    image_id: int
    file_name: str
    width: int
    height: int
    annotations: tuple[dict[str, Any], ...] = ()
    panoptic_file: str | None = None
    segments_info: tuple[dict[str, Any], ...] = ()
    labels_png: bytes | None = None


@dataclass(frozen=True)
class Predictions:
    """A prediction set: `kind` "instances" or "panoptic", its categories and images."""

    name: str
    path: str
    kind: str
    categories: tuple[Category, ...]
    images: dict[str, PredImage]
    has_instances: bool = True
    has_masks: bool = True  # False: box-only detections, scored by box AP alone

    @property
    def class_agnostic(self) -> bool:
        """A single category: class-agnostic proposals (MaskCut), scored without classes."""
        return len([c for c in self.categories if c.isthing]) <= 1 and self.kind == "instances"

    def without_images(self) -> Predictions:
        return replace(self, images={})

    def panoptic(
        self, image: PredImage, check_ids: bool = True
    ) -> tuple[np.ndarray, dict[int, int]]:
        """int64 (H, W) segment ids (0 = void) and segment id -> predicted category
        (`check_ids` as in `GroundTruth.panoptic`)."""
        if image.panoptic_file is None:
            raise PredictionError(f"{self.path}: {image.file_name} has no panoptic PNG")
        try:
            with fsspec.open(image.panoptic_file, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            msg = f"predicted panoptic PNG not found: {image.panoptic_file}"
            raise PredictionError(msg) from None
        with Image.open(io.BytesIO(data)) as im:
            segments = rgb_to_id(np.asarray(im.convert("RGB"))).astype(np.int64)
        info = {int(s["id"]): int(s["category_id"]) for s in image.segments_info}
        if check_ids:
            check_segment_ids(np.unique(segments), info, image.panoptic_file, PredictionError)
        return segments, info


def semantic_labels(image: PredImage) -> np.ndarray:
    """int64 (H, W) category ids (stuff cluster + 1) of a semantic prediction."""
    if image.labels_png is None:
        raise PredictionError(f"{image.file_name} has no semantic labels")
    with Image.open(io.BytesIO(image.labels_png)) as im:
        return np.asarray(im).astype(np.int64) + 1


def _load_semantic(name: str, path: str) -> Predictions:
    """The stuff labels of a `semantic` stage directory (held as PNG bytes, a few KB an
    image)."""
    stage = StageDir(*path.rstrip("/").rsplit("/", 1))
    classes = int(stage.manifest()["counts"]["classes"])
    categories = tuple(Category(c + 1, f"stuff-{c}", False) for c in range(classes))
    columns = ["image_id", "file_name", "width", "height", "error", "labels_png"]
    listed = [
        PredImage(
            image_key(r["file_name"]), int(r["image_id"]), r["file_name"], int(r["width"]),
            int(r["height"]), labels_png=r["labels_png"],
        )
        for shard in stage.shard_names()
        for r in stage.read_table(shard, columns).to_pylist()
        if r["error"] is None
    ]  # fmt: skip
    return Predictions(name, path, "semantic", categories, _by_key(listed, path), False)


def _instances(url: str) -> tuple[tuple[Category, ...], dict[int, list[Any]], Any]:
    """read_instances of a prediction: errors as PredictionError, score 1.0 where absent."""
    try:
        categories, by_image, images = read_instances(url, "predicted instances JSON")
    except GroundTruthError as exc:
        raise PredictionError(str(exc)) from None
    scored = {i: [{"score": 1.0, **a} for a in anns] for i, anns in by_image.items()}
    return categories, scored, images


def _has_masks(url: str, by_image: dict[int, list[Any]]) -> bool:
    """Whether the detections carry masks: all of them (True) or none (box-only, False);
    some with and some without cannot be scored as one set."""
    anns = [a for image in by_image.values() for a in image]
    without = [a for a in anns if "segmentation" not in a]
    if without and len(without) < len(anns):
        raise PredictionError(
            f"{url}: {len(without)} of {len(anns)} detections have no 'segmentation' "
            f"(e.g. id {without[0].get('id')}): give every detection a mask, or none"
        )
    missing_box = next((a for a in without if "bbox" not in a), None)
    if missing_box is not None:
        raise PredictionError(
            f"{url}: detection {missing_box.get('id')} has neither 'segmentation' nor 'bbox'"
        )
    return not without


def _image(im: dict[str, Any], **extra: Any) -> PredImage:
    return PredImage(
        image_key(im["file_name"]), int(im["id"]), str(im["file_name"]),
        int(im.get("width", 0)), int(im.get("height", 0)), **extra,
    )  # fmt: skip


def _by_key(images: list[PredImage], url: str) -> dict[str, PredImage]:
    """Images by matching name; two images of one name cannot be told apart."""
    out: dict[str, PredImage] = {}
    for image in images:
        if image.key in out:
            raise PredictionError(
                f"{url}: {out[image.key].file_name} and {image.file_name} have the same name "
                f"{image.key!r}; images are matched to the ground truth by name"
            )
        out[image.key] = image
    return out


def load_predictions(name: str, path: str) -> Predictions:
    """The predictions in directory `path` (local or fsspec URL), reported as `name`."""
    fs, root = url_to_fs(path)
    root = root.rstrip("/")
    instances_file = fs.unstrip_protocol(f"{root}/{INSTANCES_JSON}")
    panoptic_file = fs.unstrip_protocol(f"{root}/{PANOPTIC_JSON}")
    has_instances = fs.exists(f"{root}/{INSTANCES_JSON}")
    if not fs.exists(f"{root}/{PANOPTIC_JSON}"):
        if fs.exists(f"{root}/{MANIFEST}") and not has_instances:
            with fs.open(f"{root}/{MANIFEST}", "rb") as fh:
                if json.load(fh).get("stage") == "semantic":
                    return _load_semantic(name, path)
        if not has_instances:
            raise PredictionError(
                f"{path} holds neither {PANOPTIC_JSON} nor {INSTANCES_JSON} (nor is it a "
                "semantic stage)"
            )
        categories, by_image, raw = _instances(instances_file)
        masks = _has_masks(instances_file, by_image)
        listed = [_image(im, annotations=tuple(by_image.get(int(im["id"]), []))) for im in raw]
        images = _by_key(listed, instances_file)
        return Predictions(name, path, "instances", categories, images, has_masks=masks)
    try:
        categories, entries = read_panoptic(panoptic_file, "predicted panoptic JSON", False)
    except GroundTruthError as exc:
        raise PredictionError(str(exc)) from None
    by_image = _instances(instances_file)[1] if has_instances else {}
    png_root = panoptic_file[: -len(".json")]
    listed = [
        _image(
            im,
            annotations=tuple(by_image.get(int(im["id"]), [])),
            panoptic_file=f"{png_root}/{ann['file_name']}",
            segments_info=tuple(ann["segments_info"]),
        )
        for im, ann in entries
    ]
    images = _by_key(listed, panoptic_file)
    return Predictions(name, path, "panoptic", categories, images, has_instances)


def resolve(entry: str, run_dir: str) -> tuple[str, str]:
    """(name, directory) of an `evaluate.predictions` entry: a stage of the run (its
    manifest must exist) or a directory of predictions."""
    if "/" not in entry and ":" not in entry:
        stage = StageDir(run_dir, entry)
        # An error naming the stage when it has not completed; a stage whose predictions
        # lie in a subdirectory (self-train's last model) names it.
        sub = stage.manifest().get("predictions")
        return entry, stage.fs.unstrip_protocol(f"{stage.path}/{sub}" if sub else stage.path)
    fs, path = url_to_fs(entry)
    if not fs.isdir(path):
        raise PredictionError(f"prediction directory not found: {entry}")
    return path.rstrip("/").rsplit("/", 1)[-1], entry
