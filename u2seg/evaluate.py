"""Stage `evaluate`: score predictions against ground truth (METHOD.md stage 7).

Unsupervised predictions carry cluster ids, so every class-aware score first maps them to
ground-truth classes; both maps are fit on the evaluation set itself (transductive, as
STEGO and U2Seg do) unless `evaluate.mapping_from` names the evaluation of another split,
whose saved maps are applied instead (the honest variant).

Two streamed passes over the images, each in chunks of `evaluate.chunk_size` images (in
process, or on Ray Data when the set has at least `evaluate.ray_min_images` images); a
chunk returns summable statistics, never masks:

1. class-agnostic COCOeval per-image results (box and mask; all categories collapsed,
   maxDets 100: CutLER's protocol), the instance votes (prediction score >= `min_score`,
   box IoU > `min_iou` with its best ground-truth box) and the pixel confusion matrix of
   predicted categories x ground-truth semantic classes.
2. after the maps: class-aware COCOeval per-image results (predicted classes mapped by
   majority vote, unmatched ones dropped) and panoptic quality counts (things mapped by
   the vote, stuff by a Hungarian match of stuff clusters to ground-truth stuff classes;
   segments of unmatched clusters become void).

COCOeval's per-image results of all chunks are merged and accumulated once, which gives
exactly the numbers of one COCOeval over the whole set. Semantic scores: one-to-one
Hungarian and many-to-one majority maps of the confusion matrix (mIoU, pixel accuracy).

Outputs under `evaluate/`: `metrics.json`, `report.md` (the tables and pictures),
`<prediction>/mapping.json` and the pictures of each prediction set.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params
from tqdm import tqdm

from u2seg.groundtruth import (
    IGNORE,
    GroundTruth,
    GroundTruthError,
    GTImage,
    load_cityscapes,
    load_coco,
    load_coco_panoptic,
    load_cocostuff27,
    restrict,
)
from u2seg.metrics import (
    ConfusionMatrix,
    PQStats,
    best_gt_matches,
    hungarian_match,
    majority_match,
    majority_vote_mapping,
    normalise_mapping,
    pq_stats,
    pq_summary,
    semantic_scores,
)
from u2seg.predictions import PredictionError, Predictions, PredImage
from u2seg.refine import mask_to_annotation

SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


class EvaluationError(ValueError):
    """Ground truth and predictions that cannot be scored together; names the file."""


# --------------------------------------------------------------------------- COCOeval


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _params(iou_type: str, image_ids: Sequence[int], cat_ids: Sequence[int], max_dets: int) -> Any:
    params = Params(iouType=iou_type)
    params.imgIds = sorted(int(i) for i in image_ids)
    params.catIds = sorted(int(c) for c in cat_ids)
    params.maxDets = [1, 10, max_dets]
    return params


@dataclass
class EvalImages:
    """COCOeval per-image results: image id -> its (category x area range) entries.

    Summable across chunks (`merge`); `summary` accumulates them as one COCOeval over all
    images would.
    """

    iou_type: str
    cat_ids: tuple[int, ...]
    max_dets: int
    entries: dict[int, list[Any]] = field(default_factory=dict)

    def merge(self, other: EvalImages) -> EvalImages:
        self.entries.update(other.entries)
        return self

    def summary(self) -> dict[str, float]:
        """AP, AP50, AP75, APs/m/l in %; NaN where no ground truth exists in the range."""
        if not self.entries:
            return dict.fromkeys(SUMMARY, float("nan"))
        params = _params(self.iou_type, list(self.entries), self.cat_ids, self.max_dets)
        areas = len(params.areaRng)
        ordered: list[Any] = []
        for k in range(len(params.catIds)):
            for a in range(areas):
                ordered += [self.entries[i][k * areas + a] for i in params.imgIds]
        evaluator = COCOeval(iouType=self.iou_type)
        evaluator.params, evaluator._paramsEval = params, copy.deepcopy(params)
        evaluator.evalImgs = ordered
        with _quiet():
            evaluator.accumulate()
            evaluator.summarize()
        stats = evaluator.stats[: len(SUMMARY)]
        pairs = zip(SUMMARY, stats, strict=True)
        return {k: float(v * 100) if v >= 0 else float("nan") for k, v in pairs}


def evaluate_images(
    images: Sequence[tuple[int, int, int]],
    ground_truth: Sequence[Sequence[dict[str, Any]]],
    detections: Sequence[Sequence[dict[str, Any]]],
    cat_ids: Sequence[int],
    iou_type: str,
    max_dets: int = 100,
) -> EvalImages:
    """COCOeval's per-image evaluation of some images, kept for a later `summary`.

    `images`: (image id, height, width); `ground_truth` / `detections`: each image's COCO
    annotations (RLE `segmentation`, `bbox`, `category_id`; GT `area` and `iscrowd`,
    detection `score`). Detections are loaded as COCO's `loadRes` does (a box's area is
    w * h when a `bbox` is given, as in detectron2's evaluator).
    """
    truth: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for (image_id, _, _), anns, dets in zip(images, ground_truth, detections, strict=True):
        truth += [{**a, "id": len(truth) + n, "image_id": image_id} for n, a in enumerate(anns, 1)]
        results += [{**d, "image_id": image_id} for d in dets]
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "height": h, "width": w} for i, h, w in images],
        "categories": [{"id": int(c)} for c in cat_ids],
        "annotations": truth,
    }
    with _quiet():
        gt.createIndex()
        if results:
            # loadRes and COCOeval replace top-level keys only: shallow copies are enough.
            dt = gt.loadRes([dict(r) for r in results])
        else:
            dt = COCO()
            dt.dataset = {**gt.dataset, "annotations": []}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType=iou_type)
        evaluator.params = _params(iou_type, [i for i, _, _ in images], cat_ids, max_dets)
        evaluator.evaluate()
    params = evaluator.params
    per_cat = len(params.areaRng) * len(params.imgIds)
    entries: dict[int, list[Any]] = {i: [] for i in params.imgIds}
    for k in range(len(params.catIds)):
        block = evaluator.evalImgs[k * per_cat : (k + 1) * per_cat]
        for a in range(len(params.areaRng)):
            for n, i in enumerate(params.imgIds):
                entry = block[a * len(params.imgIds) + n]
                entries[i].append(_slim(entry))
    return EvalImages(iou_type, tuple(sorted(int(c) for c in cat_ids)), max_dets, entries)


def _slim(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fields `accumulate` reads (ids dropped: they are chunk-local)."""
    if entry is None:
        return None
    keep = ("dtMatches", "dtScores", "gtIgnore", "dtIgnore", "aRng", "maxDet")
    return {k: entry[k] for k in keep}


