"""Masks made elsewhere (CutLER's published pseudo masks, SAM, a labelling tool), checked
one annotation at a time before anything decodes them.

A COCO annotation's `segmentation` is compressed RLE (counts a string), uncompressed RLE
(counts a list) or polygons. pycocotools trusts its input: a compressed string whose runs do
not add up to the image corrupts memory as it decodes, and a 4-number polygon is read as a
box. So the runs are read and summed here first, and a row that is not a mask of the photo
is rejected with its reason (`MaskRejected`), never decoded and never a crash.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from u2seg.data.coco import rle_to_annotation
from u2seg.ops.maskcut import discovery_score

#: The annotation fields a pseudo-mask shard keeps (as MaskCut writes them).
KEPT = ("segmentation", "bbox", "area", "iscrowd", "category_id", "score")
#: How far (pixels) a polygon point or box edge may lie outside the photo: tools round.
SLACK = 1.0


class MaskRejected(ValueError):
    """One annotation is not a usable mask of its photo; the message is the reason."""


def rle_runs(counts: str) -> np.ndarray:
    """The run lengths of COCO's compressed RLE string (pycocotools' `rleFrString`): each
    run is 5-bit groups, low first, offset by 48 ('0'), bit 0x20 = more groups follow, bit
    0x10 of the last = negative; from the third run on, a run is stored as its difference
    to the run two before. `MaskRejected` for characters outside the alphabet or a string
    that ends mid-run."""
    codes = np.frombuffer(counts.encode("latin-1", "replace"), dtype=np.uint8).astype(np.int64)
    codes -= 48
    if codes.size and (codes.min() < 0 or codes.max() > 63):
        raise MaskRejected("bad RLE: characters outside COCO's alphabet")
    more = (codes & 0x20) != 0
    if codes.size and more[-1]:
        raise MaskRejected("bad RLE: the counts string ends inside a run")
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    digit = np.arange(codes.size) - np.repeat(starts, ends - starts + 1)
    if codes.size and digit.max() > 12:
        raise MaskRejected("bad RLE: a run longer than 64 bits")
    values = np.zeros(len(ends), dtype=np.int64)
    np.add.at(values, np.repeat(np.arange(len(ends)), ends - starts + 1),
              (codes & 0x1F) << (5 * digit))  # fmt: skip
    negative = (codes[ends] & 0x10) != 0
    values[negative] -= np.int64(1) << (5 * (digit[ends][negative] + 1))
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def _check_runs(runs: np.ndarray, height: int, width: int) -> None:
    if runs.size and runs.min() < 0:
        raise MaskRejected("bad RLE: a negative run")
    total = int(runs.sum())
    if total != height * width:
        raise MaskRejected(f"bad RLE: runs cover {total} pixels, the photo has {height * width}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _inside(x: float, y: float, width: int, height: int) -> bool:
    return x <= width + SLACK and y <= height + SLACK


def _polygons(segmentation: list[Any], height: int, width: int) -> dict[str, Any]:
    for poly in segmentation:
        if not isinstance(poly, list) or not all(_number(v) for v in poly):
            raise MaskRejected("a polygon that is not a list of numbers")
        if len(poly) % 2:
            raise MaskRejected(f"a polygon of {len(poly)} coordinates (x, y pairs expected)")
        if len(poly) < 6:
            raise MaskRejected(f"a polygon of {len(poly) // 2} points (3 at least)")
        xs, ys = np.asarray(poly[0::2]), np.asarray(poly[1::2])
        if min(xs.min(), ys.min()) < -SLACK or not _inside(xs.max(), ys.max(), width, height):
            raise MaskRejected(f"a polygon outside the {width}x{height} photo")
    if not segmentation:
        raise MaskRejected("an empty polygon list")
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _rle(segmentation: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_number(v) for v in size)):
        raise MaskRejected(f"bad RLE: size {size!r} is not [height, width]")
    if [int(v) for v in size] != [height, width]:
        raise MaskRejected(f"RLE of {int(size[1])}x{int(size[0])} for a {width}x{height} photo")
    if isinstance(counts, str):
        _check_runs(rle_runs(counts), height, width)
        return {"size": [height, width], "counts": counts}
    if isinstance(counts, list) and all(_number(v) and float(v).is_integer() for v in counts):
        _check_runs(np.asarray(counts, dtype=np.int64), height, width)
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    raise MaskRejected("bad RLE: counts is neither a string nor a list of whole numbers")


def _check_box(box: Any, height: int, width: int) -> None:
    if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
        raise MaskRejected(f"bbox {box!r} is not [x, y, width, height]")
    x, y, w, h = box
    if min(w, h) < 0 or min(x, y) < -SLACK or not _inside(x + w, y + h, width, height):
        raise MaskRejected(f"bbox {box} outside the {width}x{height} photo")


def to_mask_rle(ann: Any, height: int, width: int) -> dict[str, Any]:
    """The compressed RLE (counts a string) of one foreign annotation on a `height` x
    `width` photo; `MaskRejected` naming why it is not a mask of that photo."""
    if not isinstance(ann, dict):
        raise MaskRejected(f"an annotation that is not an object: {ann!r:.60}")
    if ann.get("iscrowd"):
        raise MaskRejected("a crowd region (iscrowd=1), not one object")
    if "bbox" in ann:
        _check_box(ann["bbox"], height, width)
    if "score" in ann and not _number(ann["score"]):
        raise MaskRejected(f"score {ann['score']!r} is not a number")
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        return _polygons(segmentation, height, width)
    if isinstance(segmentation, dict):
        return _rle(segmentation, height, width)
    raise MaskRejected("no segmentation (RLE or polygons)")


def pseudo_masks(
    anns: list[Any], height: int, width: int
) -> tuple[list[dict[str, Any]], list[tuple[Any, str]]]:
    """The annotations of one photo as MaskCut's pseudo masks, best first, and the rejected
    ones as (their id, reason).

    Ranked by their `score` where they have one (highest first; ties and the unscored keep
    the file's order, the unscored after the scored); the score is kept, and a mask
    without one gets the score of its rank, as MaskCut's cuts do (`discovery_score`)."""
    good: list[tuple[dict[str, Any], float | None]] = []
    rejected: list[tuple[Any, str]] = []
    for ann in anns:
        try:
            rle = to_mask_rle(ann, height, width)
            kept = rle_to_annotation(rle, 0, 0)
        except MaskRejected as exc:
            rejected.append((ann.get("id") if isinstance(ann, dict) else None, str(exc)))
            continue
        except ValueError:  # rle_to_annotation: no pixel set
            rejected.append((ann.get("id"), "an empty mask"))
            continue
        score = ann.get("score")
        good.append((kept, None if score is None else float(score)))
    order = sorted(range(len(good)), key=lambda i: (good[i][1] is None, -(good[i][1] or 0.0), i))
    masks = []
    for rank, i in enumerate(order):
        kept, score = good[i]
        kept["score"] = discovery_score(rank) if score is None else score
        masks.append({k: kept[k] for k in KEPT})
    return masks, rejected
