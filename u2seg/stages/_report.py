"""The evaluation report as text: metrics.json made strict JSON, and report.md's tables
(the rows of the paper's tables, a per-class table, the protocol and its thresholds).
"""

from __future__ import annotations

import math
from typing import Any

from u2seg.config import PipelineConfig
from u2seg.data.groundtruth import GroundTruth


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
        # Box-only predictions have no mask AP: "-".
        return [entry.get(t, {}).get(k) for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75")]

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


def protocol(cfg: PipelineConfig) -> dict[str, Any]:
    e = cfg.evaluate
    return {
        "maps": f"applied from {e.mapping_from}" if e.mapping_from else "fit on this set",
        "instance_map": (
            f"majority vote of predictions with score >= {e.min_score} for "
            + (
                f"every ground-truth box (crowd included) with box IoU > {e.min_iou}, as "
                "U2Seg's do_hangarain_mapping"
                if e.vote_rule == "every"
                else f"their best non-crowd ground-truth box when box IoU > {e.min_iou}"
            )
            + "; unmatched classes dropped"
        ),
        "semantic_maps": "Hungarian one-to-one (maximising matched pixels) and majority",
        "miou": (
            "mean over every class whose IoU is defined (in the ground truth or claimed by a "
            "mapped cluster), as STEGO and mmseg"
            if e.miou_rule == "defined"
            else "mean over the classes present in the ground truth"
        ),
        "panoptic": (
            "things mapped by the instance map, stuff clusters by a Hungarian match to "
            "ground-truth stuff "
            + (
                "supercategories (U2Seg's panoptic ground truth: thing categories, stuff "
                "supercategories, one segment a stuff supercategory and image)"
                if e.panoptic_level == "supercategory"
                else "categories"
            )
            + "; segments of unmatched clusters are void; a match is IoU > 0.5"
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
    things, stuff = len(gt.thing_ids), len(gt.panoptic_ids(things=False))
    lines = [
        "# Evaluation report",
        "",
        f"Ground truth: {gt.format} `{gt.source}`, {len(gt.images)} images, {things} thing "
        f"and {stuff} stuff {'supercategories' if gt.group_categories else 'categories'} "
        f"(panoptic level: {gt.panoptic_level}), {len(gt.semantic_classes)} semantic classes "
        f"({cfg.evaluate.semantic_level} level).",
        "",
        *(f"- {k.replace('_', ' ')}: {v}" for k, v in protocol(cfg).items()),
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