def class_agnostic_ap(
    ground_truth: dict[str, Any],
    predictions: Sequence[dict[str, Any]],
    iou_type: str = "segm",
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """AP, AP50, AP75, APs/m/l (in %) of `predictions` with all categories collapsed.

    `ground_truth`: a COCO instances dataset (dict). `predictions`: COCO result dicts
    (image_id, segmentation and/or bbox, score). `image_ids`: images to score; default the
    images with at least one ground-truth annotation. maxDets 100.
    """
    if image_ids is None:
        image_ids = sorted({a["image_id"] for a in ground_truth["annotations"]})
    sizes = {im["id"]: (im["height"], im["width"]) for im in ground_truth["images"]}
    images = [(int(i), *sizes[i]) for i in image_ids]
    gts: dict[int, list[dict[str, Any]]] = {i: [] for i in image_ids}
    dts: dict[int, list[dict[str, Any]]] = {i: [] for i in image_ids}
    for ann in ground_truth["annotations"]:
        if ann["image_id"] in gts:
            gts[ann["image_id"]].append({**ann, "category_id": 1})
    for det in predictions:
        if det["image_id"] in dts:
            dts[det["image_id"]].append({**det, "category_id": 1})
    if iou_type == "bbox" and any("bbox" not in d for ds in dts.values() for d in ds):
        raise ValueError("box AP needs a 'bbox' in each prediction")
    result = evaluate_images(
        images, [gts[i] for i in image_ids], [dts[i] for i in image_ids], [1], iou_type
    )
    return result.summary()


def best_iou(ground_truth: np.ndarray, masks: Sequence[np.ndarray]) -> float:
    """Highest IoU of any bool mask in `masks` with the bool `ground_truth` (same shape)."""
    best = 0.0
    for mask in masks:
        union = np.logical_or(ground_truth, mask).sum()
        if union:
            best = max(best, float(np.logical_and(ground_truth, mask).sum() / union))
    return best


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class Settings:
    """Protocol thresholds (config `evaluate.*`)."""

    min_score: float = 0.6
    min_iou: float = 0.7
    max_dets: int = 100


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
        return self.gt.has_semantic and self.pred.kind == "panoptic"

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


@dataclass
class Stats:
    """Summable statistics of some images (one chunk, or the whole set once merged)."""

    images: int = 0
    agnostic: dict[str, EvalImages] = field(default_factory=dict)
    instance: dict[str, EvalImages] = field(default_factory=dict)
    votes: list[tuple[int, int, float, float]] = field(default_factory=list)
    confusion: ConfusionMatrix | None = None
    pq: PQStats = field(default_factory=PQStats)

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
        return self


class _Image:
    """One image's ground truth and prediction, each label map read at most once."""

    def __init__(self, job: Job, gt_image: GTImage, pred_image: PredImage | None) -> None:
        self.job, self.gt_image, self.pred_image = job, gt_image, pred_image
        self._gt_panoptic: tuple[np.ndarray, dict[int, tuple[int, bool]]] | None = None
        self._pred_panoptic: tuple[np.ndarray, dict[int, int]] | None = None

    @property
    def name(self) -> str:
        return self.gt_image.label_file or self.gt_image.file_name

    def gt_panoptic(self) -> tuple[np.ndarray, dict[int, tuple[int, bool]]]:
        if self._gt_panoptic is None:
            self._gt_panoptic = self.job.gt.panoptic(self.gt_image)
        return self._gt_panoptic

    def shape(self) -> tuple[int, int]:
        im = self.gt_image
        if im.width and im.height:
            return im.height, im.width
        if self.job.gt.has_panoptic:
            return self.gt_panoptic()[0].shape
        return self.gt_semantic().shape

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
            return [
                mask_to_annotation(segments == seg, self.gt_image.image_id, seg, cat, 1.0)
                for seg, cat in sorted(info.items())
                if cat in things and (segments == seg).any()
            ]
        height, width = self.shape()
        for det in self.pred_image.annotations:
            size = list(det.get("segmentation", {}).get("size", [height, width]))
            if size != [height, width]:
                raise EvaluationError(
                    f"{self.job.pred.path}: masks of {self.pred_image.file_name} are "
                    f"{size[1]}x{size[0]} but its ground truth {self.name} is {width}x{height}"
                )
        return [dict(d) for d in self.pred_image.annotations]

    def pred_panoptic(self) -> tuple[np.ndarray, dict[int, int]]:
        """Predicted segments (void everywhere without a prediction) of the GT's size."""
        if self._pred_panoptic is None:
            shape = self.shape()
            if self.pred_image is None:
                self._pred_panoptic = np.zeros(shape, dtype=np.int64), {}
            else:
                segments, info = self.job.pred.panoptic(self.pred_image)
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
    rows = job.rows
    void_row = len(rows)
    boxes: list[tuple[int, int, int]] = []
    gts: list[list[dict[str, Any]]] = []
    dts: list[list[dict[str, Any]]] = []
    for image in images:
        if job.semantic:
            segments, info = image.pred_panoptic()
            lut = {seg: rows[cat] for seg, cat in info.items()}
            ids, inverse = np.unique(segments, return_inverse=True)
            table = np.asarray([lut.get(i, void_row) for i in ids.tolist()], dtype=np.int64)
            gt_sem = image.gt_semantic()
            assert stats.confusion is not None
            stats.confusion.update(table[inverse].reshape(segments.shape), gt_sem, IGNORE)
        if job.instances:
            truth, found = image.gt_instances(), image.detections()
            boxes.append((image.gt_image.image_id, *image.shape()))
            gts.append([{**a, "category_id": 1} for a in truth])
            dts.append([{**d, "category_id": 1} for d in found])
            if job.class_aware:
                solid = [a for a in truth if not a.get("iscrowd", 0)]
                stats.votes += best_gt_matches(
                    _boxes(solid),
                    np.asarray([a["category_id"] for a in solid], dtype=np.int64),
                    _boxes(found),
                    np.asarray([d["category_id"] for d in found], dtype=np.int64),
                    np.asarray([d.get("score", 1.0) for d in found], dtype=np.float64),
                )
    if job.instances and boxes:
        for iou_type in IOU_TYPES:
            stats.agnostic[iou_type] = evaluate_images(
                boxes, gts, dts, [1], iou_type, job.settings.max_dets
            )


def _second_pass(job: Job, maps: Maps, images: list[_Image], stats: Stats) -> None:
    boxes: list[tuple[int, int, int]] = []
    gts: list[list[dict[str, Any]]] = []
    dts: list[list[dict[str, Any]]] = []
    for image in images:
        if job.class_aware:
            boxes.append((image.gt_image.image_id, *image.shape()))
            gts.append(image.gt_instances())
            dts.append(
                [
                    {**d, "category_id": maps.instance[d["category_id"]]}
                    for d in image.detections()
                    if d["category_id"] in maps.instance
                ]
            )
        if job.panoptic:
            segments, info = image.pred_panoptic()
            mapped = {}
            for seg, cat in info.items():
                target = maps.instance.get(cat, maps.stuff.get(cat))
                if target is not None:
                    mapped[seg] = target
            kept = np.isin(segments, list(mapped))
            gt_segments, gt_info = image.gt_panoptic()
            stats.pq.merge(pq_stats(np.where(kept, segments, 0), mapped, gt_segments, gt_info))
    if job.class_aware and boxes:
        for iou_type in IOU_TYPES:
            stats.instance[iou_type] = evaluate_images(
                boxes, gts, dts, job.gt.thing_ids, iou_type, job.settings.max_dets
            )


def score_chunk(
    job: Job, pairs: Sequence[tuple[GTImage, PredImage | None]], maps: Maps | None
) -> Stats:
    """Statistics of some images: the first pass when `maps` is None, else the second."""
    stats = Stats(images=len(pairs))
    if maps is None and job.semantic:
        stats.confusion = job.empty_confusion()
    images = [_Image(job, gt_image, pred_image) for gt_image, pred_image in pairs]
    try:
        if maps is None:
            _first_pass(job, images, stats)
        else:
            _second_pass(job, maps, images, stats)
    except (GroundTruthError, PredictionError, EvaluationError):
        raise
    except ValueError as exc:
        names = ", ".join(im.name for im in images[:3])
        more = ", ..." if len(images) > 3 else ""
        raise EvaluationError(f"while scoring {names}{more}: {exc}") from None
    return stats


# --------------------------------------------------------------------------- fitting


def fit_maps(job: Job, stats: Stats) -> Maps:
    """The maps of METHOD.md stage 7 from the first pass's statistics."""
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
            stuff_rows = [k for k, c in enumerate(job.pred.categories) if not c.isthing]
            stuff_ids = job.gt.stuff_ids
            stuff_cols = [job.gt.semantic_of[c] for c in stuff_ids]
            if stuff_rows and stuff_cols:
                sub = counts[np.ix_(stuff_rows, stuff_cols)]
                maps.stuff = {
                    category_of_row[stuff_rows[r]]: stuff_ids[c]
                    for r, c in hungarian_match(sub).items()
                    if sub[r, c] > 0
                }
    return maps


def check_maps(job: Job, maps: Maps, source: str) -> None:
    """Maps read from another evaluation must fit these categories and classes."""
    pred_ids = {c.id for c in job.pred.categories}
    gt_things, gt_stuff = set(job.gt.thing_ids), set(job.gt.stuff_ids)
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
        out["class_agnostic"] = {t: first.agnostic[t].summary() for t in IOU_TYPES}
    if second.instance:
        thing_preds = [c.id for c in job.pred.categories if c.isthing]
        out["instance"] = {t: second.instance[t].summary() for t in IOU_TYPES}
        out["instance"]["matched_classes"] = len(maps.instance)
        out["instance"]["predicted_classes"] = len(thing_preds)
    if first.confusion is not None:
        counts = first.confusion.counts
        out["semantic"] = {}
        for name in ("hungarian", "majority"):
            rows = _rows_map(job, getattr(maps, f"semantic_{name}"))
            scores = semantic_scores(counts, rows)
            out["semantic"][name] = {**scores, "matched_clusters": len(rows)}
        out["semantic"]["classes"] = list(job.gt.semantic_classes)
    if job.panoptic:
        summary = pq_summary(second.pq, job.gt.thing_ids, job.gt.stuff_ids)
        names = {c.id: c.name for c in job.gt.categories}
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
        out["panoptic"] = {**summary, "per_class": per_class, "stuff_matched": len(maps.stuff)}
    return out


# --------------------------------------------------------------------------- running


def chunks(
    gt: GroundTruth, pred: Predictions, size: int
) -> list[list[tuple[GTImage, PredImage | None]]]:
    """The evaluation set (the ground truth's images) paired with predictions, in chunks."""
    pairs = [(im, pred.images.get(im.key)) for im in gt.images]
    return [pairs[i : i + size] for i in range(0, len(pairs), size)]


class ChunkScorer:
    """Ray Data actor: scores pickled chunks with the job it was built with."""

    def __init__(self, job: bytes, maps: bytes) -> None:
        self.job: Job = pickle.loads(job)
        self.maps: Maps | None = pickle.loads(maps)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[bytes]]:
        out = [
            pickle.dumps(score_chunk(self.job, pickle.loads(chunk), self.maps))
            for chunk in batch["chunk"]
        ]
        return {"stats": out}


