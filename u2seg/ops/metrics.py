"""Numeric cores of unsupervised evaluation (docs/method.md stage 7); no file I/O.

Unsupervised predictions carry cluster ids, not ground-truth classes, so every score here
first needs a map from predicted ids to GT classes. Both maps are fit on the evaluation
set itself (transductive, as in STEGO and U2Seg):

- Semantic (STEGO's COCO-Stuff-27 protocol): a pixel confusion matrix (predicted clusters
  x GT classes) accumulated over the set, then a one-to-one Hungarian assignment that
  maximises matched pixels (`hungarian_match`), or many-to-one majority
  (`majority_match`) when there are more clusters than classes. `semantic_scores` gives
  mIoU and pixel accuracy in %.
- Instance (U2Seg): each prediction with score >= 0.6 votes for the class of its
  best-matching GT box when that box IoU is > 0.7; each predicted class maps to its
  most-voted GT class, classes without a vote are dropped (`majority_vote_mapping`).
- Panoptic quality, the COCO definition as panopticapi's `pq_compute_single_core`
  computes it (`pq_stats` per image, summed, then `pq_summary`).

Mappings are plain ``dict[int, int]`` (predicted id -> GT class; an absent key means
unmatched). They survive a JSON round trip: every function that takes a mapping also
accepts the string keys ``json.loads`` gives back, so a map fit on one split can score
another.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

# panopticapi's id of unlabelled pixels, in ground truth and predictions alike.
VOID = 0

ClassMapping = Mapping[int, int] | Mapping[str, int]


# --------------------------------------------------------------------------- checks


def _check_same_shape(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} has shape {a.shape} but {b_name} has shape {b.shape}; they must match"
        )


def _check_integer(a: np.ndarray, name: str) -> None:
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{name} must hold integer ids, got dtype {a.dtype}")


def _check_range(values: np.ndarray, low: int, high: int, name: str) -> None:
    """Every value in [low, high); names the offending extremes otherwise."""
    if values.size == 0:
        return
    vmin, vmax = int(values.min()), int(values.max())
    if vmin < low or vmax >= high:
        raise ValueError(f"{name} ids must lie in [{low}, {high}), got min {vmin}, max {vmax}")


def normalise_mapping(mapping: ClassMapping) -> dict[int, int]:
    """A predicted id -> GT class map (semantic or instance) with int keys and values.

    Takes what ``json.loads`` gives back (str keys); -1 or None values mean unmatched
    and are left out, like absent keys.
    """
    out: dict[int, int] = {}
    for key, value in mapping.items():
        if value is None or int(value) < 0:
            continue
        out[int(key)] = int(value)
    return out


# ------------------------------------------------------------------------- semantic


@dataclass
class ConfusionMatrix:
    """Pixel counts of shape (num_clusters, num_classes): row = predicted, column = GT.

    Sums of per-image or per-worker matrices are the matrix of the whole set, so large
    sets are streamed: `update` per image, `merge` (or ``+``) across workers.
    """

    num_clusters: int
    num_classes: int
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.num_clusters < 1 or self.num_classes < 1:
            raise ValueError(
                f"need at least one cluster and one class, got num_clusters="
                f"{self.num_clusters}, num_classes={self.num_classes}"
            )
        self.counts = np.zeros((self.num_clusters, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray, ignore: int = 255) -> ConfusionMatrix:
        """Add one image: `pred` (H, W) cluster ids in [0, num_clusters), `gt` (H, W)
        class ids in [0, num_classes) or `ignore` (void pixels, skipped). Returns self."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        _check_same_shape(pred, gt, "pred", "gt")
        _check_integer(pred, "pred")
        _check_integer(gt, "gt")
        valid = gt != ignore
        p = pred[valid].astype(np.int64)
        g = gt[valid].astype(np.int64)
        _check_range(p, 0, self.num_clusters, "pred")
        _check_range(g, 0, self.num_classes, f"gt (ignore={ignore} excluded)")
        # One bincount over joint ids is the fast way to a 2-D histogram.
        flat = np.bincount(p * self.num_classes + g, minlength=self.counts.size)
        self.counts += flat.reshape(self.counts.shape)
        return self

    def add(self, pred: np.ndarray, gt: np.ndarray, counts: np.ndarray) -> ConfusionMatrix:
        """Add `counts` pixels at each (pred[k], gt[k]): counts already tallied elsewhere
        (e.g. from segment overlaps). Returns self."""
        pred, gt = np.asarray(pred, dtype=np.int64), np.asarray(gt, dtype=np.int64)
        _check_range(pred, 0, self.num_clusters, "pred")
        _check_range(gt, 0, self.num_classes, "gt")
        np.add.at(self.counts, (pred, gt), np.asarray(counts, dtype=np.int64))
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add `other`'s counts into self (same shape required). Returns self."""
        if self.counts.shape != other.counts.shape:
            raise ValueError(
                f"cannot merge confusion matrices of shapes {self.counts.shape} "
                f"and {other.counts.shape}"
            )
        self.counts += other.counts
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        out = ConfusionMatrix(self.num_clusters, self.num_classes)
        out.counts = self.counts.copy()
        return out.merge(other)


