"""Ground truth for evaluation, read into one per-image form whatever the dataset.

Formats (`evaluate.gt_format`):

- ``coco``: a COCO instances JSON (`gt_instances`): instance masks and boxes only.
- ``coco-panoptic``: a COCO panoptic JSON + PNG folder (`gt_panoptic_json`,
  `gt_panoptic_root`, default the JSON's path without ".json", as COCO ships them).
  Instances are the thing segments (crowd segments as crowd), or the instances JSON when
  `gt_instances` is set too (COCO's own instance ground truth overlaps, panoptic does not).
  Semantic classes are the categories, or their supercategories with
  `semantic_level=supercategory` (COCO panoptic's 133 categories -> the 27 of COCO-Stuff).
  PQ matches the categories, or with `panoptic_level=supercategory` the thing categories
  and the stuff supercategories (COCO: 80 things + 15 stuff), as U2Seg scores COCO PQ:
  the stuff segments of one supercategory in an image are then one segment.
- ``cocostuff27``: COCO-Stuff label PNGs (`gt_semantic_root`, values 0..181 of the 182
  COCO-Stuff labels, 255 unlabelled) mapped to STEGO's 27 coarse classes (12 thing and 15
  stuff supercategories): semantic only.
- ``cityscapes``: a gtFine split folder (`gt_cityscapes`, e.g. gtFine/val) of
  ``*_gtFine_instanceIds.png``: 8 thing and 11 stuff classes, full resolution, the
  cityscapesScripts panoptic conversion (thing pixels without an instance id are crowd;
  classes outside the 19 are void).

The light part (image list, categories, COCO instance annotations as RLE) is held in
memory; label maps are read image by image (`panoptic`, `semantic`, `instances`), so Ray
workers read the pixels of their own images only. Images are matched to predictions by
`image_key`: the file name's stem, without Cityscapes' suffixes.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import numpy as np
from fsspec.core import url_to_fs
from PIL import Image

from u2seg.artifacts import png_bytes
from u2seg.data.coco import (
    id_to_rgb,
    load_json,
    mask_to_annotation,
    panoptic_annotation,
    panoptic_dataset,
    panoptic_file_name,
    rgb_to_id,
)
from u2seg.ops.metrics import SegmentOverlaps, relabel_gt_segments

FORMATS = ("coco", "coco-panoptic", "cocostuff27", "cityscapes")
SEMANTIC_LEVELS = ("category", "supercategory")
PANOPTIC_LEVELS = ("category", "supercategory")
IGNORE = 255  # void in semantic label maps
_KEY_SUFFIXES = ("_leftImg8bit", "_gtFine_instanceIds", "_gtFine_labelIds")

# STEGO's COCO-Stuff-27 classes: the 12 thing and 15 stuff supercategories of COCO-Stuff.
COCOSTUFF27_CLASSES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory",
    "animal", "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "raw-material", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)  # fmt: skip
COCOSTUFF27_THINGS = 12
# Coarse class of each COCO-Stuff label 0..181 (label = COCO-Stuff id - 1; 0..90 things
# with COCO's 11 unused ids, 91..181 stuff), as STEGO's data loader defines it.
COCOSTUFF_FINE_TO_COARSE = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10,
    10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1,
    1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16,
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26,
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21,
    17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24,
    15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19,
    19, 24,
)  # fmt: skip

# Cityscapes label ids of the 19 evaluated classes, in train-id order (stuff, then things).
CITYSCAPES_CLASSES = (
    (7, "road", False), (8, "sidewalk", False), (11, "building", False), (12, "wall", False),
    (13, "fence", False), (17, "pole", False), (19, "traffic light", False),
    (20, "traffic sign", False), (21, "vegetation", False), (22, "terrain", False),
    (23, "sky", False), (24, "person", True), (25, "rider", True), (26, "car", True),
    (27, "truck", True), (28, "bus", True), (31, "train", True), (32, "motorcycle", True),
    (33, "bicycle", True),
)  # fmt: skip


Panoptic = tuple[np.ndarray, dict[int, tuple[int, bool]]]  # segment ids, id -> (category, crowd)


class GroundTruthError(ValueError):
    """Ground truth that cannot be used as it is; the message names the file."""


@dataclass(frozen=True)
class Category:
    """A ground-truth (or predicted) category: COCO id, name, thing or stuff."""

    id: int
    name: str
    isthing: bool
    supercategory: str = ""


@dataclass(frozen=True)
class GTImage:
    """One ground-truth image. `label_file`: URL of its label PNG (panoptic ids, COCO-Stuff
    labels or Cityscapes instance ids), None for instances-only ground truth.
    `annotations`: COCO instance annotations from an instances JSON (RLE, GT category
    ids); `segments_info`: the COCO panoptic segments. width/height 0: read from the PNG."""

    key: str
    image_id: int
    file_name: str
    width: int
    height: int
    label_file: str | None = None
    annotations: tuple[dict[str, Any], ...] = ()
    segments_info: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class GroundTruth:
    """A ground-truth set: what it can score, its categories and semantic classes.

    `categories`: instance / panoptic categories (things and stuff). `semantic_classes`:
    names of the semantic classes 0..C-1; `semantic_of`: category id -> semantic class.
    `images` is the evaluation set; `without_images()` is the light copy workers get.
    """

    format: str
    source: str
    categories: tuple[Category, ...]
    semantic_classes: tuple[str, ...]
    semantic_of: dict[int, int]
    has_instances: bool
    has_panoptic: bool
    images: tuple[GTImage, ...] = field(default=(), repr=False)
    instances_from_json: bool = False
    stuff_groups: dict[int, int] = field(default_factory=dict)
    group_categories: tuple[Category, ...] = ()

    @property
    def has_semantic(self) -> bool:
        return bool(self.semantic_classes)

    @property
    def thing_ids(self) -> list[int]:
        return sorted(c.id for c in self.categories if c.isthing)

    @property
    def stuff_ids(self) -> list[int]:
        return sorted(c.id for c in self.categories if not c.isthing)

    @property
    def panoptic_level(self) -> str:
        return "supercategory" if self.group_categories else "category"

    @property
    def panoptic_categories(self) -> tuple[Category, ...]:
        """The categories PQ is scored on: `categories`, or at the supercategory level the
        thing categories and one stuff category a stuff supercategory (`stuff_groups`:
        stuff category id -> the id of its group in `group_categories`)."""
        if not self.group_categories:
            return self.categories
        return tuple(c for c in self.categories if c.isthing) + self.group_categories

    def panoptic_ids(self, things: bool) -> list[int]:
        """Thing (or stuff) ids of `panoptic_categories`."""
        return sorted(c.id for c in self.panoptic_categories if c.isthing == things)

    def at_panoptic_level(
        self, overlaps: SegmentOverlaps, gt_info: Mapping[int, tuple[int, bool]]
    ) -> tuple[SegmentOverlaps, dict[int, tuple[int, bool]]]:
        """One image's overlaps and GT segments with the categories of `panoptic_categories`
        (stuff of one group merged into one segment)."""
        if not self.group_categories:
            return overlaps, dict(gt_info)
        merge = [c.id for c in self.group_categories]
        return relabel_gt_segments(overlaps, gt_info, self.stuff_groups, merge)

    def without_images(self) -> GroundTruth:
        return replace(self, images=())

    # -- per image ---------------------------------------------------------------------

    def panoptic(self, image: GTImage, check_ids: bool = True) -> Panoptic:
        """int64 (H, W) segment ids (0 = void) and segment id -> (category, iscrowd).

        `check_ids`: refuse ids without a segments_info entry here (a pass over the
        pixels); callers that count the ids anyway check them with `check_segment_ids`.
        """
        if not self.has_panoptic or image.label_file is None:
            raise GroundTruthError(f"{self.source}: {self.format} ground truth has no panoptic")
        if self.format == "cityscapes":
            return _cityscapes_panoptic(_read_png(image.label_file), image.label_file)
        pixels = _read_png(image.label_file)
        if pixels.ndim != 3 or pixels.shape[2] < 3:
            raise GroundTruthError(f"{image.label_file}: a panoptic PNG must be RGB")
        segments = rgb_to_id(pixels[..., :3]).astype(np.int64)
        info = {int(s["id"]): (int(s["category_id"]), bool(s.get("iscrowd", 0)))
                for s in image.segments_info}  # fmt: skip
        _check_size(segments, image, image.label_file)
        if check_ids:
            check_segment_ids(np.unique(segments), info, image.label_file, GroundTruthError)
        return segments, info

    def semantic(self, image: GTImage, panoptic: Panoptic | None = None) -> np.ndarray:
        """int64 (H, W) semantic class ids 0..C-1, `IGNORE` (255) for void. `panoptic`:
        this image's `panoptic(image)` when the caller has it already."""
        if not self.has_semantic:
            raise GroundTruthError(f"{self.source}: {self.format} ground truth has no semantic")
        if self.format == "cocostuff27":
            assert image.label_file is not None
            return _cocostuff27(_read_png(image.label_file), image.label_file)
        segments, info = panoptic or self.panoptic(image)
        # Segment ids reach 256^3: look up the ids present, not a table of all of them.
        ids, inverse = np.unique(segments, return_inverse=True)
        classes = [self.semantic_of.get(info[i][0], IGNORE) if i in info else IGNORE
                   for i in ids.tolist()]  # fmt: skip
        return np.asarray(classes, dtype=np.int64)[inverse].reshape(segments.shape)

    def instances(self, image: GTImage, panoptic: Panoptic | None = None) -> list[dict[str, Any]]:
        """COCO instance annotations (RLE, bbox, area, iscrowd, GT thing category ids)."""
        if not self.has_instances:
            raise GroundTruthError(f"{self.source}: {self.format} ground truth has no instances")
        if self.instances_from_json:
            return [dict(a) for a in image.annotations]
        segments, info = panoptic or self.panoptic(image)
        things = {c.id for c in self.categories if c.isthing}
        out = []
        for seg_id, (category, crowd) in sorted(info.items()):
            mask = segments == seg_id
            if category not in things or not mask.any():
                continue
            ann = mask_to_annotation(mask, image.image_id, seg_id, category)
            ann["iscrowd"] = int(crowd)
            out.append(ann)
        return out


