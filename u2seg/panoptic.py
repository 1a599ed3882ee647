"""Stage 5: panoptic pseudo labels, the merge of thing instances and stuff clusters.

A pure numeric core (`paint_instances`, `merge_panoptic`, `semantic_map`) and the COCO
encoders of its result (panoptic PNG ids, panoptic and instances JSON). No file I/O: the
stage that reads the earlier artifacts and writes these files lives elsewhere.

Conventions (one set, used by every function here)
--------------------------------------------------
- Thing classes are the stage-3 pseudo classes 1..K; a thing segment's category_id is its
  class, isthing 1.
- Stuff clusters are the stage-4 labels c = 0..S-1 (k-means / cluster-probe indices). The
  stuff segment of cluster c has category_id K + 1 + c, isthing 0: METHOD.md's "K + c"
  counts c from 1, this module counts it from 0, and both give categories K+1..K+S.
- A pixel of the stuff map equal to `void` (default 255, the value a uint8 label PNG keeps
  free; -1 works as well) belongs to no cluster. Any other value outside 0..S-1 is an error.
- Segment ids are per image: 1..n for the painted instances in painting order (descending
  bbox area), then one id per kept stuff cluster in increasing c. 0 is void.
- Semantic PNG values (detectron2's "separated" format): every thing pixel 0, a pixel of
  the stuff segment of cluster c is c + 1 (1..S), everything else 255, including the free
  pixels of a stuff cluster skipped by the overlap rule (void in the panoptic map too).
  So S <= 254.
- Panoptic PNG: segment id -> RGB with id = R + 256 G + 256^2 B (panopticapi's
  `id2rgb` / `rgb2id`), named like the image with the extension replaced by ".png".

Images without instances
------------------------
METHOD.md builds labels only for images with at least one pseudo instance. `merge_panoptic`
still accepts an empty instance list (the result is stuff only); the stage keeps an image
when `has_things(result)` is true, which also drops images whose every mask was empty.

Instances JSON
--------------
`instances_from_panoptic` writes each thing segment as a COCO instance with its pseudo class
(category_id 1..K, RLE). By default it writes the *visible* part (the pixels the segment
owns in the panoptic map), so the instances JSON, the semantic PNG's thing pixels (0) and
the panoptic PNG all agree. Upstream U2Seg (generate_classaware_instanceseg_annotations.py)
writes the whole pre-merge masks instead, including instances the merge drops; pass
`instance_masks` to write whole masks (of the kept instances only).

Training with detectron2 (PanopticFPN, "separated" dataset)
-----------------------------------------------------------
`detectron2.data.datasets.register_coco_panoptic_separated(name, metadata, image_root,
panoptic_root, panoptic_json, sem_seg_root, instances_json)` takes our files as:

- image_root: the folder of the photos themselves.
- panoptic_root: the panoptic PNG folder (`id_to_rgb` of `result.segments`, one PNG per
  image named by `panoptic_file_name`); panoptic_json: the `panoptic_dataset` JSON whose
  annotations come from `panoptic_annotation`. The training loader does not read them:
  they are the ground truth of detectron2's COCOPanopticEvaluator.
- sem_seg_root: the semantic PNG folder (`semantic_map`, saved as a single-channel 8-bit
  PNG, same file names as the panoptic PNGs). This is exactly what detectron2's
  `datasets/prepare_panoptic_fpn.py` derives from a COCO panoptic JSON: thing categories
  to 0, stuff categories to 1..S in category order, void (segment id 0) to 255.
- instances_json: the `instances_dataset` JSON (thing categories 1..K only).

What detectron2 expects of these (read from its `coco_panoptic.py` and `coco.py`):

- `load_sem_seg(sem_seg_root, image_root)` is called with its defaults gt_ext="png",
  image_ext="jpg", lists both folders without recursing and pairs files by name without
  extension. So the photos must be flat ".jpg" files in image_root, and every PNG must
  be named `<photo stem>.png` (`panoptic_file_name`). Other photos in image_root are
  ignored (detectron2 takes the intersection and logs a warning).
- `merge_to_panoptic` looks up every image of the instances JSON among the semantic PNGs:
  the instances JSON must list exactly the images that have PNGs (the kept images), with
  `file_name` relative to image_root.
- Masks are RLE, so the config needs INPUT.MASK_FORMAT = "bitmask" (the default
  "polygon" rejects RLE).
- Metadata (`detectron2_metadata(K, S, categories)` builds it):
  thing_classes: the instances JSON category names in id order (load_coco_json sets the
  same key on the registered name and detectron2 asserts that both values are equal);
  thing_dataset_id_to_contiguous_id {k: k - 1}; stuff_classes ["things", S stuff names];
  stuff_dataset_id_to_contiguous_id {0: 0, K + 1 + c: c + 1}, the inverse of which is how
  the panoptic evaluator turns the semantic head's class c + 1 back into category K + 1 + c
  (PanopticFPN skips semantic class 0, the things class).
- Model: ROI_HEADS.NUM_CLASSES = K, SEM_SEG_HEAD.NUM_CLASSES = S + 1,
  SEM_SEG_HEAD.IGNORE_VALUE = 255 (the default). Train on `name + "_separated"`;
  `name + "_stuffonly"` is registered too (semantic only).

For example::

    cats = panoptic_categories(K, S)
    register_coco_panoptic_separated(
        "u2seg_train", detectron2_metadata(K, S, cats), "photos/", "panoptic/",
        "panoptic.json", "semantic/", "instances.json")
    cfg.DATASETS.TRAIN = ("u2seg_train_separated",)
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from u2seg.refine import mask_to_annotation

SEMANTIC_THING = 0
SEMANTIC_VOID = 255
MAX_STUFF = 254  # semantic values 1..S must stay below the void value 255
MAX_SEGMENT_ID = 256**3 - 1  # three 8-bit channels


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields, not objects
class Painting:
    """Instances painted by descending bbox area (smaller ones on top).

    index_map: int32 (H, W), the input index of the instance owning each pixel, -1 for none.
    order: input indices of the instances left with pixels, in painting order.
    dropped: input indices of the instances left with no pixel (empty or fully covered by
        smaller ones), ascending.
    """

    index_map: np.ndarray
    order: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class PanopticResult:
    """One image's panoptic pseudo label.

    segments: int32 (H, W) segment ids, 0 = void.
    segments_info: one COCO panoptic segment dict per id 1..n, in id order: id,
        category_id, isthing, area, bbox [x, y, w, h] (ints), iscrowd 0.
    num_things: K, so that stuff categories K + 1 + c map back to clusters c.
    instance_index: input index of the instance of each thing segment (thing segment id
        j + 1 is instance `instance_index[j]`).
    dropped: input indices of instances the painting left without pixels.
    skipped_stuff: stuff clusters present in the image but more than `stuff_overlap`
        covered by instances (their free pixels are void).
    """

    segments: np.ndarray
    segments_info: list[dict[str, Any]]
    num_things: int
    instance_index: tuple[int, ...]
    dropped: tuple[int, ...]
    skipped_stuff: tuple[int, ...]


def box_areas(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Bounding-box areas, int64 (N,), of N bool masks (H, W); 0 for an empty mask.

    The box is the inclusive pixel extent, so w = x_max - x_min + 1 (the width pycocotools'
    `toBbox` gives for the same mask, hence the bbox area of the instance annotation).
    """
    areas = np.zeros(len(masks), dtype=np.int64)
    for i, mask in enumerate(masks):
        rows = np.flatnonzero(np.any(mask, axis=1))
        if rows.size:
            cols = np.flatnonzero(np.any(mask, axis=0))
            areas[i] = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    return areas


