"""Stage 5: panoptic pseudo labels, the merge of thing instances and stuff clusters.

The pure numeric core (`paint_instances`, `merge_panoptic`, `semantic_map`); no file I/O.
The COCO encoders of its result (panoptic PNG ids, panoptic and instances JSON) are
`u2seg.data.coco`; the stage that reads the earlier artifacts and writes these files is
`u2seg.stages.panoptic`.

Conventions (one set, used by every function here)
--------------------------------------------------
- Thing classes are the stage-3 pseudo classes 1..K; a thing segment's category_id is its
  class, isthing 1.
- Stuff clusters are the stage-4 labels c = 0..S-1 (k-means / cluster-probe indices). The
  stuff segment of cluster c has category_id K + 1 + c, isthing 0: docs/method.md's "K + c"
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
docs/method.md builds labels only for images with at least one pseudo instance. `merge_panoptic`
still accepts an empty instance list (the result is stuff only); the stage keeps an image
when `has_things(result)` is true, which also drops images whose every mask was empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SEMANTIC_THING = 0


SEMANTIC_VOID = 255


MAX_STUFF = 254  # semantic values 1..S must stay below the void value 255


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields, not objects
class Painting:
    """Instances painted by descending bbox area (smaller ones on top).

    index_map: int32 (H, W), the input index of the instance owning each pixel, -1 for none.
    order: input indices of the instances left with pixels, in painting order.
    dropped: input indices of the instances left with no pixel (empty, fully covered by
        smaller ones, or under `min_visible`), ascending.
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
    min_visible: float = 0.0,
) -> Painting:
    """Paint N bool masks (H, W) largest bbox first, so smaller instances overwrite larger.

    areas: the bbox area of each instance (e.g. w * h of its COCO bbox); computed from the
    masks by `box_areas` when None. Equal areas keep the input order (stable sort), so the
    later instance paints over the earlier one. shape (H, W) is needed only when there are
    no masks.
    min_visible: an instance is painted only if at least this share of its mask stays
    visible above the instances painted over it, and is dropped otherwise, so that its
    pixels go to the instances under it (or to stuff). Decided from the top (smallest box)
    down, each instance seeing only the kept ones above it. 0 keeps every instance, as
    docs/method.md stage 5 does; a mask that holds several smaller ones (a group beside its
    members) is then left as the fragments between them.
    """
    if not 0.0 <= min_visible <= 1.0:
        raise ValueError(f"min_visible must be in [0, 1], got {min_visible}")
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
    if min_visible > 0.0:
        free = np.ones((height, width), dtype=bool)
        kept = []
        for i in painting_order[::-1]:
            mask = np.asarray(masks[i], dtype=bool)
            size = np.count_nonzero(mask)
            if size and np.count_nonzero(mask & free) >= min_visible * size:
                kept.append(i)
                free &= ~mask
        painting_order = np.asarray(kept[::-1], dtype=np.int64)

    index_map = np.full((height, width), -1, dtype=np.int32)
    for i in painting_order:
        index_map[np.asarray(masks[i], dtype=bool)] = i
    owned = np.bincount(index_map.ravel() + 1, minlength=len(masks) + 1)[1:] > 0
    order = tuple(int(i) for i in painting_order if owned[i])
    dropped = tuple(int(i) for i in np.flatnonzero(~owned))
    return Painting(index_map, order, dropped)