def run_pass(
    job: Job,
    parts: Sequence[Sequence[tuple[GTImage, PredImage | None]]],
    maps: Maps | None,
    on_ray: bool,
    concurrency: int = 2,
    num_cpus: float = 0.5,
    desc: str = "evaluate",
) -> Stats:
    """One pass over every chunk, in process or on Ray Data; the merged statistics."""
    total = Stats()
    if maps is None and job.semantic:
        total.confusion = job.empty_confusion()
    light = Job(job.gt.without_images(), job.pred.without_images(), job.settings)
    with tqdm(total=sum(len(p) for p in parts), desc=desc, unit="image") as bar:
        if not on_ray:
            for part in parts:
                total.merge(score_chunk(light, part, maps))
                bar.update(len(part))
            return total
        import ray.data

        items = ray.data.from_items([{"chunk": pickle.dumps(list(p))} for p in parts])
        ds = items.map_batches(
            ChunkScorer,
            fn_constructor_kwargs={"job": pickle.dumps(light), "maps": pickle.dumps(maps)},
            batch_size=1,
            concurrency=concurrency,
            num_cpus=num_cpus,
        )
        for row in ds.iter_rows():
            part_stats: Stats = pickle.loads(row["stats"])
            total.merge(part_stats)
            bar.update(part_stats.images)
    return total