def _counts(confusion: ConfusionMatrix | np.ndarray) -> np.ndarray:
    counts = confusion.counts if isinstance(confusion, ConfusionMatrix) else confusion
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"confusion must be 2-D (clusters, classes), got shape {counts.shape}")
    if counts.size and counts.min() < 0:
        raise ValueError("confusion counts must be non-negative")
    return counts


def hungarian_match(confusion: ConfusionMatrix | np.ndarray) -> dict[int, int]:
    """One-to-one cluster -> class map maximising matched pixels (STEGO).

    `confusion`: (num_clusters, num_classes) counts. With more clusters than classes the
    surplus clusters are left out of the map (unmatched: their pixels count as wrong);
    with fewer, some classes get no cluster.
    """
    counts = _counts(confusion)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols, strict=True)}


def majority_match(confusion: ConfusionMatrix | np.ndarray) -> dict[int, int]:
    """Many-to-one map: each cluster -> the GT class it overlaps most.

    `confusion`: (num_clusters, num_classes) counts. Clusters with no counted pixel are
    left out (there is nothing to vote with); ties go to the lowest class id.
    """
    counts = _counts(confusion)
    seen = counts.sum(axis=1) > 0
    best = counts.argmax(axis=1)
    return {int(k): int(best[k]) for k in np.flatnonzero(seen)}


def apply_mapping(pred: np.ndarray, mapping: ClassMapping, unmatched: int = 255) -> np.ndarray:
    """Cluster ids (any shape, non-negative) -> GT class ids of the same shape.

    Ids without an entry in `mapping` (unmatched clusters, or ids never seen when the map
    was fit on another split) become `unmatched`.
    """
    pred = np.asarray(pred)
    _check_integer(pred, "pred")
    if pred.size and int(pred.min()) < 0:
        raise ValueError(f"pred ids must be non-negative, got min {int(pred.min())}")
    table_map = normalise_mapping(mapping)
    size = max([int(pred.max()) + 1 if pred.size else 0, *(k + 1 for k in table_map)])
    table = np.full(size, unmatched, dtype=np.int64)
    for k, v in table_map.items():
        table[k] = v
    return table[pred.astype(np.int64)]


MIOU_RULES = ("defined", "present")


