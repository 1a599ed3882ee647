"""Stage `evaluate`: every number of the U2Seg tables for each prediction set, one report.

For each entry of `evaluate.predictions` (stages of the run such as `maskcut` and
`panoptic`, or prediction directories in the same COCO layout) against the ground truth of
`evaluate.gt_*` (see u2seg.data.groundtruth), `evaluate` fits or applies the maps
and scores: two passes over chunks of images (u2seg.stages._scoring), in process, or on
Ray Data when the set has at least `evaluate.ray_min_images` images. Outputs under `evaluate/`:

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
import pickle
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from u2seg.artifacts import CONFIG, StageDir, png_bytes
from u2seg.config import PipelineConfig, to_dict
from u2seg.data.coco import segmentation_to_mask
from u2seg.data.groundtruth import (
    GroundTruth,
    GroundTruthError,
    image_key,
    load_cityscapes,
    load_coco,
    load_coco_panoptic,
    load_cocostuff27,
    restrict,
)
from u2seg.data.images import ImageError, list_images, read_image
from u2seg.data.predictions import (
    Predictions,
    load_predictions,
    resolve,
    semantic_labels,
)
from u2seg.lease import leased
from u2seg.ops.figures import blend, color_segments, confusion_figure, iou_bars, side_by_side
from u2seg.ops.metrics import MIOU_RULES, VOTE_RULES
from u2seg.plan import planned
from u2seg.runtime import actor_pool, ray_session
from u2seg.stages._report import json_ready, protocol, report, tables
from u2seg.stages._scoring import (
    Job,
    Maps,
    Settings,
    Stats,
    check_maps,
    chunks,
    fit_maps,
    score_chunk,
    summarise,
)

STAGE = "evaluate"


METRICS = "metrics.json"


REPORT = "report.md"


MAPPING = "mapping.json"


class ChunkScorer:
    """Ray Data actor: scores pickled chunks with the job it was built with."""

    def __init__(self, job: bytes, maps: bytes) -> None:
        self.job: Job = pickle.loads(job)
        self.maps: Maps | None = pickle.loads(maps)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[bytes]]:
        # Each row is one chunk: image pairs (first pass) or records (second pass).
        out = [
            pickle.dumps(score_chunk(self.job, pickle.loads(chunk), self.maps))
            for chunk in batch["chunk"]
        ]
        return {"stats": out}


def _size(part: Any) -> int:
    return part.images if isinstance(part, Stats) else len(part)


def run_pass(
    job: Job,
    parts: Sequence[Any],
    maps: Maps | None,
    on_ray: bool,
    concurrency: int = 2,
    num_cpus: float = 0.5,
    desc: str = "evaluate",
    max_concurrency: int | None = None,
) -> Stats:
    """One pass over every chunk (image pairs for the first, the first pass's `Stats` of
    each chunk for the second), in process or on Ray Data; the merged statistics."""
    total = Stats()
    if maps is None and job.semantic:
        total.confusion = job.empty_confusion()
    light = Job(job.gt.without_images(), job.pred.without_images(), job.settings)
    with tqdm(total=sum(_size(p) for p in parts), desc=desc, unit="image") as bar:
        if not on_ray:
            for part in parts:
                total.merge(score_chunk(light, part, maps))
                bar.update(_size(part))
            return total
        import ray.data

        items = ray.data.from_items([{"chunk": pickle.dumps(p)} for p in parts])
        ds = items.map_batches(
            ChunkScorer,
            fn_constructor_kwargs={"job": pickle.dumps(light), "maps": pickle.dumps(maps)},
            batch_size=1,
            compute=actor_pool(concurrency, max_concurrency),
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
    max_concurrency: int | None = None,
) -> tuple[dict[str, Any], Maps, Stats]:
    """Score `pred` against `gt`: (metrics, the maps used, first-pass statistics).

    `maps` None fits them on this set; otherwise they are applied as given. On Ray, a pool
    of `concurrency` actors (growing to `max_concurrency`) of `num_cpus` CPUs each.
    """
    job = Job(gt, pred, settings)
    parts = chunks(gt, pred, chunk_size)
    start = time.perf_counter()
    pool = concurrency, num_cpus
    first = run_pass(job, parts, None, on_ray, *pool, f"evaluate {pred.name} 1/2", max_concurrency)
    if maps is None:
        maps = fit_maps(job, first)
    else:
        check_maps(job, maps, pred.path)
    second = Stats()
    if job.class_aware or job.panoptic:
        # The second pass reads no image: it scores the first pass's records.
        records = [
            Stats(
                images=len(part),
                records=first.records[k : k + len(part)],
                panoptic=first.panoptic[k : k + len(part)],
            )
            for k, part in zip(range(0, len(gt.images), chunk_size), parts, strict=True)
        ]
        second = run_pass(
            job, records, maps, on_ray, *pool, f"evaluate {pred.name} 2/2", max_concurrency
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
    if cfg.panoptic_level != "category" and fmt != "coco-panoptic":
        raise GroundTruthError(
            f"evaluate.panoptic_level={cfg.panoptic_level} needs supercategories: "
            f"gt_format=coco-panoptic, not {fmt}"
        )
    if fmt == "coco":
        gt = load_coco(cfg.gt_instances)
    elif fmt == "coco-panoptic":
        gt = load_coco_panoptic(
            cfg.gt_panoptic_json,
            cfg.gt_panoptic_root,
            cfg.gt_instances,
            cfg.semantic_level,
            cfg.panoptic_level,
        )
    elif fmt == "cocostuff27":
        gt = load_cocostuff27(cfg.gt_semantic_root)
    else:
        gt = load_cityscapes(cfg.gt_cityscapes)
    return restrict(gt, cfg.image_list) if cfg.image_list else gt


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


def _by_area(anns: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(anns, key=lambda a: -float(a.get("area", 0)))


def _paint(anns: Sequence[dict[str, Any]], shape: tuple[int, int]) -> np.ndarray:
    """int64 (H, W): instance k (1..n, by descending area, so smaller ones stay visible)
    where its mask is, 0 elsewhere."""
    painted = np.zeros(shape, dtype=np.int64)
    for k, ann in enumerate(_by_area(anns), start=1):
        painted[segmentation_to_mask(ann["segmentation"], *shape)] = k
    return painted


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
    # A stuff supercategory (panoptic_level) takes the colour of its first member.
    for category, group in gt.stuff_groups.items():
        colour_of.setdefault(group, colour_of[category])
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
        elif gt.has_semantic:
            semantic = gt.semantic(image)
            gt_seg, gt_col = semantic + 1, np.arange(-1, len(gt.semantic_classes) + 1)
            gt_seg[semantic == 255] = 0
        else:  # instances only (a COCO instances JSON)
            anns = gt.instances(image)
            gt_seg = _paint(anns, photo.shape[:2])
            gt_col = np.asarray([-1] + [colour_of[a["category_id"]] for a in _by_area(anns)])
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
            dets = found.annotations if found is not None else ()
            pred_seg = _paint(dets, gt_seg.shape)
            # Class-aware instances take their mapped class's colour; class-agnostic ones
            # (no instance map) one colour each.
            pred_col = None
            if maps.instance:
                classes = [maps.instance.get(a["category_id"], -1) for a in _by_area(dets)]
                pred_col = np.asarray([-1] + [colour_of.get(c, -1) for c in classes])
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


def set_names(sets: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The sets with names fit for a folder of `evaluate/` and unique: characters other than
    letters, digits, '.', '_' and '-' become '_', a name of dots gets a 'set' prefix, and a
    repeated name (runs/a/predict beside runs/b/predict) gets -2, -3... in order."""
    used: set[str] = set()
    named = []
    for name, path in sets:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        safe = f"set{safe}" if not safe.strip(".") else safe
        unique, k = safe, 1
        while unique in used:
            k += 1
            unique = f"{safe}-{k}"
        used.add(unique)
        named.append((unique, path))
    return named


