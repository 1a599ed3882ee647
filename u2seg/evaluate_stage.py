"""Stage `evaluate`: every number of the U2Seg tables for each prediction set, one report.

For each entry of `evaluate.predictions` (stages of the run such as `maskcut` and
`panoptic`, or prediction directories in the same COCO layout) against the ground truth of
`evaluate.gt_*` (see u2seg.groundtruth), `u2seg.evaluate.evaluate` fits or applies the maps
and scores. Outputs under `evaluate/`:

- `metrics.json`: per prediction set, class-agnostic and class-aware box / mask AP,
  mIoU and pixel accuracy (Hungarian and majority), PQ / SQ / RQ (all, things, stuff, per
  class), image counts; the ground truth and the protocol with its thresholds.
- `report.md`: the tables (the rows of the paper's tables) and the pictures.
- `<set>/mapping.json`: the maps, to apply to another split (`evaluate.mapping_from`);
  `<set>/confusion.png`, `<set>/iou.png`, `<set>/overlays.png` (photo | ground truth |
  prediction after the maps, for the first `evaluate.overlays` images).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import pyarrow as pa

from u2seg.artifacts import CONFIG, StageDir, png_bytes
from u2seg.config import PipelineConfig, to_dict
from u2seg.evaluate import Maps, Settings, evaluate, load_ground_truth
from u2seg.figures import blend, color_segments, confusion_figure, iou_bars, side_by_side
from u2seg.groundtruth import GroundTruth, image_key
from u2seg.ingest import ImageError, list_images, read_image
from u2seg.predictions import Predictions, load_predictions, resolve, semantic_labels
from u2seg.refine import rle_to_mask
from u2seg.runtime import ray_session

STAGE = "evaluate"
METRICS = "metrics.json"
REPORT = "report.md"
MAPPING = "mapping.json"


# --------------------------------------------------------------------------- tables


def json_ready(obj: Any) -> Any:
    """`obj` with NaN (no ground truth to score) as null, so metrics.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    return obj


