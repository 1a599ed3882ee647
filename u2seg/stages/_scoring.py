"""What the `evaluate` stage computes per chunk of images (docs/method.md stage 7).

Unsupervised predictions carry cluster ids, so every class-aware score first maps them to
ground-truth classes; both maps are fit on the evaluation set itself (transductive, as
STEGO and U2Seg do) unless `evaluate.mapping_from` names the evaluation of another split,
whose saved maps are applied instead (the honest variant).

Two passes, each in chunks of `evaluate.chunk_size` images (`u2seg.stages.evaluate` runs
them in process or on Ray Data); a chunk returns summable statistics, never masks:

1. over the images, each label map and mask read once: the pixel confusion matrix of
   predicted categories x ground-truth semantic classes, the instance votes (prediction
   score >= `min_score`, box IoU > `min_iou` with its best ground-truth box), and per
   image a record of what the second pass needs: the box and mask IoU matrices of its
   detections x ground-truth instances (`InstanceRecord`) and the pixel counts of its
   segment overlaps (`PanopticRecord`); class-agnostic COCOeval results (box and mask,
   all categories collapsed, maxDets 100: CutLER's protocol) from the records.
2. over the records, after the maps: class-aware COCOeval results (predicted classes
   mapped by majority vote, unmatched ones dropped) and panoptic quality counts (things
   mapped by the vote, stuff by a Hungarian match of stuff clusters to ground-truth stuff
   classes on their shared pixels; segments of unmatched clusters become void).

COCOeval runs on the recorded IoUs (`u2seg.ops.coco_eval`) and its per-image results of all
chunks are accumulated once, which gives exactly the numbers of one COCOeval over the
whole set. Semantic scores: one-to-one Hungarian and many-to-one majority maps of the
confusion matrix (mIoU, pixel accuracy).

The metrics themselves are `u2seg.ops.metrics` and `u2seg.ops.coco_eval`; this module
pairs them with the ground-truth and prediction readers of `u2seg.data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from u2seg.data.coco import mask_to_annotation
from u2seg.data.groundtruth import (
    IGNORE,
    GroundTruth,
    GroundTruthError,
    GTImage,
    check_segment_ids,
)
from u2seg.data.predictions import PredictionError, Predictions, PredImage, semantic_labels
from u2seg.ops.coco_eval import (
    EvalImages,
    InstanceRecord,
    evaluate_records,
    instance_record,
)
from u2seg.ops.metrics import (
    ConfusionMatrix,
    PQStats,
    SegmentOverlaps,
    gt_matches,
    hungarian_match,
    majority_match,
    majority_vote_mapping,
    normalise_mapping,
    pq_counts,
    pq_summary,
    segment_overlaps,
    semantic_scores,
)


class EvaluationError(ValueError):
    """Ground truth and predictions that cannot be scored together; names the file."""


@dataclass(frozen=True)
class Settings:
    """Protocol thresholds (config `evaluate.*`)."""

    min_score: float = 0.6
    min_iou: float = 0.7
    max_dets: int = 100
    miou_rule: str = "defined"
    vote_rule: str = "every"


@dataclass
class Maps:
    """Predicted -> ground-truth maps (keys: predicted category ids).

    instance: thing category -> GT thing category (majority vote); stuff: stuff category ->
    GT stuff category (Hungarian); semantic_hungarian / semantic_majority: any predicted
    category -> GT semantic class index.
    """

    instance: dict[int, int] = field(default_factory=dict)
    stuff: dict[int, int] = field(default_factory=dict)
    semantic_hungarian: dict[int, int] = field(default_factory=dict)
    semantic_majority: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, dict[str, int]]:
        return {
            name: {str(k): v for k, v in sorted(getattr(self, name).items())}
            for name in ("instance", "stuff", "semantic_hungarian", "semantic_majority")
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Maps:
        return cls(**{name: normalise_mapping(data.get(name, {})) for name in cls().to_json()})


@dataclass(frozen=True)
class Job:
    """What every chunk needs besides its images: shipped once to each worker."""

    gt: GroundTruth
    pred: Predictions
    settings: Settings

    @property
    def instances(self) -> bool:
        return self.gt.has_instances and (self.pred.has_instances or self.pred.kind == "panoptic")

    @property
    def class_aware(self) -> bool:
        return self.instances and not self.pred.class_agnostic

    @property
    def semantic(self) -> bool:
        return self.gt.has_semantic and self.pred.kind in ("panoptic", "semantic")

    @property
    def panoptic(self) -> bool:
        return self.gt.has_panoptic and self.pred.kind == "panoptic"

    def empty_confusion(self) -> ConfusionMatrix:
        """Predicted categories (+ a void row) x ground-truth semantic classes."""
        return ConfusionMatrix(len(self.pred.categories) + 1, len(self.gt.semantic_classes))

    @property
    def rows(self) -> dict[int, int]:
        """Predicted category id -> confusion row; the last row is void / unpredicted."""
        return {c.id: k for k, c in enumerate(self.pred.categories)}


@dataclass(frozen=True)
class PanopticRecord:
    """One image's panoptic pixels as counts: overlaps, GT and predicted segment infos,
    the GT at the panoptic level (`GroundTruth.panoptic_categories`)."""

    overlaps: SegmentOverlaps
    gt_info: dict[int, tuple[int, bool]]
    pred_info: dict[int, int]


@dataclass
class Stats:
    """Summable statistics of some images (one chunk, or the whole set once merged).

    The first pass fills everything but `instance` and `pq`, which the second pass makes
    from the records alone, without reading an image again.
    """

    images: int = 0
    agnostic: dict[str, EvalImages] = field(default_factory=dict)
    instance: dict[str, EvalImages] = field(default_factory=dict)
    votes: list[tuple[int, int, float, float]] = field(default_factory=list)
    confusion: ConfusionMatrix | None = None
    pq: PQStats = field(default_factory=PQStats)
    records: list[InstanceRecord] = field(default_factory=list)
    panoptic: list[PanopticRecord] = field(default_factory=list)

    def merge(self, other: Stats) -> Stats:
        self.images += other.images
        for mine, theirs in ((self.agnostic, other.agnostic), (self.instance, other.instance)):
            for iou_type, result in theirs.items():
                if iou_type in mine:
                    mine[iou_type].merge(result)
                else:
                    mine[iou_type] = result
        self.votes += other.votes
        if other.confusion is not None:
            self.confusion = (
                other.confusion if self.confusion is None else self.confusion.merge(other.confusion)
            )
        self.pq.merge(other.pq)
        self.records += other.records
        self.panoptic += other.panoptic
        return self


class _Image:
    """One image's ground truth and prediction, each label map read at most once."""

    def __init__(self, job: Job, gt_image: GTImage, pred_image: PredImage | None) -> None:
        self.job, self.gt_image, self.pred_image = job, gt_image, pred_image
        self._gt_panoptic: tuple[np.ndarray, dict[int, tuple[int, bool]]] | None = None
        self._pred_panoptic: tuple[np.ndarray, dict[int, int]] | None = None
        self._overlaps: SegmentOverlaps | None = None

    @property
    def name(self) -> str:
        return self.gt_image.label_file or self.gt_image.file_name

    def gt_panoptic(self) -> tuple[np.ndarray, dict[int, tuple[int, bool]]]:
        if self._gt_panoptic is None:
            # With a panoptic prediction the ids are checked on the overlaps instead.
            check = self.job.pred.kind != "panoptic"
            self._gt_panoptic = self.job.gt.panoptic(self.gt_image, check_ids=check)
        return self._gt_panoptic

    def overlaps(self) -> SegmentOverlaps:
        """The segment overlaps of a panoptic prediction with the panoptic ground truth,
        one pass over the pixels that also checks both sides' segment ids."""
        if self._overlaps is None:
            segments, info = self.pred_panoptic()
            gt_segments, gt_info = self.gt_panoptic()
            self._overlaps = segment_overlaps(segments, gt_segments)
            check_segment_ids(self._overlaps.gt_area, gt_info, self.name, GroundTruthError)
            if self.pred_image is not None:
                url = self.pred_image.panoptic_file or self.pred_image.file_name
                check_segment_ids(self._overlaps.pred_area, info, url, PredictionError)
        return self._overlaps

    def shape(self) -> tuple[int, int]:
        im = self.gt_image
        if im.width and im.height:
            return im.height, im.width
        if self.job.gt.has_panoptic:
            return self.gt_panoptic()[0].shape
        if self.job.gt.has_semantic:
            return self.gt_semantic().shape
        # Instances only: an RLE mask knows its size, polygons do not.
        for ann in im.annotations:
            size = ann.get("segmentation")
            if isinstance(size, dict) and "size" in size:
                return int(size["size"][0]), int(size["size"][1])
        raise GroundTruthError(
            f"{self.job.gt.source}: image {im.file_name} (id {im.image_id}) has no width and "
            "height, which its masks need"
        )

    def gt_semantic(self) -> np.ndarray:
        if self.job.gt.has_panoptic:
            segments, info = self.gt_panoptic()
            return self.job.gt.semantic(self.gt_image, (segments, info))
        return self.job.gt.semantic(self.gt_image)

    def gt_instances(self) -> list[dict[str, Any]]:
        panoptic = None if self.job.gt.instances_from_json else self.gt_panoptic()
        return self.job.gt.instances(self.gt_image, panoptic)

    def detections(self) -> list[dict[str, Any]]:
        """The predicted instances; for panoptic predictions without an instances.json,
        their thing segments (score 1.0)."""
        if self.pred_image is None:
            return []
        if not self.job.pred.has_instances:
            segments, info = self.pred_panoptic()
            things = {c.id for c in self.job.pred.categories if c.isthing}
            found = []
            for seg, cat in sorted(info.items()):
                mask = segments == seg
                if cat in things and mask.any():
                    found.append(mask_to_annotation(mask, self.gt_image.image_id, seg, cat, 1.0))
            return found
        height, width = self.shape()
        for det in self.pred_image.annotations:
            rle = det.get("segmentation")  # polygons (a list) carry no size of their own
            size = list(rle.get("size", [height, width])) if isinstance(rle, dict) else []
            if size and size != [height, width]:
                raise EvaluationError(
                    f"{self.job.pred.path}: masks of {self.pred_image.file_name} are "
                    f"{size[1]}x{size[0]} but its ground truth {self.name} is {width}x{height}"
                )
        return [dict(d) for d in self.pred_image.annotations]

    def pred_classes(self) -> np.ndarray:
        """int64 (H, W) predicted category per pixel, 0 where nothing is predicted."""
        shape = self.shape()
        if self.job.pred.kind != "semantic":
            segments, info = self.pred_panoptic()
            ids, inverse = np.unique(segments, return_inverse=True)
            table = np.asarray([info.get(i, 0) for i in ids.tolist()], dtype=np.int64)
            return table[inverse].reshape(segments.shape)
        if self.pred_image is None:
            return np.zeros(shape, dtype=np.int64)
        labels = semantic_labels(self.pred_image)
        if labels.shape != shape:
            raise EvaluationError(
                f"{self.job.pred.path}: the labels of {self.pred_image.file_name} are "
                f"{labels.shape[1]}x{labels.shape[0]} but its ground truth {self.name} is "
                f"{shape[1]}x{shape[0]}"
            )
        return labels

    def pred_panoptic(self) -> tuple[np.ndarray, dict[int, int]]:
        """Predicted segments (void everywhere without a prediction) of the GT's size."""
        if self._pred_panoptic is None:
            shape = self.shape()
            if self.pred_image is None:
                self._pred_panoptic = np.zeros(shape, dtype=np.int64), {}
            else:
                check = not self.job.gt.has_panoptic  # else on the overlaps
                segments, info = self.job.pred.panoptic(self.pred_image, check_ids=check)
                if segments.shape != shape:
                    raise EvaluationError(
                        f"{self.pred_image.panoptic_file} is {segments.shape[1]}x"
                        f"{segments.shape[0]} but its ground truth {self.name} is "
                        f"{shape[1]}x{shape[0]}"
                    )
                self._pred_panoptic = segments, info
        return self._pred_panoptic