def paint_instances(
    masks: Sequence[np.ndarray],
    areas: Sequence[float] | np.ndarray | None = None,
    shape: tuple[int, int] | None = None,
) -> Painting:
    """Paint N bool masks (H, W) largest bbox first, so smaller instances overwrite larger.

    areas: the bbox area of each instance (e.g. w * h of its COCO bbox); computed from the
    masks by `box_areas` when None. Equal areas keep the input order (stable sort), so the
    later instance paints over the earlier one. shape (H, W) is needed only when there are
    no masks.
    """
    if not len(masks):
        if shape is None:
            raise ValueError("paint_instances needs `shape` when there are no masks")
        return Painting(np.full(shape, -1, dtype=np.int32), (), ())
    height, width = np.shape(masks[0])
    if shape is not None and tuple(shape) != (height, width):
        raise ValueError(f"masks have shape {(height, width)}, expected {tuple(shape)}")
    for i, mask in enumerate(masks):
        if np.shape(mask) != (height, width):
            raise ValueError(f"mask {i} has shape {np.shape(mask)}, expected {(height, width)}")
    area = box_areas(masks) if areas is None else np.asarray(areas, dtype=np.float64)
    if area.shape != (len(masks),):
        raise ValueError(f"{len(masks)} masks but areas of shape {area.shape}")
    painting_order = np.argsort(-area, kind="stable")

    index_map = np.full((height, width), -1, dtype=np.int32)
    for i in painting_order:
        index_map[np.asarray(masks[i], dtype=bool)] = i
    owned = np.bincount(index_map.ravel() + 1, minlength=len(masks) + 1)[1:] > 0
    order = tuple(int(i) for i in painting_order if owned[i])
    dropped = tuple(int(i) for i in np.flatnonzero(~owned))
    return Painting(index_map, order, dropped)