def border_share(mask: np.ndarray) -> float:
    """The share of the frame's border pixels (outermost rows and columns of a bool (H, W)
    mask's frame) that the mask covers."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape[0] < 3 or mask.shape[1] < 3:
        return float(mask.mean()) if mask.size else 0.0
    edges = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(edges.mean())


def background_masks(masks: Sequence[np.ndarray], max_border: float) -> np.ndarray:
    """Which of one image's masks, listed best first, are background (bool (N,)): those
    covering at least `max_border` of the frame's border (sky, wall, floor, table run off
    the frame on several sides), except the first, the image's most object-like region (a
    close-up that fills the frame stays a thing). `max_border` 0 marks none."""
    flags = np.zeros(len(masks), dtype=bool)
    if max_border > 0:
        for i, mask in enumerate(masks[1:], start=1):
            flags[i] = border_share(mask) >= max_border
    return flags


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
    min_visible: float = 0.0,
    background: Sequence[bool] | np.ndarray | None = None,
) -> PanopticResult:
    """Merge thing instances and a stuff map into one panoptic label (docs/method.md stage 5).

    instance_masks: N bool (H, W) masks; instance_classes: their thing classes, 1..K.
    stuff: int (H, W) stuff clusters 0..S-1, or `void`. areas: bbox areas for the painting
    order (see `paint_instances`). background: N bools (`background_masks`); a background
    mask is painted in its place like the others, so that it hides what it covers, but the
    pixels it keeps are then left to the stuff map, and it is dropped.

    1. Instances are painted by descending bbox area; each instance left with pixels is a
       segment (ids 1..n in painting order), the others are dropped, and so is one that
       keeps less than `min_visible` of its mask (see `paint_instances`).
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
    painting = paint_instances(instance_masks, areas, labels.shape, min_visible)
    if background is not None:
        if len(background) != len(instance_masks):
            raise ValueError(f"{len(instance_masks)} masks but {len(background)} background flags")
        if np.any(background):  # the rule off (or nothing along the frame): nothing to undo
            painting = _release(painting, np.asarray(background, dtype=bool))

    # Segment id of each instance, looked up by index_map + 1 so that -1 (none) reads 0.
    thing_ids = np.zeros(len(instance_masks) + 1, dtype=np.int32)
    for j, i in enumerate(painting.order):
        thing_ids[i + 1] = j + 1
    painted = painting.index_map >= 0

    total = np.bincount(labels.ravel(), minlength=num_stuff + 1)[:num_stuff]
    covered = np.bincount(labels[painted], minlength=num_stuff + 1)[:num_stuff]
    # The ratio as docs/method.md writes it (not covered > 0.7 * total): a correctly rounded
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


def _release(painting: Painting, background: np.ndarray) -> Painting:
    """`painting` with the pixels of the `background` instances unpainted, and those dropped."""
    released = np.append(background, False)[painting.index_map]  # index -1 reads False
    return Painting(
        np.where(released, -1, painting.index_map).astype(np.int32),
        tuple(i for i in painting.order if not background[i]),
        tuple(sorted({*painting.dropped, *np.flatnonzero(background).tolist()})),
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


def combine_predictions(
    instance_masks: Sequence[np.ndarray],
    scores: Sequence[float] | np.ndarray,
    instance_classes: Sequence[int],
    semantic: np.ndarray,
    num_things: int,
    score_thresh: float = 0.5,
    overlap_thresh: float = 0.5,
    stuff_area: int = 4096,
) -> PanopticResult:
    """The panoptic output of a trained model (Panoptic FPN's inference merge).

    instance_masks: N bool (H, W) masks (probabilities thresholded at 0.5) with `scores`
    and thing classes 1..K; semantic: int (H, W) argmax of the semantic head, 0 things and
    1..S stuff. Instances in descending score while score >= `score_thresh`: one whose
    pixels are more than `overlap_thresh` already taken is dropped, else it takes its free
    pixels. Then each stuff class c >= 1 takes its free pixels as category K + c when they
    are at least `stuff_area` (smaller ones are `skipped_stuff`, their pixels void). The
    same conventions as `merge_panoptic` (stuff category K + 1 + cluster, cluster = c - 1).
    """
    if not len(instance_masks) == len(scores) == len(instance_classes):
        raise ValueError(
            f"{len(instance_masks)} masks, {len(scores)} scores, {len(instance_classes)} classes"
        )
    labels = np.asarray(semantic)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"semantic must be an integer (H, W) map, got {labels.dtype} {labels.shape}"
        )
    segments = np.zeros(labels.shape, dtype=np.int32)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    kept: list[int] = []
    categories: list[int] = []
    for i in order.tolist():
        if scores[i] < score_thresh:
            break
        mask = np.asarray(instance_masks[i], dtype=bool)
        if mask.shape != labels.shape:
            raise ValueError(f"mask {i} is {mask.shape}, the semantic map {labels.shape}")
        area = int(mask.sum())
        if area == 0:
            continue
        taken = mask & (segments > 0)
        if taken.sum() / area > overlap_thresh:
            continue
        segments[mask & ~taken] = len(kept) + 1
        kept.append(i)
        categories.append(int(instance_classes[i]))
    num_painted = len(kept)
    skipped = []
    for c in np.unique(labels).tolist():
        if c in (SEMANTIC_THING, SEMANTIC_VOID):
            continue
        free = (labels == c) & (segments == 0)
        if free.sum() < stuff_area:
            skipped.append(int(c) - 1)
            continue
        segments[free] = len(categories) + 1
        categories.append(num_things + int(c))
    things = [k < num_painted for k in range(len(categories))]
    return PanopticResult(
        segments=segments,
        segments_info=segment_infos(segments, categories, things),
        num_things=int(num_things),
        instance_index=tuple(kept),
        dropped=tuple(sorted(set(range(len(instance_masks))) - set(kept))),
        skipped_stuff=tuple(skipped),
    )
