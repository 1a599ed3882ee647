"""COCO AP of instance predictions, streamed: per-image records, chunked COCOeval.

`instance_record` reads one image's masks once and keeps only what COCOeval needs under
any category map: the box and mask IoU matrices of its detections x ground-truth
instances, areas, boxes, scores and categories. `evaluate_records` runs pycocotools'
own matching (`COCOeval.evaluateImg`) on some records, with `computeIoU` slicing the
recorded matrices; the per-image results of any number of chunks merge (`EvalImages`) and
accumulate once, which gives exactly the numbers of one COCOeval over the whole set.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


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

    def summary(self) -> dict[str, Any]:
        """AP, AP50, AP75, APs/m/l and the average recall at 1, 10 and `max_dets`
        detections per image (AR1, AR10, AR100 for the default 100) in %; NaN where no
        ground truth exists in the range. With several categories also `per_category`:
        category id -> AP (all areas)."""
        recall = ("AR1", "AR10", f"AR{self.max_dets}")
        if not self.entries:
            return dict.fromkeys((*SUMMARY, *recall), float("nan"))
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
        # COCOeval's stats: the 6 APs, then AR at each of maxDets (all areas), then ARs/m/l.
        stats = evaluator.stats[: len(SUMMARY) + len(recall)]
        pairs = zip((*SUMMARY, *recall), stats, strict=True)
        out: dict[str, Any] = {k: float(v * 100) if v >= 0 else float("nan") for k, v in pairs}
        if len(params.catIds) > 1:
            # precision: (IoU thresholds, recall points, categories, areas, maxDets).
            precision = evaluator.eval["precision"][:, :, :, 0, -1]
            out["per_category"] = {
                int(c): float(100 * p[p > -1].mean()) if (p > -1).any() else float("nan")
                for c, p in zip(params.catIds, np.moveaxis(precision, 2, 0), strict=True)
            }
        return out


@dataclass
class InstanceRecord:
    """One image's instances without their masks: all COCOeval needs under any class map.

    gts: ground-truth annotations (category_id, iscrowd, area, bbox); dets: detections
    (category_id = predicted class, score, bbox, and area as pycocotools' `loadRes` sets it:
    w * h of the box, as in detectron2's evaluator); iou: "bbox" / "segm" -> IoU matrix of
    shape (len(dets), len(gts)) with COCO's crowd rule, computed once from the masks.
    """

    image_id: int
    gts: list[dict[str, Any]]
    dets: list[dict[str, Any]]
    iou: dict[str, np.ndarray]


def _rle(segmentation: Any, height: int, width: int) -> Any:
    """Compressed RLE of a COCO segmentation (polygons, uncompressed or compressed RLE), as
    `COCO.annToRLE` makes it."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def instance_record(
    image_id: int,
    height: int,
    width: int,
    ground_truth: Sequence[dict[str, Any]],
    detections: Sequence[dict[str, Any]],
    masks: bool = True,
) -> InstanceRecord:
    """The `InstanceRecord` of one (height, width) image: its COCO GT annotations and
    detections (RLE or polygon `segmentation`; `bbox`, GT `area` and detection masks are
    derived when absent, as pycocotools does). `masks` False: box-only detections (no
    `segmentation`), the box IoU alone; then ground truth with `bbox` and `area` needs no
    `segmentation` either (a box-only dataset)."""
    gt_rles = []
    for a in ground_truth:
        if masks or "bbox" not in a or "area" not in a:
            if not a.get("segmentation"):
                raise ValueError(
                    f"image {image_id}: ground-truth annotation {a.get('id')} has no "
                    "segmentation (box-only ground truth is scored by box AP alone)"
                )
            gt_rles.append(_rle(a["segmentation"], height, width))
        else:
            gt_rles.append(None)
    det_rles = [_rle(d["segmentation"], height, width) if masks else None for d in detections]
    gts = [
        {"category_id": int(a["category_id"]), "iscrowd": int(a.get("iscrowd", 0)),
         "area": float(a["area"]) if "area" in a else float(mask_utils.area(rle)),
         "bbox": list(a["bbox"]) if "bbox" in a else mask_utils.toBbox(rle).tolist()}
        for a, rle in zip(ground_truth, gt_rles, strict=True)
    ]  # fmt: skip
    dets = []
    for d, rle in zip(detections, det_rles, strict=True):
        box = list(d["bbox"]) if "bbox" in d else mask_utils.toBbox(rle).tolist()
        area = box[2] * box[3] if "bbox" in d else float(mask_utils.area(rle))
        dets.append({"category_id": int(d["category_id"]), "score": float(d.get("score", 1.0)),
                     "bbox": box, "area": area})  # fmt: skip
    crowd = [g["iscrowd"] for g in gts]
    iou = {"bbox": mask_utils.iou([d["bbox"] for d in dets], [g["bbox"] for g in gts], crowd)}
    if masks:
        iou["segm"] = mask_utils.iou(det_rles, gt_rles, crowd)
    shape = (len(dets), len(gts))
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(shape) for k, v in iou.items()}
    return InstanceRecord(int(image_id), gts, dets, arrays)