# --------------------------------------------------------------------------- helpers


def check_segment_ids(
    present: Iterable[int], info: Mapping[int, Any], url: str, error: type[ValueError]
) -> None:
    """Every segment id in a label map (but void 0) must have a segments_info entry."""
    missing = sorted(set(int(i) for i in present) - set(info) - {0})
    if missing:
        raise error(f"{url}: segment ids {missing[:10]} have no segments_info entry")


def image_key(file_name: str) -> str:
    """The name that pairs an image with its ground truth: stem, Cityscapes suffix removed."""
    stem = PurePosixPath(file_name).stem
    for suffix in _KEY_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _read_png(url: str) -> np.ndarray:
    try:
        with fsspec.open(url, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise GroundTruthError(f"ground-truth label file not found: {url}") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB") if im.mode in ("P", "RGBA") else im)
    except OSError as exc:
        raise GroundTruthError(f"{url}: not a readable PNG ({exc})") from None


def _check_size(labels: np.ndarray, image: GTImage, url: str) -> None:
    if image.width and image.height and labels.shape[:2] != (image.height, image.width):
        raise GroundTruthError(
            f"{url} is {labels.shape[1]}x{labels.shape[0]} but its JSON entry says "
            f"{image.width}x{image.height}"
        )


def _cocostuff27(labels: np.ndarray, url: str) -> np.ndarray:
    if labels.ndim != 2:
        raise GroundTruthError(f"{url}: a COCO-Stuff label PNG has one channel, got {labels.shape}")
    lut = np.full(256, -1, dtype=np.int64)
    lut[: len(COCOSTUFF_FINE_TO_COARSE)] = COCOSTUFF_FINE_TO_COARSE
    lut[IGNORE] = IGNORE
    labels = labels.astype(np.int64)
    if labels.size and (labels.max() > 255 or (lut[labels] < 0).any()):
        bad = sorted(set(np.unique(labels).tolist()) - set(range(182)) - {IGNORE})
        raise GroundTruthError(f"{url}: labels {bad[:10]} are not COCO-Stuff labels 0..181/255")
    return lut[labels]


_CITYSCAPES_INFO = {label: isthing for label, _, isthing in CITYSCAPES_CLASSES}


def _cityscapes_panoptic(ids: np.ndarray, url: str) -> Panoptic:
    """Cityscapes instance ids (label, or label * 1000 + instance) -> panoptic segments."""
    if ids.ndim != 2:
        raise GroundTruthError(f"{url}: an instanceIds PNG has one channel, got {ids.shape}")
    values, inverse = np.unique(ids.astype(np.int64), return_inverse=True)
    kept = np.zeros(len(values), dtype=np.int64)
    info: dict[int, tuple[int, bool]] = {}
    for k, value in enumerate(values.tolist()):
        label = value // 1000 if value >= 1000 else value
        if label not in _CITYSCAPES_INFO:
            continue  # void, or a class Cityscapes does not evaluate
        # Thing pixels with the bare label id are a group of instances: crowd.
        info[value] = (label, _CITYSCAPES_INFO[label] and value < 1000)
        kept[k] = value
    return kept[inverse].reshape(ids.shape), info


def parse_categories(
    data: dict[str, Any], url: str, panoptic: bool, used: set[int] | None = None
) -> tuple[Category, ...]:
    """The categories of a COCO JSON. Ids must be >= 1 (0 stands for void); a category
    below 1 that no annotation uses (`used`: the ids the annotations use; labelme always
    writes an unused 0 "_background_") is skipped with a warning, a used one is an error."""
    try:
        cats = tuple(
            Category(
                int(c["id"]),
                str(c["name"]),
                bool(c.get("isthing", 1)) if panoptic else True,
                str(c.get("supercategory") or ""),
            )
            for c in data["categories"]
        )
    except (KeyError, TypeError) as exc:
        raise GroundTruthError(f"{url}: categories need 'id' and 'name' ({exc})") from None
    for c in cats:
        if c.id >= 1:
            continue
        if used is None or c.id in used:
            raise GroundTruthError(
                f"{url}: category {c.id} ({c.name!r}) is used, but category ids must be >= 1 "
                "(0 stands for void): renumber the categories"
            )
        warnings.warn(
            f"{url}: category {c.id} ({c.name!r}) is used by no annotation: skipped "
            "(category ids must be >= 1, 0 stands for void)",
            stacklevel=2,
        )
    cats = tuple(c for c in cats if c.id >= 1)
    if not cats:
        raise GroundTruthError(f"{url} lists no categories")
    return cats


def _images_of(data: dict[str, Any], url: str) -> list[dict[str, Any]]:
    """The `images` of a COCO JSON; each needs an id and a file name, ids are unique
    (pycocotools would merge the annotations of photos sharing one)."""
    images = data.get("images")
    if not isinstance(images, list) or not images:
        raise GroundTruthError(f"{url} lists no images")
    for k, im in enumerate(images):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise GroundTruthError(f"{url}: images[{k}] needs an 'id' and a 'file_name'")
    repeated = sorted(i for i, n in Counter(int(im["id"]) for im in images).items() if n > 1)
    if repeated:
        raise GroundTruthError(f"{url}: image ids {repeated[:10]} are used by more than one image")
    return images


def _unique_keys(images: Sequence[GTImage], source: str) -> None:
    seen: dict[str, str] = {}
    for im in images:
        if im.key in seen:
            raise GroundTruthError(
                f"{source}: {seen[im.key]} and {im.file_name} have the same name {im.key!r}; "
                "images are matched to predictions by name"
            )
        seen[im.key] = im.file_name


def read_instances(url: str, what: str) -> tuple[tuple[Category, ...], dict[int, list[Any]], Any]:
    """Categories, annotations by image id and the image entries of a COCO instances JSON;
    an annotation of an unknown category or an unlisted image is an error naming it."""
    data = load_json(url, what, GroundTruthError)
    annotations = data.get("annotations", [])
    used = {int(a["category_id"]) for a in annotations if "category_id" in a}
    categories = parse_categories(data, url, panoptic=False, used=used)
    known = {c.id for c in categories}
    images = _images_of(data, url)
    ids = {int(im["id"]) for im in images}
    by_image: dict[int, list[Any]] = {}
    for ann in annotations:
        if int(ann["category_id"]) not in known:
            raise GroundTruthError(
                f"{url}: annotation {ann.get('id')} has unknown category id {ann['category_id']}"
            )
        if int(ann["image_id"]) not in ids:
            raise GroundTruthError(
                f"{url}: annotation {ann.get('id')} refers to image {ann['image_id']}, "
                "which the JSON does not list"
            )
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    return categories, by_image, images


# --------------------------------------------------------------------------- loaders


def load_coco(instances: str) -> GroundTruth:
    """Instance ground truth from a COCO instances JSON."""
    categories, by_image, raw = read_instances(instances, "ground-truth instances JSON")
    images = tuple(
        GTImage(
            image_key(im["file_name"]), int(im["id"]), str(im["file_name"]),
            int(im.get("width", 0)), int(im.get("height", 0)),
            annotations=tuple(by_image.get(int(im["id"]), [])),
        )
        for im in raw
    )  # fmt: skip
    _unique_keys(images, instances)
    return GroundTruth("coco", instances, categories, (), {}, True, False, images, True)


def read_panoptic(
    url: str, what: str, require_images: bool
) -> tuple[tuple[Category, ...], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Categories and (image entry, annotation entry) pairs of a COCO panoptic JSON; an
    image without an annotation entry or a segment of an unknown category is an error
    naming it. `require_images`: an empty image list is an error too."""
    data = load_json(url, what, GroundTruthError)
    annotations = {int(a["image_id"]): a for a in data.get("annotations", [])}
    used = {int(s["category_id"]) for a in annotations.values() for s in a.get("segments_info", [])}
    categories = parse_categories(data, url, panoptic=True, used=used)
    known = {c.id for c in categories}
    images = _images_of(data, url) if require_images else data.get("images", [])
    pairs = []
    for im in images:
        ann = annotations.get(int(im["id"]))
        if ann is None:
            raise GroundTruthError(
                f"{url}: image {im['id']} ({im['file_name']}) has no annotation entry"
            )
        for s in ann["segments_info"]:
            if int(s["category_id"]) not in known:
                raise GroundTruthError(
                    f"{url}: segment {s['id']} of {ann['file_name']} has unknown "
                    f"category id {s['category_id']}"
                )
        pairs.append((im, ann))
    return categories, pairs


def load_coco_panoptic(
    panoptic_json: str,
    panoptic_root: str | None = None,
    instances: str | None = None,
    semantic_level: str = "category",
    panoptic_level: str = "category",
) -> GroundTruth:
    """Panoptic (and semantic, instance) ground truth from a COCO panoptic JSON + PNGs."""
    if semantic_level not in SEMANTIC_LEVELS:
        raise GroundTruthError(f"semantic_level must be one of {SEMANTIC_LEVELS}")
    if panoptic_level not in PANOPTIC_LEVELS:
        raise GroundTruthError(f"panoptic_level must be one of {PANOPTIC_LEVELS}")
    categories, entries = read_panoptic(panoptic_json, "ground-truth panoptic JSON", True)
    root = panoptic_root or panoptic_json[: -len(".json")]
    by_image: dict[int, list[Any]] = {}
    if instances:
        inst_categories, by_image, _ = read_instances(instances, "ground-truth instances JSON")
        stray = sorted({c.id for c in inst_categories} - {c.id for c in categories if c.isthing})
        if stray:
            raise GroundTruthError(
                f"{instances}: category ids {stray[:10]} are not thing categories of "
                f"{panoptic_json}"
            )
    images = []
    for im, ann in entries:
        images.append(
            GTImage(
                image_key(im["file_name"]), int(im["id"]), str(im["file_name"]),
                int(im.get("width", 0)), int(im.get("height", 0)),
                label_file=f"{root.rstrip('/')}/{ann['file_name']}",
                annotations=tuple(by_image.get(int(im["id"]), [])),
                segments_info=tuple(ann["segments_info"]),
            )
        )  # fmt: skip
    _unique_keys(images, panoptic_json)
    if semantic_level == "category":
        classes = tuple(c.name for c in categories)
        semantic_of = {c.id: k for k, c in enumerate(categories)}
    else:
        names = list(dict.fromkeys(c.supercategory or c.name for c in categories))
        classes = tuple(names)
        semantic_of = {c.id: names.index(c.supercategory or c.name) for c in categories}
    groups: dict[int, int] = {}
    group_categories: tuple[Category, ...] = ()
    if panoptic_level == "supercategory":
        groups, group_categories = stuff_supercategories(categories)
    return GroundTruth(
        "coco-panoptic", panoptic_json, categories, classes, semantic_of, True, True,
        tuple(images), bool(instances), groups, group_categories,
    )  # fmt: skip


def stuff_supercategories(
    categories: Sequence[Category],
) -> tuple[dict[int, int], tuple[Category, ...]]:
    """Stuff category id -> group id, and one stuff category a stuff supercategory (a
    category without one is its own group), numbered after the largest category id, in
    order of first appearance. Thing categories are not grouped."""
    next_id = max(c.id for c in categories) + 1
    by_name: dict[str, Category] = {}
    groups: dict[int, int] = {}
    for c in categories:
        if c.isthing:
            continue
        name = c.supercategory or c.name
        if name not in by_name:
            by_name[name] = Category(next_id + len(by_name), name, False, name)
        groups[c.id] = by_name[name].id
    return groups, tuple(by_name.values())


def _label_files(folder: str, suffix: str, what: str) -> tuple[GTImage, ...]:
    """One image per label file ending in `suffix` under `folder` (recursively, sorted)."""
    fs, path = url_to_fs(folder)
    if not fs.isdir(path):
        raise GroundTruthError(f"folder of {what} not found: {folder}")
    found = sorted(p for p in fs.find(path) if p.lower().endswith(suffix.lower()))
    if not found:
        raise GroundTruthError(f"no {what} under {folder}")
    prefix = path.rstrip("/") + "/"
    images = tuple(
        GTImage(image_key(p), k, p[len(prefix) :], 0, 0, label_file=fs.unstrip_protocol(p))
        for k, p in enumerate(found, start=1)
    )
    _unique_keys(images, folder)
    return images


def load_cocostuff27(semantic_root: str) -> GroundTruth:
    """COCO-Stuff-27 semantic ground truth from a folder of COCO-Stuff label PNGs."""
    images = _label_files(semantic_root, ".png", "COCO-Stuff label PNGs")
    categories = tuple(
        Category(k + 1, name, k < COCOSTUFF27_THINGS) for k, name in enumerate(COCOSTUFF27_CLASSES)
    )
    semantic_of = {c.id: c.id - 1 for c in categories}
    return GroundTruth(
        "cocostuff27", semantic_root, categories, COCOSTUFF27_CLASSES, semantic_of, False, False,
        images,
    )  # fmt: skip


def load_cityscapes(gt_fine: str) -> GroundTruth:
    """Cityscapes panoptic, semantic and instance ground truth from a gtFine split folder."""
    images = _label_files(gt_fine, "_gtFine_instanceIds.png", "Cityscapes *_gtFine_instanceIds.png")
    categories = tuple(Category(i, name, thing) for i, name, thing in CITYSCAPES_CLASSES)
    classes = tuple(name for _, name, _ in CITYSCAPES_CLASSES)
    semantic_of = {c.id: k for k, c in enumerate(categories)}
    return GroundTruth("cityscapes", gt_fine, categories, classes, semantic_of, True, True, images)


def restrict(gt: GroundTruth, image_list: str) -> GroundTruth:
    """`gt` limited to the images named in a text file (one file name or stem a line, as
    STEGO's curated COCO-Stuff lists); a name that `gt` does not have is an error."""
    with fsspec.open(image_list, "rt") as fh:
        wanted = [image_key(s.strip()) for s in fh if s.strip() and not s.startswith("#")]
    have = {im.key for im in gt.images}
    missing = [w for w in wanted if w not in have]
    if missing:
        raise GroundTruthError(
            f"{image_list}: {len(missing)} images have no ground truth in {gt.source}, "
            f"e.g. {missing[:5]}"
        )
    keep = set(wanted)
    return replace(gt, images=tuple(im for im in gt.images if im.key in keep))


def write_coco_panoptic(
    json_path: str | Path,
    images: Sequence[tuple[dict[str, Any], np.ndarray, Sequence[dict[str, Any]]]],
    categories: Sequence[dict[str, Any]],
) -> Path:
    """Write a COCO panoptic set: `json_path` and its PNG folder (the path without ".json").

    `images`: (COCO image entry, int (H, W) segment ids with 0 void, segments_info) each;
    `categories`: COCO panoptic categories (id, name, isthing, supercategory). Local
    paths; files are written whole and renamed. Returns the PNG folder.
    """
    json_path = Path(json_path)
    root = json_path.with_suffix("")
    root.mkdir(parents=True, exist_ok=True)
    annotations = []
    for entry, segments, segments_info in images:
        png = panoptic_file_name(entry["file_name"])
        target = root / png
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(png_bytes(id_to_rgb(segments)))
        os.replace(tmp, target)
        annotations.append(panoptic_annotation(entry["id"], png, segments_info))
    data = panoptic_dataset([dict(e) for e, _, _ in images], annotations, categories)
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, json_path)
    return root