def segment_boxes(segments: np.ndarray, num_ids: int) -> np.ndarray:
    """COCO boxes [x, y, w, h], int64 (num_ids + 1, 4), of ids 0..num_ids in an int (H, W) map.

    Row k is id k's inclusive pixel extent (w = x_max - x_min + 1); zeros for an absent id.
    One scatter of the map into per-id row and column occupancy instead of one full-image
    comparison per id, so the cost does not grow with the number of segments.
    """
    height, width = segments.shape
    rows = np.zeros((num_ids + 1, height), dtype=bool)
    cols = np.zeros((num_ids + 1, width), dtype=bool)
    rows[segments, np.arange(height)[:, None]] = True
    cols[segments, np.arange(width)[None, :]] = True
    present = rows.any(axis=1)
    y0 = rows.argmax(axis=1)
    y1 = height - 1 - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = width - 1 - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], axis=1).astype(np.int64)
    boxes[~present] = 0
    return boxes


def segment_infos(
    segments: np.ndarray, categories: Sequence[int], things: Sequence[bool]
) -> list[dict[str, Any]]:
    """COCO panoptic `segments_info` of ids 1..n in an int (H, W) map: id k has category
    `categories[k - 1]` and isthing `things[k - 1]`; area and bbox (`segment_boxes`) from
    the pixels, iscrowd 0. Ids without pixels are left out."""
    num_segments = len(categories)
    area = np.bincount(segments.ravel(), minlength=num_segments + 1)
    boxes = segment_boxes(segments, num_segments)
    return [
        {
            "id": k,
            "category_id": int(categories[k - 1]),
            "isthing": int(things[k - 1]),
            "area": int(area[k]),
            "bbox": [int(v) for v in boxes[k]],
            "iscrowd": 0,
        }
        for k in range(1, num_segments + 1)
        if area[k]
    ]


def _check_stuff(stuff: np.ndarray, num_stuff: int, void: int) -> np.ndarray:
    """int64 (H, W) copy of the stuff map with void pixels set to `num_stuff` (a spare bin)."""
    if not 1 <= num_stuff <= MAX_STUFF:
        raise ValueError(f"num_stuff must be in 1..{MAX_STUFF} (semantic PNG), got {num_stuff}")
    if 0 <= void < num_stuff:
        raise ValueError(f"void value {void} collides with stuff clusters 0..{num_stuff - 1}")
    labels = np.asarray(stuff)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"stuff must be an integer (H, W) map, got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    is_void = labels == void
    bad = ~is_void & ((labels < 0) | (labels >= num_stuff))
    if bad.any():
        raise ValueError(
            f"stuff values must be 0..{num_stuff - 1} or void {void}, found {labels[bad][0]}"
        )
    labels[is_void] = num_stuff
    return labels