def semantic_scores(
    confusion: ConfusionMatrix | np.ndarray, mapping: ClassMapping, rule: str = "defined"
) -> dict[str, float | list[float]]:
    """mIoU, pixel accuracy and per-class IoU (all in %) of mapped clusters.

    `confusion`: (num_clusters, num_classes) counts, `mapping`: cluster -> class. Pixels
    of unmatched clusters count as wrong (a FN of their GT class). `rule`: which classes
    mIoU averages. "defined" (STEGO's and mmseg's): every class whose IoU is defined, i.e.
    present in the ground truth or claimed by a mapped cluster, so a cluster mapped to a
    class absent from the evaluated images scores that class 0; "present": only the
    classes present in the ground truth. `per_class_iou` has one entry per class, NaN
    where the IoU is undefined (neither in the ground truth nor predicted).
    """
    if rule not in MIOU_RULES:
        raise ValueError(f"mIoU rule {rule!r} is not one of {', '.join(MIOU_RULES)}")
    counts = _counts(confusion)
    num_clusters, num_classes = counts.shape
    table_map = normalise_mapping(mapping)
    for k, v in table_map.items():
        if not (0 <= k < num_clusters and v < num_classes):
            raise ValueError(
                f"mapping {k} -> {v} is outside the confusion matrix of shape {counts.shape}"
            )
    # Collapse clusters onto their classes: (num_classes, num_classes), row = predicted.
    mapped = np.zeros((num_classes, num_classes), dtype=np.int64)
    for k, v in table_map.items():
        mapped[v] += counts[k]
    tp = np.diag(mapped).astype(np.float64)
    gt_total = counts.sum(axis=0).astype(np.float64)
    pred_total = mapped.sum(axis=1).astype(np.float64)
    union = gt_total + pred_total - tp
    defined = union > 0
    iou = np.full(num_classes, np.nan)
    iou[defined] = tp[defined] / union[defined]
    averaged = defined if rule == "defined" else gt_total > 0
    total = float(counts.sum())
    return {
        "mIoU": 100.0 * float(iou[averaged].mean()) if averaged.any() else float("nan"),
        "pixel_accuracy": 100.0 * float(tp.sum()) / total if total else float("nan"),
        "per_class_iou": [100.0 * float(x) for x in iou],
    }