def _boxes(anns: Sequence[dict[str, Any]]) -> np.ndarray:
    return np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)


def _first_pass(job: Job, images: list[_Image], stats: Stats) -> None:
    """Read each image once: confusion matrix, votes, records, class-agnostic AP."""
    rows = job.rows
    # Predicted category -> confusion row; 0 (nothing predicted) and gaps: the void row.
    lut = np.full(max(rows, default=0) + 1, len(rows), dtype=np.int64)
    for cat, row in rows.items():
        lut[cat] = row
    for image in images:
        if job.panoptic:
            overlaps = image.overlaps()
            info, gt_info = image.pred_panoptic()[1], image.gt_panoptic()[1]
            stats.panoptic.append(PanopticRecord(*job.gt.at_panoptic_level(overlaps, gt_info),
                                                 info))  # fmt: skip
            if job.semantic:
                _confusion_from_overlaps(job, rows, stats, overlaps, info, gt_info)
        elif job.semantic:
            classes = image.pred_classes()
            gt_sem = image.gt_semantic()
            assert stats.confusion is not None
            stats.confusion.update(lut[classes], gt_sem, IGNORE)
        if job.instances:
            record = instance_record(
                image.gt_image.image_id, *image.shape(), image.gt_instances(),
                image.detections(), masks=job.pred.has_masks,
            )  # fmt: skip
            stats.records.append(record)
            if job.class_aware:
                rule = job.settings.vote_rule
                # U2Seg's rule counts crowd boxes too; the best-box rule skips them.
                voters = [g for g in record.gts if rule == "every" or not g["iscrowd"]]
                stats.votes += gt_matches(
                    _boxes(voters),
                    np.asarray([g["category_id"] for g in voters], dtype=np.int64),
                    _boxes(record.dets),
                    np.asarray([d["category_id"] for d in record.dets], dtype=np.int64),
                    np.asarray([d["score"] for d in record.dets], dtype=np.float64),
                    rule,
                    job.settings.min_iou,
                )
    if stats.records:
        stats.agnostic = evaluate_records(stats.records, [1], job.settings.max_dets, collapse=True)