def merge_panoptic(
    instance_masks: Sequence[np.ndarray],
    instance_classes: Sequence[int],
    stuff: np.ndarray,
    num_things: int,
    num_stuff: int,
    stuff_overlap: float = 0.7,
    void: int = 255,
    areas: Sequence[float] | np.ndarray | None = None,
) -> PanopticResult:
    """Merge thing instances and a stuff map into one panoptic label (METHOD.md stage 5).

    instance_masks: N bool (H, W) masks; instance_classes: their thing classes, 1..K.
    stuff: int (H, W) stuff clusters 0..S-1, or `void`. areas: bbox areas for the painting
    order (see `paint_instances`).

    1. Instances are painted by descending bbox area; each instance left with pixels is a
       segment (ids 1..n in painting order), the others are dropped.
    2. For each stuff cluster c, in increasing c: if the painted share of its pixels,
       |stuff == c and painted| / |stuff == c|, is greater than `stuff_overlap` (strictly:
       exactly 0.7 is kept), c is skipped and its free pixels stay void; otherwise its
       free pixels become one segment of category K + 1 + c, unless there are none.
    """
    if len(instance_classes) != len(instance_masks):
        raise ValueError(f"{len(instance_masks)} masks but {len(instance_classes)} classes")
    classes = np.asarray(instance_classes, dtype=np.int64).reshape(-1)
    if classes.size and (classes.min() < 1 or classes.max() > num_things):
        raise ValueError(f"thing classes must be in 1..{num_things}, got {classes.tolist()}")
    if not 0.0 <= stuff_overlap <= 1.0:
        raise ValueError(f"stuff_overlap must be in [0, 1], got {stuff_overlap}")
    labels = _check_stuff(stuff, num_stuff, void)
    painting = paint_instances(instance_masks, areas, shape=labels.shape)

    # Segment id of each instance, looked up by index_map + 1 so that -1 (none) reads 0.
    thing_ids = np.zeros(len(instance_masks) + 1, dtype=np.int32)
    for j, i in enumerate(painting.order):
        thing_ids[i + 1] = j + 1
    painted = painting.index_map >= 0

    total = np.bincount(labels.ravel(), minlength=num_stuff + 1)[:num_stuff]
    covered = np.bincount(labels[painted], minlength=num_stuff + 1)[:num_stuff]
    # The ratio as METHOD.md writes it (not covered > 0.7 * total): a correctly rounded
    # quotient equals the literal 0.7 exactly when covered / total is 7/10.
    with np.errstate(divide="ignore", invalid="ignore"):
        share = covered / total
    present = total > 0
    skipped = present & (share > stuff_overlap)
    kept = present & ~skipped & (covered < total)

    num_painted = len(painting.order)
    stuff_ids = np.zeros(num_stuff + 1, dtype=np.int32)  # last bin: void
    kept_clusters = np.flatnonzero(kept)
    stuff_ids[kept_clusters] = num_painted + 1 + np.arange(kept_clusters.size, dtype=np.int32)
    segments = np.where(painted, thing_ids[painting.index_map + 1], stuff_ids[labels])
    segments = segments.astype(np.int32, copy=False)

    categories = [int(classes[i]) for i in painting.order]
    categories += [num_things + 1 + int(c) for c in kept_clusters]
    things = [k < num_painted for k in range(len(categories))]
    return PanopticResult(
        segments=segments,
        segments_info=segment_infos(segments, categories, things),
        num_things=int(num_things),
        instance_index=painting.order,
        dropped=painting.dropped,
        skipped_stuff=tuple(int(c) for c in np.flatnonzero(skipped)),
    )


def has_things(result: PanopticResult) -> bool:
    """True when the image has at least one thing segment: the stage keeps only these."""
    return any(info["isthing"] for info in result.segments_info)


def semantic_map(result: PanopticResult) -> np.ndarray:
    """uint8 (H, W) semantic label: things 0, stuff cluster c -> c + 1 (1..S), void 255."""
    lut = np.full(len(result.segments_info) + 1, SEMANTIC_VOID, dtype=np.uint8)
    for info in result.segments_info:
        value = SEMANTIC_THING if info["isthing"] else info["category_id"] - result.num_things
        lut[info["id"]] = value
    return lut[result.segments]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids, int (H, W) in 0..256^3-1 -> uint8 (H, W, 3): id = R + 256 G + 256^2 B."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"segment ids must be in 0..{MAX_SEGMENT_ID}")
    ids = ids.astype(np.int64)
    return np.stack([(ids >> shift) & 0xFF for shift in (0, 8, 16)], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) panoptic PNG pixels -> int32 (H, W) ids, R + 256 G + 256^2 B."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def panoptic_file_name(image_file_name: str) -> str:
    """PNG name of an image's panoptic and semantic labels: same path, extension ".png"."""
    return PurePosixPath(image_file_name).with_suffix(".png").as_posix()