# ------------------------------------------------------------------------- instance


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes `a` (N, 4) and `b` (M, 4), both COCO xywh, as (N, M) float64.

    Degenerate boxes (zero area on both sides) give IoU 0, not NaN.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if (a[:, 2:] < 0).any() or (b[:, 2:] < 0).any():
        raise ValueError("box widths and heights must be non-negative (xywh)")
    ax1, ay1, ax2, ay2 = a[:, 0], a[:, 1], a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx1, by1, bx2, by2 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(ax1[:, None], bx1[None]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(ay1[:, None], by1[None]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


VOTE_RULES = ("every", "best")


def gt_matches(
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    pred_boxes: np.ndarray,
    pred_classes: np.ndarray,
    pred_scores: np.ndarray,
    rule: str = "every",
    min_iou: float = 0.7,
) -> Iterator[tuple[int, int, float, float]]:
    """Votes of one image: (pred_class, gt_class, score, box_iou) tuples.

    `gt_boxes` (M, 4) xywh with `gt_classes` (M,); `pred_boxes` (N, 4) xywh with
    `pred_classes` and `pred_scores` (N,). `rule` "every" (U2Seg's `do_hangarain_mapping`):
    a prediction votes for every GT box it overlaps with box IoU > `min_iou`, so pass all
    GT boxes, crowd ones included; "best": each prediction is paired with the GT box it
    overlaps most (first one on ties), whatever the IoU (pass the non-crowd boxes). The
    score threshold, and for "best" the IoU one, are applied by `majority_vote_mapping`.
    """
    if rule not in VOTE_RULES:
        raise ValueError(f"vote rule {rule!r} is not one of {', '.join(VOTE_RULES)}")
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    pred_boxes = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    gt_classes, pred_classes = np.asarray(gt_classes), np.asarray(pred_classes)
    pred_scores = np.asarray(pred_scores, dtype=np.float64)
    if gt_classes.shape != (len(gt_boxes),):
        raise ValueError(
            f"gt_classes has shape {gt_classes.shape}, expected ({len(gt_boxes)},) "
            f"for gt_boxes of shape {gt_boxes.shape}"
        )
    if pred_classes.shape != (len(pred_boxes),) or pred_scores.shape != (len(pred_boxes),):
        raise ValueError(
            f"pred_classes {pred_classes.shape} and pred_scores {pred_scores.shape} must "
            f"both have shape ({len(pred_boxes)},) for pred_boxes of shape {pred_boxes.shape}"
        )
    if len(gt_boxes) == 0:
        return
    ious = box_iou(pred_boxes, gt_boxes)
    if rule == "every":
        for i, j in zip(*np.nonzero(ious > min_iou), strict=True):
            yield int(pred_classes[i]), int(gt_classes[j]), float(pred_scores[i]), float(ious[i, j])
        return
    best = ious.argmax(axis=1)
    for i, j in enumerate(best):
        yield int(pred_classes[i]), int(gt_classes[j]), float(pred_scores[i]), float(ious[i, j])


def majority_vote_mapping(
    matches: Iterable[tuple[int, int, float, float]],
    min_score: float = 0.6,
    min_iou: float = 0.7,
) -> dict[int, int]:
    """Predicted class -> GT class by majority vote (U2Seg's instance protocol).

    `matches`: (pred_class, gt_class, score, box_iou) per prediction, its best GT box
    (see `gt_matches`). A match votes when score >= `min_score` and box IoU is
    strictly > `min_iou`. Classes without a vote are left out (dropped from AP); ties
    go to the lowest GT class id so the map is deterministic.
    """
    votes: dict[int, Counter[int]] = {}
    for pred_class, gt_class, score, iou in matches:
        if score >= min_score and iou > min_iou:
            votes.setdefault(int(pred_class), Counter())[int(gt_class)] += 1
    # max() keeps the first maximum, and sorted() puts the lowest class id first.
    return {k: max(sorted(c.items()), key=lambda kv: kv[1])[0] for k, c in sorted(votes.items())}


# ------------------------------------------------------------------------- panoptic


@dataclass
class PQStats:
    """Per-category panoptic counts: category -> [tp, fp, fn, iou_sum]; summable."""

    per_category: dict[int, list[float]] = field(default_factory=dict)

    def _cat(self, category: int) -> list[float]:
        return self.per_category.setdefault(int(category), [0, 0, 0, 0.0])

    def merge(self, other: PQStats) -> PQStats:
        """Add `other`'s counts into self. Returns self."""
        for cat, values in other.per_category.items():
            mine = self._cat(cat)
            for i, v in enumerate(values):
                mine[i] += v
        return self

    def __add__(self, other: PQStats) -> PQStats:
        return PQStats({k: list(v) for k, v in self.per_category.items()}).merge(other)


@dataclass(frozen=True)
class SegmentOverlaps:
    """One image's pixel counts: segment areas and every (gt id, pred id) intersection.

    All a panoptic score needs of the pixels, so it can be kept instead of the maps and
    scored later under any category map (`pq_counts`).
    """

    pred_area: dict[int, int]
    gt_area: dict[int, int]
    intersection: dict[tuple[int, int], int]


def segment_overlaps(pred_segments: np.ndarray, gt_segments: np.ndarray) -> SegmentOverlaps:
    """Areas and intersections of two (H, W) maps of non-negative segment ids (0 = void)."""
    pred = np.asarray(pred_segments)
    gt = np.asarray(gt_segments)
    _check_same_shape(pred, gt, "pred_segments", "gt_segments")
    _check_integer(pred, "pred_segments")
    _check_integer(gt, "gt_segments")
    _check_range(pred, 0, 2**32, "pred_segments")
    _check_range(gt, 0, 2**32, "gt_segments")
    # Joint ids give every (gt, pred) intersection in one np.unique pass.
    offset = np.uint64(2**32)
    joint = gt.astype(np.uint64) * offset + pred.astype(np.uint64)
    labels, inter_counts = np.unique(joint, return_counts=True)
    intersection: dict[tuple[int, int], int] = {
        (int(lab // offset), int(lab % offset)): int(n)
        for lab, n in zip(labels, inter_counts, strict=True)
    }
    pred_area: Counter[int] = Counter()
    gt_area: Counter[int] = Counter()
    for (g, p), n in intersection.items():
        gt_area[g] += n
        pred_area[p] += n
    return SegmentOverlaps(dict(pred_area), dict(gt_area), intersection)


def relabel_gt_segments(
    overlaps: SegmentOverlaps,
    gt_info: Mapping[int, tuple[int, bool]],
    category_of: Mapping[int, int],
    merge: Iterable[int],
) -> tuple[SegmentOverlaps, dict[int, tuple[int, bool]]]:
    """One image's overlaps and GT segments with GT categories relabelled.

    `category_of`: GT category -> new category (one left out keeps its id). The non-crowd
    segments of a new category in `merge` (stuff: one segment a class and image, as COCO
    panoptic writes stuff) become one segment, with the smallest of their ids; predicted
    segments and void are unchanged.
    """
    merged = {int(c) for c in merge}
    info: dict[int, tuple[int, bool]] = {}
    first: dict[int, int] = {}
    target: dict[int, int] = {}
    for g in sorted(int(k) for k in gt_info):
        category, crowd = gt_info[g]
        category = int(category_of.get(int(category), int(category)))
        if category in merged and not crowd:
            target[g] = first.setdefault(category, g)
        else:
            target[g] = g
        info.setdefault(target[g], (category, bool(crowd)))
    intersection: Counter[tuple[int, int]] = Counter()
    for (g, p), n in overlaps.intersection.items():
        intersection[(target.get(g, g), p)] += n
    gt_area: Counter[int] = Counter()
    for g, n in overlaps.gt_area.items():
        gt_area[target.get(g, g)] += n
    return SegmentOverlaps(dict(overlaps.pred_area), dict(gt_area), dict(intersection)), info


def pq_stats(
    pred_segments: np.ndarray,
    pred_info: Mapping[int, int],
    gt_segments: np.ndarray,
    gt_info: Mapping[int, tuple[int, bool | int]],
) -> PQStats:
    """Panoptic counts of one image, as panopticapi's `pq_compute_single_core`.

    `pred_segments`, `gt_segments`: (H, W) non-negative segment ids, 0 = void/unlabelled.
    `pred_info`: segment id -> category; `gt_info`: segment id -> (category, iscrowd).
    Every non-zero id in a map must have an info entry (ValueError otherwise). The rules
    are those of `pq_counts`.
    """
    overlaps = segment_overlaps(pred_segments, gt_segments)
    missing_pred = sorted(set(overlaps.pred_area) - set(map(int, pred_info)) - {VOID})
    missing_gt = sorted(set(overlaps.gt_area) - set(map(int, gt_info)) - {VOID})
    if missing_pred or missing_gt:
        raise ValueError(
            f"segment ids without info: pred {missing_pred}, gt {missing_gt} "
            f"(only {VOID} may be left out, it is void)"
        )
    return pq_counts(overlaps, pred_info, gt_info)


def pq_counts(
    overlaps: SegmentOverlaps,
    pred_info: Mapping[int, int],
    gt_info: Mapping[int, tuple[int, bool | int]],
) -> PQStats:
    """Panoptic counts of one image from its `segment_overlaps`.

    `pred_info`: segment id -> category of the predicted segments to score (a segment
    left out counts as void: this is how unmatched clusters are dropped); `gt_info`:
    segment id -> (category, iscrowd). A pair matches (TP) when the categories agree, the
    GT is not crowd and IoU > 0.5, with the pixels the prediction has on GT void removed
    from the union. Unmatched non-crowd GT segments are FN (also a GT entry without
    pixels, as panopticapi counts `segments_info`). An unmatched prediction is FP unless
    more than half of it lies on GT void plus crowd regions of its own category.
    Predicted info entries without pixels are ignored (panopticapi refuses them; there is
    nothing to score). Departure: all crowd segments of a category count, where
    panopticapi keeps the last.
    """
    pred_area, gt_area = overlaps.pred_area, overlaps.gt_area
    intersection = overlaps.intersection
    pred_cat = {int(k): int(v) for k, v in pred_info.items() if int(k) in pred_area}
    pred_cat.pop(VOID, None)
    gt_cat = {int(k): int(v[0]) for k, v in gt_info.items() if int(k) != VOID}
    gt_crowd = {int(k): bool(v[1]) for k, v in gt_info.items() if int(k) != VOID}

    stats = PQStats()
    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for (g, p), inter in intersection.items():
        if g not in gt_cat or p not in pred_cat or gt_crowd[g] or gt_cat[g] != pred_cat[p]:
            continue
        union = pred_area[p] + gt_area.get(g, 0) - inter - intersection.get((VOID, p), 0)
        iou = inter / union
        # IoU > 0.5 makes the match unique, so greedy order does not matter.
        if iou > 0.5:
            cat = stats._cat(gt_cat[g])
            cat[0] += 1
            cat[3] += iou
            gt_matched.add(g)
            pred_matched.add(p)

    crowd_by_cat: dict[int, list[int]] = {}
    for g, cat_id in gt_cat.items():
        if g in gt_matched:
            continue
        if gt_crowd[g]:
            crowd_by_cat.setdefault(cat_id, []).append(g)
            continue
        stats._cat(cat_id)[2] += 1

    for p, cat_id in pred_cat.items():
        if p in pred_matched:
            continue
        ignored = intersection.get((VOID, p), 0)
        ignored += sum(intersection.get((g, p), 0) for g in crowd_by_cat.get(cat_id, []))
        if ignored / pred_area[p] > 0.5:
            continue
        stats._cat(cat_id)[1] += 1
    return stats


def pq_summary(
    stats: PQStats, thing_ids: Iterable[int], stuff_ids: Iterable[int]
) -> dict[str, dict[str, float]]:
    """PQ, SQ, RQ (in %) and n for "All", "Things", "Stuff", as panopticapi averages.

    Per category PQ = iou_sum / (tp + fp/2 + fn/2), SQ = iou_sum / tp, RQ = tp / (tp +
    fp/2 + fn/2); each group averages over its categories with any tp, fp or fn (n of
    them). A group with n = 0 reports 0.0 (panopticapi divides by zero there).
    """
    things, stuff = {int(c) for c in thing_ids}, {int(c) for c in stuff_ids}
    if things & stuff:
        raise ValueError(f"categories both thing and stuff: {sorted(things & stuff)}")
    unknown = sorted(
        c for c, v in stats.per_category.items() if c not in things | stuff and any(v[:3])
    )
    if unknown:
        raise ValueError(f"stats hold categories that are neither thing nor stuff: {unknown}")

    def average(categories: set[int]) -> dict[str, float]:
        pq = sq = rq = 0.0
        n = 0
        for c in sorted(categories):
            tp, fp, fn, iou = stats.per_category.get(c, [0, 0, 0, 0.0])
            if tp + fp + fn == 0:
                continue
            n += 1
            denom = tp + 0.5 * fp + 0.5 * fn
            pq += iou / denom
            sq += iou / tp if tp else 0.0
            rq += tp / denom
        if n == 0:
            return {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "n": 0}
        return {"PQ": 100 * pq / n, "SQ": 100 * sq / n, "RQ": 100 * rq / n, "n": n}

    return {"All": average(things | stuff), "Things": average(things), "Stuff": average(stuff)}