def _confusion_from_overlaps(
    job: Job,
    rows: dict[int, int],
    stats: Stats,
    overlaps: SegmentOverlaps,
    info: dict[int, int],
    gt_info: dict[int, tuple[int, bool]],
) -> None:
    """Add one image's pixels to the confusion matrix from its segment overlaps (the same
    counts as a pixel-by-pixel pass: each overlap is a block of equal (row, class) pixels).
    `rows`: `job.rows`, made once per chunk."""
    void_row = len(rows)
    pred_rows, gt_classes, counts = [], [], []
    for (g, p), n in overlaps.intersection.items():
        cls = job.gt.semantic_of.get(gt_info[g][0], IGNORE) if g in gt_info else IGNORE
        if cls == IGNORE:
            continue  # GT void
        pred_rows.append(rows[info[p]] if p in info else void_row)
        gt_classes.append(cls)
        counts.append(n)
    assert stats.confusion is not None
    stats.confusion.add(np.asarray(pred_rows), np.asarray(gt_classes), np.asarray(counts))


def _second_pass(job: Job, maps: Maps, part: Stats) -> Stats:
    """Class-aware AP and PQ of some images' records under the maps."""
    stats = Stats(images=part.images)
    if job.class_aware and part.records:
        stats.instance = evaluate_records(
            part.records, job.gt.thing_ids, job.settings.max_dets, maps.instance
        )
    for record in part.panoptic:
        mapped = {}
        for seg, cat in record.pred_info.items():
            target = maps.instance.get(cat, maps.stuff.get(cat))
            if target is not None:
                mapped[seg] = target
        stats.pq.merge(pq_counts(record.overlaps, mapped, record.gt_info))
    return stats