@planned("evaluate")
@leased
def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Score every prediction set of `evaluate.predictions`; metrics, report, maps."""
    e = cfg.evaluate
    if e.miou_rule not in MIOU_RULES:
        raise ValueError(f"evaluate.miou_rule={e.miou_rule!r} is not one of {MIOU_RULES}")
    if e.vote_rule not in VOTE_RULES:
        raise ValueError(f"evaluate.vote_rule={e.vote_rule!r} is not one of {VOTE_RULES}")
    gt = load_ground_truth(e)
    if not gt.images:
        raise ValueError(f"evaluate: the ground truth {gt.source} holds no image to score")
    sets = set_names([resolve(entry, cfg.output_dir) for entry in e.predictions])
    if not sets:
        raise ValueError("evaluate: evaluate.predictions is empty")
    stage = StageDir(cfg.output_dir, STAGE)
    # Scores are recomputed on every run: the config of the last one is the one that holds.
    stage.write_json(CONFIG, {"stage": STAGE, "resolved": to_dict(cfg)})
    settings = Settings(e.min_score, e.min_iou, e.max_dets, e.miou_rule, e.vote_rule)
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
                gt,
                pred,
                settings,
                maps,
                e.chunk_size,
                on_ray,
                e.concurrency,
                e.num_cpus,
                e.max_concurrency,
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
            "protocol": protocol(cfg),
            "predictions": results,
        }),
    )  # fmt: skip
    text = report(gt, cfg, results)
    stage.write_bytes(REPORT, text.encode())
    counts = {"images": len(gt.images), "prediction_sets": len(results), "on_ray": int(on_ray)}
    errors = pa.table({"prediction": pa.array([], pa.string())})
    return stage.finish(counts, errors, {"files": [METRICS, REPORT], "table": tables(results)})