class _RecordEval(COCOeval):
    """COCOeval whose IoUs are sliced from `InstanceRecord`s instead of recomputed.

    Runs with iouType "bbox" so that `_prepare` never asks for masks; which IoU is used is
    set by the matrices passed in. `computeIoU` keeps COCOeval's order (detections by
    score, at most maxDets) so `evaluateImg` pairs them as it would.
    """

    def __init__(self, gt: COCO, dt: COCO, iou: dict[int, np.ndarray]) -> None:
        super().__init__(gt, dt, iouType="bbox")
        self._iou = iou

    def computeIoU(self, imgId: int, catId: int) -> Any:  # noqa: N802, N803 (COCOeval's names)
        gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        if not gt and not dt:
            return []
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")[: self.params.maxDets[-1]]
        if not gt or not len(order):
            return []
        rows = [dt[i]["row"] for i in order]
        return self._iou[imgId][np.ix_(rows, [g["col"] for g in gt])]


def evaluate_records(
    records: Sequence[InstanceRecord],
    cat_ids: Sequence[int],
    max_dets: int = 100,
    det_category: Mapping[int, int] | None = None,
    collapse: bool = False,
) -> dict[str, EvalImages]:
    """COCOeval's per-image results, box and mask, of some images' records.

    `det_category` maps predicted classes to GT categories first (a detection whose class
    has no entry is dropped); `collapse` makes every category 1 (class-agnostic).
    `cat_ids`: the categories scored (the same for every chunk of a set).
    """
    truth: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for r in records:
        for col, g in enumerate(r.gts):
            cat = 1 if collapse else g["category_id"]
            truth.append({**g, "category_id": cat, "id": len(truth) + 1, "image_id": r.image_id,
                          "col": col})  # fmt: skip
        for row, d in enumerate(r.dets):
            cat = d["category_id"]
            if collapse:
                cat = 1
            elif det_category is not None:
                cat = det_category.get(cat)
            if cat is not None:
                results.append({**d, "category_id": cat, "id": len(results) + 1,
                                "image_id": r.image_id, "row": row})  # fmt: skip
    images = [{"id": r.image_id} for r in records]
    categories = [{"id": int(c)} for c in cat_ids]
    gt, dt = COCO(), COCO()
    gt.dataset = {"images": images, "categories": categories, "annotations": truth}
    dt.dataset = {"images": images, "categories": categories, "annotations": results}
    out = {}
    with _quiet():
        gt.createIndex()
        dt.createIndex()
        # Box-only detections have no mask IoU: their set is scored by box AP alone.
        for iou_type in (t for t in IOU_TYPES if all(t in r.iou for r in records)):
            evaluator = _RecordEval(gt, dt, {r.image_id: r.iou[iou_type] for r in records})
            evaluator.params = _params("bbox", [r.image_id for r in records], cat_ids, max_dets)
            evaluator.evaluate()
            out[iou_type] = _entries(evaluator, iou_type, cat_ids, max_dets)
    return out


def _entries(
    evaluator: COCOeval, iou_type: str, cat_ids: Sequence[int], max_dets: int
) -> EvalImages:
    """COCOeval's evalImgs regrouped by image, keeping the fields `accumulate` reads."""
    params = evaluator.params
    keep = ("dtMatches", "dtScores", "gtIgnore", "dtIgnore", "aRng", "maxDet")
    areas, count = len(params.areaRng), len(params.imgIds)
    entries: dict[int, list[Any]] = {i: [] for i in params.imgIds}
    for k in range(len(params.catIds)):
        for a in range(areas):
            for n, i in enumerate(params.imgIds):
                entry = evaluator.evalImgs[(k * areas + a) * count + n]
                entries[i].append(None if entry is None else {f: entry[f] for f in keep})
    return EvalImages(iou_type, tuple(sorted(int(c) for c in cat_ids)), max_dets, entries)


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
    annotations (see `instance_record`).
    """
    records = [
        instance_record(i, h, w, gts, dets, masks=iou_type == "segm")
        for (i, h, w), gts, dets in zip(images, ground_truth, detections, strict=True)
    ]
    return evaluate_records(records, cat_ids, max_dets)[iou_type]


def class_agnostic_ap(
    ground_truth: dict[str, Any],
    predictions: Sequence[dict[str, Any]],
    iou_type: str = "segm",
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """AP, AP50, AP75, APs/m/l (in %) of `predictions` with all categories collapsed.

    `ground_truth`: a COCO instances dataset (dict). `predictions`: COCO result dicts
    (image_id, segmentation and/or bbox, score). `image_ids`: images to score; default
    every image of the ground truth, as pycocotools and the evaluate stage score them (a
    detection on an image without annotations is a false positive). maxDets 100.
    """
    if image_ids is None:
        image_ids = sorted(int(im["id"]) for im in ground_truth["images"])
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