def score_chunk(job: Job, part: Any, maps: Maps | None) -> Stats:
    """Statistics of some images: the first pass over image pairs when `maps` is None,
    else the second over a first pass's `Stats` of the same images."""
    if maps is not None:
        return _second_pass(job, maps, part)
    stats = Stats(images=len(part))
    if job.semantic:
        stats.confusion = job.empty_confusion()
    images = [_Image(job, gt_image, pred_image) for gt_image, pred_image in part]
    try:
        _first_pass(job, images, stats)
    except (GroundTruthError, PredictionError, EvaluationError):
        raise
    except ValueError as exc:
        names = ", ".join(im.name for im in images[:3])
        more = ", ..." if len(images) > 3 else ""
        raise EvaluationError(f"while scoring {names}{more}: {exc}") from None
    return stats


def fit_maps(job: Job, stats: Stats) -> Maps:
    """The maps of docs/method.md stage 7 from the first pass's statistics."""
    maps = Maps()
    category_of_row = [c.id for c in job.pred.categories]
    if job.class_aware:
        maps.instance = majority_vote_mapping(
            stats.votes, job.settings.min_score, job.settings.min_iou
        )
    if job.semantic and stats.confusion is not None:
        counts = stats.confusion.counts[:-1]  # the void row is never matched
        maps.semantic_hungarian = {
            category_of_row[r]: c for r, c in hungarian_match(counts).items()
        }
        maps.semantic_majority = {category_of_row[r]: c for r, c in majority_match(counts).items()}
    if job.panoptic:
        maps.stuff = _stuff_map(job, stats.panoptic)
    return maps