def evaluate(
    gt: GroundTruth,
    pred: Predictions,
    settings: Settings,
    maps: Maps | None = None,
    chunk_size: int = 64,
    on_ray: bool = False,
    concurrency: int = 2,
    num_cpus: float = 0.5,
) -> tuple[dict[str, Any], Maps, Stats]:
    """Score `pred` against `gt`: (metrics, the maps used, first-pass statistics).

    `maps` None fits them on this set; otherwise they are applied as given.
    """
    job = Job(gt, pred, settings)
    parts = chunks(gt, pred, chunk_size)
    start = time.perf_counter()
    first = run_pass(job, parts, None, on_ray, concurrency, num_cpus, f"evaluate {pred.name} 1/2")
    if maps is None:
        maps = fit_maps(job, first)
    else:
        check_maps(job, maps, pred.path)
    second = Stats()
    if job.class_aware or job.panoptic:
        second = run_pass(
            job, parts, maps, on_ray, concurrency, num_cpus, f"evaluate {pred.name} 2/2"
        )
    metrics = summarise(job, maps, first, second)
    keys = set(pred.images)
    scored = {im.key for im in gt.images}
    metrics["images"] = {
        "scored": len(gt.images),
        "without_prediction": len(scored - keys),
        "predicted_not_in_ground_truth": len(keys - scored),
        "seconds": time.perf_counter() - start,
    }
    return metrics, maps, first


def load_ground_truth(cfg: Any) -> GroundTruth:
    """The ground truth that `evaluate.*` (an EvaluateConfig) describes."""
    fmt = cfg.gt_format
    needs = {
        "coco": ("gt_instances",),
        "coco-panoptic": ("gt_panoptic_json",),
        "cocostuff27": ("gt_semantic_root",),
        "cityscapes": ("gt_cityscapes",),
    }
    if fmt not in needs:
        raise GroundTruthError(f"evaluate.gt_format={fmt!r} is not one of {', '.join(needs)}")
    for key in needs[fmt]:
        if not getattr(cfg, key):
            raise GroundTruthError(f"evaluate.gt_format={fmt} needs evaluate.{key}")
    if fmt == "coco":
        gt = load_coco(cfg.gt_instances)
    elif fmt == "coco-panoptic":
        gt = load_coco_panoptic(
            cfg.gt_panoptic_json, cfg.gt_panoptic_root, cfg.gt_instances, cfg.semantic_level
        )
    elif fmt == "cocostuff27":
        gt = load_cocostuff27(cfg.gt_semantic_root)
    else:
        gt = load_cityscapes(cfg.gt_cityscapes)
    return restrict(gt, cfg.image_list) if cfg.image_list else gt