def panoptic_annotation(
    image_id: int, file_name: str, segments_info: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """COCO panoptic "annotations" entry; `file_name` is the panoptic PNG's name."""
    return {
        "image_id": int(image_id),
        "file_name": file_name,
        "segments_info": [dict(info) for info in segments_info],
    }


def _colors(n: int, offset: float) -> list[list[int]]:
    """n distinct saturated RGB colours, golden-ratio hues starting at `offset`."""
    hues = (offset + 0.618033988749895 * np.arange(n)) % 1.0
    return [[int(round(255 * v)) for v in colorsys.hsv_to_rgb(h, 0.75, 0.95)] for h in hues]


def panoptic_categories(
    num_things: int,
    num_stuff: int,
    thing_names: Sequence[str] | None = None,
    stuff_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """COCO panoptic categories: things 1..K (isthing 1), stuff K+1..K+S (isthing 0).

    Default names "thing-k" for class k and "stuff-c" for cluster c (the stage-4 label), so
    a category is traceable to the clustering that made it. Each has a fixed colour (used
    by panopticapi's visualisation for stuff).
    """
    if thing_names is None:
        thing_names = [f"thing-{k}" for k in range(1, num_things + 1)]
    if stuff_names is None:
        stuff_names = [f"stuff-{c}" for c in range(num_stuff)]
    if len(thing_names) != num_things or len(stuff_names) != num_stuff:
        raise ValueError(
            f"need {num_things} thing and {num_stuff} stuff names, "
            f"got {len(thing_names)} and {len(stuff_names)}"
        )
    colors = _colors(num_things, 0.0) + _colors(num_stuff, 0.5)
    names = list(thing_names) + list(stuff_names)
    return [
        {
            "id": k,
            "name": names[k - 1],
            "supercategory": "thing" if k <= num_things else "stuff",
            "isthing": int(k <= num_things),
            "color": colors[k - 1],
        }
        for k in range(1, num_things + num_stuff + 1)
    ]


def panoptic_dataset(
    images: Sequence[dict[str, Any]],
    annotations: Sequence[dict[str, Any]],
    categories: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """COCO panoptic JSON dict: images (`refine.image_info`), annotations
    (`panoptic_annotation`), categories (`panoptic_categories`)."""
    return {
        "info": {"description": "U2Seg panoptic pseudo labels"},
        "licenses": [],
        "images": list(images),
        "annotations": list(annotations),
        "categories": list(categories),
    }


def instances_dataset(
    images: Sequence[dict[str, Any]],
    annotations: Sequence[dict[str, Any]],
    categories: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """COCO instances JSON dict with the thing categories (1..K) of `categories` only.

    detectron2's `load_coco_json` makes its class list from these categories; stuff
    categories here would become extra instance classes.
    """
    return {
        "info": {"description": "U2Seg instance pseudo labels"},
        "licenses": [],
        "images": list(images),
        "annotations": list(annotations),
        "categories": [dict(c) for c in categories if c["isthing"]],
    }


def instances_from_panoptic(
    result: PanopticResult,
    image_id: int,
    first_annotation_id: int,
    instance_masks: Sequence[np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """COCO instance annotations (RLE, category_id = pseudo class 1..K) of the thing segments.

    Ids first_annotation_id, +1, ... in segment order. Each mask is the segment's visible
    pixels in `result.segments`, or, when the merge's `instance_masks` are passed, the whole
    input mask of that instance (upstream's choice: masks may then overlap).
    """
    annotations = []
    height, width = result.segments.shape
    things = [info for info in result.segments_info if info["isthing"]]
    for j, info in enumerate(things):
        if instance_masks is not None:
            mask = np.asarray(instance_masks[result.instance_index[j]], dtype=bool)
        else:
            # Compare inside the segment's box only: a thing is small next to the image.
            x, y, w, h = info["bbox"]
            mask = np.zeros((height, width), dtype=bool)
            mask[y : y + h, x : x + w] = result.segments[y : y + h, x : x + w] == info["id"]
        annotations.append(
            mask_to_annotation(mask, image_id, first_annotation_id + j, info["category_id"])
        )
    return annotations


def detectron2_metadata(
    num_things: int, num_stuff: int, categories: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Metadata for `register_coco_panoptic_separated` (see the module docstring).

    thing ids 1..K -> contiguous 0..K-1; stuff category K+1+c -> semantic class c+1, and 0 ->
    0 for the merged "things" class, as detectron2's COCO metadata does.
    """
    by_id = {c["id"]: c for c in categories}
    things = [by_id[k] for k in range(1, num_things + 1)]
    stuff = [by_id[num_things + 1 + c] for c in range(num_stuff)]
    stuff_map = {0: 0} | {num_things + 1 + c: c + 1 for c in range(num_stuff)}
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [list(c["color"]) for c in things],
        "thing_dataset_id_to_contiguous_id": {k: k - 1 for k in range(1, num_things + 1)},
        "stuff_classes": ["things"] + [c["name"] for c in stuff],
        "stuff_colors": [[128, 128, 128]] + [list(c["color"]) for c in stuff],
        "stuff_dataset_id_to_contiguous_id": stuff_map,
    }