def _stuff_map(job: Job, records: Sequence[PanopticRecord]) -> dict[int, int]:
    """Predicted stuff category -> GT stuff category: a Hungarian match on the pixels the
    two share over the set (at the panoptic level, whatever `semantic_level` is)."""
    pred_stuff = [c.id for c in job.pred.categories if not c.isthing]
    gt_stuff = job.gt.panoptic_ids(things=False)
    if not pred_stuff or not gt_stuff:
        return {}
    row, col = {c: k for k, c in enumerate(pred_stuff)}, {c: k for k, c in enumerate(gt_stuff)}
    counts = np.zeros((len(pred_stuff), len(gt_stuff)), dtype=np.int64)
    for record in records:
        for (g, p), n in record.overlaps.intersection.items():
            r = row.get(record.pred_info.get(p, -1))
            c = col.get(record.gt_info[g][0]) if g in record.gt_info else None
            if r is not None and c is not None:
                counts[r, c] += n
    matched = hungarian_match(counts).items()
    return {pred_stuff[r]: gt_stuff[c] for r, c in matched if counts[r, c] > 0}


def check_maps(job: Job, maps: Maps, source: str) -> None:
    """Maps read from another evaluation must fit these categories and classes."""
    pred_ids = {c.id for c in job.pred.categories}
    gt_things, gt_stuff = set(job.gt.thing_ids), set(job.gt.panoptic_ids(things=False))
    classes = len(job.gt.semantic_classes)
    checks = (
        ("instance", gt_things, "ground-truth thing category"),
        ("stuff", gt_stuff, "ground-truth stuff category"),
        ("semantic_hungarian", set(range(classes)), "semantic class"),
        ("semantic_majority", set(range(classes)), "semantic class"),
    )
    for name, allowed, what in checks:
        for k, v in getattr(maps, name).items():
            if k not in pred_ids:
                raise EvaluationError(f"{source}: {name} maps category {k}, not predicted here")
            if v not in allowed:
                raise EvaluationError(f"{source}: {name} maps {k} -> {v}, not a {what} here")


def _rows_map(job: Job, mapping: dict[int, int]) -> dict[int, int]:
    rows = job.rows
    return {rows[k]: v for k, v in mapping.items() if k in rows}


def summarise(job: Job, maps: Maps, first: Stats, second: Stats) -> dict[str, Any]:
    """metrics.json's entry for one prediction set."""
    out: dict[str, Any] = {}
    if first.agnostic:
        out["class_agnostic"] = {t: result.summary() for t, result in first.agnostic.items()}
    # GT categories and the stuff supercategories of `panoptic_level` (ids after them).
    names = {c.id: c.name for c in (*job.gt.categories, *job.gt.group_categories)}
    if second.instance:
        thing_preds = [c.id for c in job.pred.categories if c.isthing]
        # Only the classes some cluster maps to: the others score 0 by construction.
        matched = set(maps.instance.values())
        out["instance"] = {}
        for t in second.instance:
            summary = second.instance[t].summary()
            per_category = summary.pop("per_category", {})
            summary["per_class"] = {names[c]: v for c, v in per_category.items() if c in matched}
            out["instance"][t] = summary
        out["instance"]["matched_classes"] = len(maps.instance)
        out["instance"]["predicted_classes"] = len(thing_preds)
    if first.confusion is not None:
        counts = first.confusion.counts
        out["semantic"] = {}
        for name in ("hungarian", "majority"):
            rows = _rows_map(job, getattr(maps, f"semantic_{name}"))
            scores = semantic_scores(counts, rows, job.settings.miou_rule)
            out["semantic"][name] = {**scores, "matched_clusters": len(rows)}
        out["semantic"]["classes"] = list(job.gt.semantic_classes)
    if job.panoptic:
        summary = pq_summary(second.pq, job.gt.thing_ids, job.gt.panoptic_ids(things=False))
        per_class = {}
        for cat, (tp, fp, fn, iou) in sorted(second.pq.per_category.items()):
            denom = tp + 0.5 * fp + 0.5 * fn
            if denom:
                per_class[names[cat]] = {
                    "PQ": 100 * iou / denom,
                    "SQ": 100 * iou / tp if tp else 0.0,
                    "RQ": 100 * tp / denom,
                    "tp": int(tp), "fp": int(fp), "fn": int(fn),
                }  # fmt: skip
        out["panoptic"] = {
            **summary, "per_class": per_class, "stuff_matched": len(maps.stuff),
            "level": job.gt.panoptic_level,
        }  # fmt: skip
    return out


def chunks(
    gt: GroundTruth, pred: Predictions, size: int
) -> list[list[tuple[GTImage, PredImage | None]]]:
    """The evaluation set (the ground truth's images) paired with predictions, in chunks."""
    pairs = [(im, pred.images.get(im.key)) for im in gt.images]
    return [pairs[i : i + size] for i in range(0, len(pairs), size)]