def _f(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _section(title: str, header: list[str], rows: list[list[Any]]) -> list[str]:
    """A titled markdown table; nothing when there is no row."""
    if not rows:
        return []
    lines = ["", f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows]


def tables(results: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown tables of every prediction set's metrics (the paper's rows)."""
    ap = ["AP^box", "AP50", "AP75", "AP^mask", "AP50", "AP75"]

    def aps(entry: dict[str, Any]) -> list[Any]:
        return [entry[t][k] for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75")]

    agnostic = [[n, *aps(m["class_agnostic"])] for n, m in results.items() if "class_agnostic" in m]
    aware = [
        [n, f"{m['instance']['matched_classes']}/{m['instance']['predicted_classes']}",
         *aps(m["instance"])]
        for n, m in results.items() if "instance" in m
    ]  # fmt: skip
    semantic = []
    for n, m in results.items():
        if "semantic" in m:
            h, j = m["semantic"]["hungarian"], m["semantic"]["majority"]
            semantic.append([n, h["mIoU"], h["pixel_accuracy"], j["mIoU"], j["pixel_accuracy"],
                             h["matched_clusters"]])  # fmt: skip
    groups = [(g, k) for g in ("All", "Things", "Stuff") for k in ("PQ", "SQ", "RQ")]
    panoptic = [
        [n, *(m["panoptic"][g][k] for g, k in groups)]
        for n, m in results.items()
        if "panoptic" in m
    ]
    return [
        *_section("Class-agnostic instance segmentation (all classes collapsed, maxDets 100)",
                  ["predictions", *ap], agnostic),
        *_section("Semantic-aware instance segmentation (majority-vote map, unmatched dropped)",
                  ["predictions", "classes matched", *ap], aware),
        *_section("Semantic segmentation (pixel confusion; Hungarian 1:1, majority many:1)",
                  ["predictions", "mIoU", "pixel acc", "mIoU (majority)",
                   "pixel acc (majority)", "clusters matched 1:1"], semantic),
        *_section("Panoptic segmentation (COCO PQ; things by the instance map, stuff 1:1)",
                  ["predictions", "PQ", "SQ", "RQ", "PQ^Th", "SQ^Th", "RQ^Th", "PQ^St",
                   "SQ^St", "RQ^St"], panoptic),
    ]  # fmt: skip


def _protocol(cfg: PipelineConfig) -> dict[str, Any]:
    e = cfg.evaluate
    return {
        "maps": f"applied from {e.mapping_from}" if e.mapping_from else "fit on this set",
        "instance_map": (
            f"majority vote of predictions with score >= {e.min_score} and box IoU > "
            f"{e.min_iou} with their best ground-truth box; unmatched classes dropped"
        ),
        "semantic_maps": "Hungarian one-to-one (maximising matched pixels) and majority",
        "panoptic": (
            "things mapped by the instance map, stuff clusters by a Hungarian match to "
            "ground-truth stuff classes; segments of unmatched clusters are void; a match "
            "is IoU > 0.5"
        ),
        "max_dets": e.max_dets,
    }


def per_class_table(metrics: dict[str, Any]) -> list[str]:
    """One row per ground-truth class that anything scored: IoU, PQ / SQ / RQ with TP / FP /
    FN, class-aware mask AP (matched classes only)."""
    iou: dict[str, float] = {}
    if "semantic" in metrics:
        semantic = metrics["semantic"]
        pairs = zip(semantic["classes"], semantic["hungarian"]["per_class_iou"], strict=True)
        iou = {name: v for name, v in pairs if not math.isnan(v)}
    pq = metrics.get("panoptic", {}).get("per_class", {})
    ap = metrics.get("instance", {}).get("segm", {}).get("per_class", {})
    names = sorted(set(iou) | set(pq) | set(ap))
    rows = [
        [n, iou.get(n), *(pq[n][k] if n in pq else None for k in ("PQ", "SQ", "RQ")),
         *(pq[n][k] if n in pq else None for k in ("tp", "fp", "fn")), ap.get(n)]
        for n in names
    ]  # fmt: skip
    header = ["class", "IoU", "PQ", "SQ", "RQ", "TP", "FP", "FN", "AP^mask"]
    return _section("Per class", header, rows)


def report(gt: GroundTruth, cfg: PipelineConfig, results: dict[str, dict[str, Any]]) -> str:
    """report.md: ground truth, protocol, tables, pictures."""
    things, stuff = len(gt.thing_ids), len(gt.stuff_ids)
    lines = [
        "# Evaluation report",
        "",
        f"Ground truth: {gt.format} `{gt.source}`, {len(gt.images)} images, {things} thing "
        f"and {stuff} stuff categories, {len(gt.semantic_classes)} semantic classes "
        f"({cfg.evaluate.semantic_level} level).",
        "",
        *(f"- {k.replace('_', ' ')}: {v}" for k, v in _protocol(cfg).items()),
        *tables(results),
        "",
        "Numbers are in %; '-' where the ground truth has nothing to score (no instance of "
        "that size, or no such annotation).",
    ]
    for name, m in results.items():
        images = m["images"]
        lines += ["", f"## {name}", "",
                  f"{images['scored']} images scored, {images['without_prediction']} without "
                  f"a prediction (scored as empty), {images['predicted_not_in_ground_truth']} "
                  "predicted images outside the ground truth (ignored)."]  # fmt: skip
        if images["without_prediction"] == images["scored"]:
            lines += ["", f"**No ground-truth image has a prediction in {name}**: check that "
                      "the predictions were made on the ground truth's images (matched by "
                      "file name)."]  # fmt: skip
        lines += per_class_table(m)
        for picture, what in (("confusion.png", "confusion"), ("iou.png", "per-class IoU"),
                              ("overlays.png", "photo | ground truth | prediction")):  # fmt: skip
            if picture in m.get("pictures", []):
                lines += ["", f"![{name} {what}]({name}/{picture})"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- pictures


def _compact(
    segments: np.ndarray, category_of: dict[int, int], colour_of: dict[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids renumbered 0..n (0 stays void) and each one's colour index (-1: none)."""
    ids, inverse = np.unique(segments, return_inverse=True)
    colours = np.full(len(ids) + 1, -1, dtype=np.int64)
    renumbered = np.zeros(len(ids), dtype=np.int64)
    for k, seg in enumerate(ids.tolist()):
        if seg == 0:
            continue
        renumbered[k] = k + 1
        colours[k + 1] = colour_of.get(category_of.get(seg, -1), -1)
    return renumbered[inverse].reshape(segments.shape), colours


def _overlay_rows(
    gt: GroundTruth,
    pred: Predictions,
    maps: Maps,
    photos: dict[str, str],
    limit: int,
    max_pixels: int,
) -> list[np.ndarray]:
    """photo | ground truth | prediction (after the maps) for the first `limit` images."""
    colour_of = {c.id: k for k, c in enumerate(gt.categories)}
    # A semantic class takes the colour of its first category, so right answers match.
    class_colour: dict[int, int] = {}
    for category, cls in gt.semantic_of.items():
        class_colour.setdefault(cls, colour_of[category])
    stuff_colour = {
        c.id: class_colour.get(maps.semantic_hungarian.get(c.id, -1), -1) for c in pred.categories
    }
    rows = []
    for image in gt.images[:limit]:
        try:
            photo = read_image(photos[image.key], max_pixels)
        except (ImageError, KeyError):
            continue
        if gt.has_panoptic:
            segments, info = gt.panoptic(image)
            gt_seg, gt_col = _compact(segments, {s: c for s, (c, _) in info.items()}, colour_of)
        else:
            semantic = gt.semantic(image)
            gt_seg, gt_col = semantic + 1, np.arange(-1, len(gt.semantic_classes) + 1)
            gt_seg[semantic == 255] = 0
        if photo.shape[:2] != gt_seg.shape:
            continue
        found = pred.images.get(image.key)
        if pred.kind == "semantic" and found is not None:
            identity = {c.id: c.id for c in pred.categories}
            pred_seg, pred_col = _compact(semantic_labels(found), identity, stuff_colour)
        elif pred.kind == "panoptic" and found is not None:
            pred_ids, predicted = pred.panoptic(found)
            mapped = {s: maps.instance.get(c, maps.stuff.get(c, -1)) for s, c in predicted.items()}
            pred_seg, pred_col = _compact(pred_ids, mapped, colour_of)
        else:
            pred_seg = np.zeros(gt_seg.shape, dtype=np.int64)
            anns = found.annotations if found is not None else ()
            for k, ann in enumerate(sorted(anns, key=lambda a: -a["area"]), start=1):
                pred_seg[rle_to_mask(ann["segmentation"])] = k
            pred_col = None
        panels = [
            photo,
            blend(photo, color_segments(gt_seg, gt_col)),
            blend(photo, color_segments(pred_seg, pred_col)),
        ]
        rows.append(side_by_side(panels, [image.file_name, "ground truth", pred.name]))
    return rows


def _pictures(
    stage: StageDir,
    cfg: PipelineConfig,
    gt: GroundTruth,
    pred: Predictions,
    maps: Maps,
    metrics: dict[str, Any],
    confusion: np.ndarray | None,
    photos: dict[str, str],
) -> list[str]:
    written = []
    name = pred.name
    if confusion is not None:
        present = np.flatnonzero(confusion.sum(axis=0) > 0)  # GT classes in this set
        counts = confusion[:-1][:, present]
        rows = {c.id: k for k, c in enumerate(pred.categories)}
        column = {int(c): k for k, c in enumerate(present)}
        mapping = {
            rows[p]: column[c] for p, c in maps.semantic_hungarian.items() if int(c) in column
        }
        names = [gt.semantic_classes[c] for c in present]
        figure = confusion_figure(
            counts, [c.name for c in pred.categories], names, mapping,
            f"{name}: share of each class's pixels",
        )  # fmt: skip
        stage.write_bytes(f"{name}/confusion.png", figure)
        iou = metrics["semantic"]["hungarian"]["per_class_iou"]
        bars = iou_bars(list(gt.semantic_classes), iou, f"{name}: IoU per class (Hungarian)")
        stage.write_bytes(f"{name}/iou.png", bars)
        written += ["confusion.png", "iou.png"]
    strips = _overlay_rows(gt, pred, maps, photos, cfg.evaluate.overlays, cfg.data.max_pixels)
    if strips:
        width = max(r.shape[1] for r in strips)
        sheet = np.full((sum(r.shape[0] for r in strips), width, 3), 255, dtype=np.uint8)
        y = 0
        for r in strips:
            sheet[y : y + r.shape[0], : r.shape[1]] = r
            y += r.shape[0]
        stage.write_bytes(f"{name}/overlays.png", png_bytes(sheet))
        written.append("overlays.png")
    return written


def _photos(cfg: PipelineConfig) -> dict[str, str]:
    """Image key -> path of the run's photos (none when data.source is unset)."""
    if not cfg.data.source:
        return {}
    refs = list_images(cfg.data.source, cfg.data.root).to_pylist()
    return {image_key(r["file_name"]): r["path"] for r in refs}


# --------------------------------------------------------------------------- the stage


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Score every prediction set of `evaluate.predictions`; metrics, report, maps."""
    e = cfg.evaluate
    gt = load_ground_truth(e)
    if not gt.images:
        raise ValueError(f"evaluate: the ground truth {gt.source} holds no image to score")
    sets = [resolve(entry, cfg.output_dir) for entry in e.predictions]
    if not sets:
        raise ValueError("evaluate: evaluate.predictions is empty")
    stage = StageDir(cfg.output_dir, STAGE)
    # Scores are recomputed on every run: the config of the last one is the one that holds.
    stage.write_json(CONFIG, {"stage": STAGE, "resolved": to_dict(cfg)})
    settings = Settings(e.min_score, e.min_iou, e.max_dets)
    on_ray = len(gt.images) >= e.ray_min_images
    photos = _photos(cfg)
    results: dict[str, dict[str, Any]] = {}
    with ray_session(cfg.ray) if on_ray else contextlib.nullcontext():
        for name, path in sets:
            pred = load_predictions(name, path)
            maps = None
            if e.mapping_from:
                source = StageDir(e.mapping_from, name)
                if not source.exists(MAPPING):
                    raise FileNotFoundError(f"no saved maps for '{name}': {source.file(MAPPING)}")
                maps = Maps.from_json(source.read_json(MAPPING))
            metrics, maps, first = evaluate(
                gt, pred, settings, maps, e.chunk_size, on_ray, e.concurrency, e.num_cpus
            )
            stage.write_json(f"{name}/{MAPPING}", maps.to_json())
            confusion = first.confusion.counts if first.confusion is not None else None
            metrics["pictures"] = _pictures(stage, cfg, gt, pred, maps, metrics, confusion, photos)
            results[name] = metrics
    stage.write_json(
        METRICS,
        json_ready({
            "ground_truth": {"format": gt.format, "source": gt.source, "images": len(gt.images),
                             "semantic_classes": list(gt.semantic_classes)},
            "protocol": _protocol(cfg),
            "predictions": results,
        }),
    )  # fmt: skip
    text = report(gt, cfg, results)
    stage.write_bytes(REPORT, text.encode())
    counts = {"images": len(gt.images), "prediction_sets": len(results), "on_ray": int(on_ray)}
    errors = pa.table({"prediction": pa.array([], pa.string())})
    return stage.finish(counts, errors, {"files": [METRICS, REPORT], "table": tables(results)})
