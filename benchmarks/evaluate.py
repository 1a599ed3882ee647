"""The evaluate stage: images/s of `u2seg.stages.evaluate.evaluate`, in process and on Ray Data.

    python benchmarks/evaluate.py [--images 1000] [--size 128] [--chunk-size 64] [--skip-ray]

Writes a synthetic set to a temporary folder (generation and loading are timed and printed
but not counted): a COCO panoptic ground truth of --images square images of --size pixels
(4 thing and 3 stuff categories: sky over grass, a wall in some images, 3..8 thing
rectangles / ellipses, one crowd segment in ~10 % of the images, a void strip in ~30 %) and
a prediction directory (panoptic.json + panoptic/ PNGs + instances.json) of pseudo classes:
K=6 thing clusters (each GT thing class has its own cluster, two of them are split over a
second cluster, 5 % of the instances get a random cluster), S=4 stuff clusters (one GT
stuff class is split over two clusters in ~25 % of the images), all ids permuted; things
are jittered by a few pixels, ~10 % dropped, 0..2 false positives an image, random scores.
So the majority vote (things) and the Hungarian match (stuff) both have work to do.

Measured on one machine (2 cores where this was written), each path as wall seconds and
images/s over the whole set:

1. u2seg in process: `evaluate(..., on_ray=False)`, both passes: every PNG read once for
   the semantic confusion matrix, the instance votes, the per-image IoU and overlap
   records and the class-agnostic box and mask AP; then the maps, and class-aware box and
   mask AP and PQ from the records.
2. u2seg on Ray Data: the same with `on_ray=True` (2 actors x 0.5 CPU) in a local 2-CPU Ray.
   Starting Ray is timed separately and left out; starting the actors of each pass is
   included. Its metrics must equal the in-process ones (1e-9, `images.seconds` aside).
3. Baseline, the monolithic way upstream code evaluates, computing the same numbers with
   the known (generating) cluster -> class map instead of a map search: one loop over the
   images reading the GT and predicted panoptic PNGs once (GT thing segments RLE-encoded,
   `u2seg.ops.metrics.pq_stats`, the pixel confusion matrix), then one pycocotools COCOeval
   over the whole set per box / mask, class-agnostic and class-aware (all GT in one COCO
   object, all detections in one `loadRes`). Its class-agnostic AP and confusion matrix
   must equal u2seg's (1e-9): a check of the chunked COCOeval; when u2seg's fitted maps
   equal the known map, class-aware AP and PQ are compared as well.

The table's ratio is images/s of the path over images/s of the baseline: the price of
streaming in chunks and searching the maps against holding everything in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from u2seg.config import RayConfig
from u2seg.data.coco import mask_to_annotation, rgb_to_id
from u2seg.data.groundtruth import load_coco_panoptic, write_coco_panoptic
from u2seg.data.predictions import load_predictions
from u2seg.ops.coco_eval import SUMMARY
from u2seg.ops.metrics import ConfusionMatrix, PQStats, pq_stats, pq_summary
from u2seg.runtime import ray_session
from u2seg.stages._scoring import Settings
from u2seg.stages.evaluate import evaluate

T = TypeVar("T")

THINGS = {1: "person", 2: "car", 3: "dog", 4: "chair"}
STUFF = {5: "sky", 6: "grass", 7: "wall"}
SKY, GRASS, WALL = 5, 6, 7
GT_CATEGORIES = [
    *({"id": c, "name": n, "isthing": 1, "supercategory": n} for c, n in THINGS.items()),
    *({"id": c, "name": n, "isthing": 0, "supercategory": n} for c, n in STUFF.items()),
]
K_THINGS, S_STUFF = 6, 4
THING_CLUSTERS = list(range(1, K_THINGS + 1))  # predicted ids 1..6
STUFF_CLUSTERS = list(range(K_THINGS + 1, K_THINGS + S_STUFF + 1))  # predicted ids 7..10
PRED_CATEGORIES = [
    *({"id": c, "name": f"thing-{c}", "isthing": 1} for c in THING_CLUSTERS),
    *({"id": c, "name": f"stuff-{c}", "isthing": 0} for c in STUFF_CLUSTERS),
]
Scene = tuple[dict[str, Any], np.ndarray, list[dict[str, Any]]]


# --------------------------------------------------------------------------- the data


class Plan:
    """The generating cluster <-> class assignment (fixed by the seed).

    Each GT thing class has a primary cluster; two of them also a secondary one that takes
    30 % of their instances. Each GT stuff class has a primary stuff cluster; the spare one
    takes `split_stuff` in 25 % of the images. `instance` / `stuff`: the known maps
    (predicted -> GT) that the baseline uses and that the vote and Hungarian should find.
    """

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 0])
        things = rng.permutation(THING_CLUSTERS).tolist()
        self.primary = {c: int(things[k]) for k, c in enumerate(THINGS)}
        self.secondary = {1: int(things[4]), 2: int(things[5])}
        stuff = rng.permutation(STUFF_CLUSTERS).tolist()
        self.stuff_primary = {c: int(stuff[k]) for k, c in enumerate(STUFF)}
        self.split_stuff, self.spare_stuff = SKY, int(stuff[3])
        self.instance = {v: k for k, v in {**self.primary}.items()}
        self.instance.update({v: k for k, v in self.secondary.items()})
        self.stuff = {v: k for k, v in self.stuff_primary.items()}

    def thing_cluster(self, category: int, rng: np.random.Generator) -> int:
        if rng.uniform() < 0.05:
            return int(rng.choice(THING_CLUSTERS))
        if category in self.secondary and rng.uniform() < 0.3:
            return self.secondary[category]
        return self.primary[category]


def shape_mask(size: int, shape: tuple[int, int, int, int, bool]) -> np.ndarray:
    """bool (size, size) mask of a rectangle or the ellipse inscribed in it (y, x, h, w)."""
    y, x, h, w, ellipse = shape
    mask = np.zeros((size, size), dtype=bool)
    if not ellipse:
        mask[y : y + h, x : x + w] = True
        return mask
    yy, xx = np.mgrid[0:h, 0:w]
    ry, rx = h / 2, w / 2
    mask[y : y + h, x : x + w] = ((yy + 0.5 - ry) / ry) ** 2 + ((xx + 0.5 - rx) / rx) ** 2 <= 1
    return mask


def random_shape(rng: np.random.Generator, size: int) -> tuple[int, int, int, int, bool]:
    h, w = (int(v) for v in rng.integers(max(4, size // 16), max(5, size * 45 // 100), size=2))
    y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    return y, x, h, w, bool(rng.uniform() < 0.5)


def jitter(
    rng: np.random.Generator, size: int, shape: tuple[int, int, int, int, bool]
) -> tuple[int, int, int, int, bool]:
    """The shape moved by up to 3 px and resized by up to 2 px, kept inside the image."""
    y, x, h, w, ellipse = shape
    dy, dx, dh, dw = (int(v) for v in rng.integers(-3, 4, size=4))
    h, w = int(np.clip(h + dh // 2 * 2, 3, size)), int(np.clip(w + dw // 2 * 2, 3, size))
    y, x = int(np.clip(y + dy, 0, size - h)), int(np.clip(x + dx, 0, size - w))
    return y, x, h, w, ellipse


def stuff_layout(size: int, horizon: int, wall: tuple[int, int, int, int] | None) -> np.ndarray:
    """Segment ids 1 (sky) over 2 (grass), 3 (a wall rectangle) when given."""
    segments = np.ones((size, size), dtype=np.int64)
    segments[horizon:] = 2
    if wall is not None:
        y, x, h, w = wall
        segments[y : y + h, x : x + w] = 3
    return segments


def infos(
    segments: np.ndarray,
    categories: dict[int, int],
    things: set[int],
    crowd: frozenset[int] | set[int] = frozenset(),
) -> list[dict[str, Any]]:
    """COCO panoptic segments_info of the segment ids present (id order)."""
    out = []
    ids, areas = np.unique(segments, return_counts=True)
    for seg_id, area in zip(ids.tolist(), areas.tolist(), strict=True):
        if seg_id == 0:
            continue
        ys, xs = np.nonzero(segments == seg_id)
        box = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
        category = categories[seg_id]
        out.append({
            "id": int(seg_id), "category_id": category, "isthing": int(category in things),
            "area": int(area), "bbox": box, "iscrowd": int(seg_id in crowd),
        })  # fmt: skip
    return out


def make_image(
    image_id: int, size: int, plan: Plan, seed: int
) -> tuple[Scene, Scene, list[dict[str, Any]]]:
    """One image: its GT scene, predicted scene and predicted instance annotations."""
    rng = np.random.default_rng([seed, image_id])
    entry = {"id": image_id, "file_name": f"img{image_id:05d}.jpg", "height": size, "width": size}
    horizon = int(rng.integers(size * 3 // 10, size * 7 // 10))
    wall = None
    if rng.uniform() < 0.6:
        h, w = int(rng.integers(size // 6, size // 2)), int(rng.integers(size // 6, size // 2))
        wall = (int(rng.integers(0, size - h)), int(rng.integers(0, size - w)), h, w)
    gt = stuff_layout(size, horizon, wall)
    gt_cats = {1: SKY, 2: GRASS, 3: WALL}
    shapes = []
    for k in range(int(rng.integers(3, 9))):
        shape, category = random_shape(rng, size), int(rng.integers(1, 5))
        gt[shape_mask(size, shape)] = 10 + k
        gt_cats[10 + k] = category
        shapes.append((10 + k, shape, category))
    present = set(np.unique(gt).tolist())
    crowd: set[int] = set()
    visible = [s for s in shapes if s[0] in present]
    if visible and rng.uniform() < 0.1:
        crowd.add(visible[int(rng.integers(len(visible)))][0])
    if rng.uniform() < 0.3:  # a void strip: unlabelled rows or columns
        start, width = int(rng.integers(0, size - 10)), int(rng.integers(3, 11))
        if rng.uniform() < 0.5:
            gt[start : start + width] = 0
        else:
            gt[:, start : start + width] = 0
    gt_scene = (entry, gt, infos(gt, gt_cats, set(THINGS), crowd))

    # Prediction: the stuff boundary a little off, stuff and things as clusters.
    pred = stuff_layout(size, int(np.clip(horizon + rng.integers(-2, 3), 1, size - 1)), wall)
    sky = plan.stuff_primary[SKY]
    if rng.uniform() < 0.25:
        sky = plan.spare_stuff
    pred_cats = {1: sky, 2: plan.stuff_primary[GRASS], 3: plan.stuff_primary[WALL]}
    annotations = []
    kept = [(shape, category) for seg_id, shape, category in shapes if seg_id in present]
    found = [(jitter(rng, size, s), plan.thing_cluster(c, rng), float(rng.uniform(0.05, 1.0)))
             for s, c in kept if rng.uniform() >= 0.1]  # fmt: skip
    for _ in range(int(rng.integers(0, 3))):  # false positives
        found.append((random_shape(rng, size), int(rng.choice(THING_CLUSTERS)),
                      float(rng.uniform(0.05, 0.7))))  # fmt: skip
    for k, (shape, cluster, score) in enumerate(found):
        mask = shape_mask(size, shape)
        pred[mask] = 10 + k
        pred_cats[10 + k] = cluster
        annotations.append(mask_to_annotation(mask, image_id, 0, cluster, score))
    pred_scene = (dict(entry), pred, infos(pred, pred_cats, set(THING_CLUSTERS)))
    return gt_scene, pred_scene, annotations


def write_set(folder: Path, images: int, size: int, plan: Plan, seed: int) -> tuple[Path, Path]:
    """The GT panoptic JSON (+ PNG folder) and the prediction directory."""
    gt_scenes, pred_scenes, annotations = [], [], []
    for image_id in range(1, images + 1):
        gt_scene, pred_scene, anns = make_image(image_id, size, plan, seed)
        gt_scenes.append(gt_scene)
        pred_scenes.append(pred_scene)
        annotations += anns
    for n, ann in enumerate(annotations, 1):
        ann["id"] = n
    gt_json = folder / "gt" / "panoptic.json"
    gt_json.parent.mkdir(parents=True)
    write_coco_panoptic(gt_json, gt_scenes, GT_CATEGORIES)
    pred_dir = folder / "pred"
    pred_dir.mkdir()
    write_coco_panoptic(pred_dir / "panoptic.json", pred_scenes, PRED_CATEGORIES)
    instances = {
        "images": [e for e, _, _ in pred_scenes],
        "annotations": annotations,
        "categories": [c for c in PRED_CATEGORIES if c["isthing"]],
    }
    (pred_dir / "instances.json").write_text(json.dumps(instances))
    return gt_json, pred_dir


# --------------------------------------------------------------------------- baseline


def read_ids(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return rgb_to_id(np.asarray(im.convert("RGB"))).astype(np.int64)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _coco_ap(
    images: list[dict[str, Any]],
    categories: list[int],
    truth: list[dict[str, Any]],
    results: list[dict[str, Any]],
) -> dict[str, dict[str, float]]:
    """Box and mask AP of one COCOeval each over the whole set."""
    coco_gt = COCO()
    coco_gt.dataset = {
        "images": [{"id": im["id"], "height": im["height"], "width": im["width"]}
                   for im in images],
        "categories": [{"id": c} for c in categories],
        "annotations": truth,
    }  # fmt: skip
    ap: dict[str, dict[str, float]] = {}
    with quiet():
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        for iou_type in ("bbox", "segm"):
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            ap[iou_type] = {k: float(v * 100) if v >= 0 else math.nan
                            for k, v in zip(SUMMARY, evaluator.stats[:6], strict=True)}  # fmt: skip
    return ap


def baseline(
    gt_data: dict[str, Any],
    gt_root: Path,
    pred_data: dict[str, Any],
    pred_root: Path,
    pred_instances: dict[str, Any],
    known: dict[int, int],
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, Any], np.ndarray]:
    """The same numbers the monolithic way, with the `known` cluster -> class map: one
    loop over the images (PNGs read once: GT instances, PQ, the pixel confusion matrix),
    then one COCOeval per box / mask, class-agnostic and class-aware (JSONs loaded)."""
    things = {c["id"] for c in gt_data["categories"] if c["isthing"]}
    semantic_of = {c["id"]: k for k, c in enumerate(gt_data["categories"])}
    rows = {c["id"]: k for k, c in enumerate(pred_data["categories"])}
    confusion = ConfusionMatrix(len(rows) + 1, len(semantic_of))
    gt_by_image = {a["image_id"]: a for a in gt_data["annotations"]}
    pred_by_image = {a["image_id"]: a for a in pred_data["annotations"]}
    truth: list[dict[str, Any]] = []
    pq = PQStats()
    for image in gt_data["images"]:
        gt_ann, pred_ann = gt_by_image[image["id"]], pred_by_image[image["id"]]
        gt_segments = read_ids(gt_root / gt_ann["file_name"])
        gt_info = {s["id"]: (s["category_id"], bool(s["iscrowd"])) for s in gt_ann["segments_info"]}
        for seg_id, (category, crowd) in sorted(gt_info.items()):
            mask = gt_segments == seg_id
            if category not in things or not mask.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
            truth.append({
                "id": len(truth) + 1, "image_id": image["id"], "category_id": category,
                "segmentation": rle, "area": float(mask_utils.area(rle)),
                "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": int(crowd),
            })  # fmt: skip
        segments = read_ids(pred_root / pred_ann["file_name"])
        gt_lut = np.full(int(gt_segments.max()) + 1, 255, dtype=np.int64)
        for seg_id, (category, _) in gt_info.items():
            gt_lut[seg_id] = semantic_of[category]
        pred_lut = np.full(int(segments.max()) + 1, len(rows), dtype=np.int64)
        for s in pred_ann["segments_info"]:
            pred_lut[s["id"]] = rows[s["category_id"]]
        confusion.update(pred_lut[segments], gt_lut[gt_segments])
        mapped = {s["id"]: known[s["category_id"]] for s in pred_ann["segments_info"]
                  if s["category_id"] in known}  # fmt: skip
        segments = np.where(np.isin(segments, list(mapped)), segments, 0)
        pq.merge(pq_stats(segments, mapped, gt_segments, gt_info))
    agnostic = _coco_ap(
        gt_data["images"], [1], [{**a, "category_id": 1} for a in truth],
        [{**d, "category_id": 1} for d in pred_instances["annotations"]],
    )  # fmt: skip
    aware = _coco_ap(
        gt_data["images"], sorted(things), truth,
        [{**d, "category_id": known[d["category_id"]]} for d in pred_instances["annotations"]
         if d["category_id"] in known],
    )  # fmt: skip
    stuff_ids = sorted(c["id"] for c in gt_data["categories"] if not c["isthing"])
    aps = {"class_agnostic": agnostic, "instance": aware}
    return aps, pq_summary(pq, sorted(things), stuff_ids), confusion.counts


# --------------------------------------------------------------------------- checks


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def differences(a: Any, b: Any, tol: float = 1e-9, where: str = "") -> list[str]:
    """Where nested dicts / lists of numbers and strings differ (NaN equals NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where or '.'}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in differences(a[k], b[k], tol, f"{where}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for k, (x, y) in pairs for d in differences(x, y, tol, f"{where}[{k}]")]
    if isinstance(a, int | float) and isinstance(b, int | float):
        if math.isnan(a) and math.isnan(b):
            return []
        return [] if abs(a - b) <= tol else [f"{where}: {a!r} != {b!r}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def without_seconds(metrics: dict[str, Any]) -> dict[str, Any]:
    out = dict(metrics)
    out["images"] = {k: v for k, v in metrics["images"].items() if k != "seconds"}
    return out


def ap_line(name: str, ap: dict[str, float]) -> str:
    return f"  {name:<32}" + " ".join(f"{k} {ap[k]:6.2f}" for k in SUMMARY)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images in the set")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--chunk-size", type=int, default=64, help="images per chunk")
    parser.add_argument("--skip-ray", action="store_true", help="leave out the Ray Data path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.size < 32:
        parser.error("--size must be at least 32")
    plan = Plan(args.seed)
    settings = Settings()
    print(f"{os.cpu_count()} CPUs; {args.images} images of {args.size}x{args.size} px, "
          f"chunks of {args.chunk_size}; GT 4 thing + 3 stuff classes, predictions "
          f"K={K_THINGS} thing + S={S_STUFF} stuff clusters")  # fmt: skip
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        (gt_json, pred_dir), gen_s = timed(write_set, Path(tmp), args.images, args.size, plan,
                                           args.seed)  # fmt: skip
        start = time.perf_counter()
        gt = load_coco_panoptic(str(gt_json))
        pred = load_predictions("synthetic", str(pred_dir))
        load_s = time.perf_counter() - start
        segments = sum(len(im.segments_info) for im in gt.images)
        dets = sum(len(p.annotations) for p in pred.images.values())
        print(f"generated in {gen_s:.1f} s, loaded in {load_s:.2f} s (not counted): "
              f"{segments} GT segments, {dets} predicted instances")  # fmt: skip

        print("\n1. u2seg evaluate, in process")
        (metrics, maps, first), local_s = timed(
            evaluate, gt, pred, settings, chunk_size=args.chunk_size, on_ray=False
        )
        rows.append(("u2seg in process", local_s))
        print(f"  {local_s:.2f} s, {args.images / local_s:.1f} images/s")
        known_maps = maps.instance == plan.instance and maps.stuff == plan.stuff
        print(f"  fitted maps equal the generating ones: {'yes' if known_maps else 'no'} "
              f"(instance {maps.instance}, stuff {maps.stuff})")  # fmt: skip
        for path in ("instance.bbox", "instance.segm"):
            group, key = path.split(".")
            print(ap_line(f"class-aware {key} AP", metrics[group][key]))
        pan = metrics["panoptic"]
        print(f"  PQ {pan['All']['PQ']:.2f} (things {pan['Things']['PQ']:.2f}, stuff "
              f"{pan['Stuff']['PQ']:.2f}); mIoU hungarian "
              f"{metrics['semantic']['hungarian']['mIoU']:.2f}")  # fmt: skip

        if not args.skip_ray:
            print("\n2. u2seg evaluate on Ray Data (2 actors x 0.5 CPU, local 2-CPU Ray)")
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            with contextlib.ExitStack() as stack:
                _, ray_start_s = timed(stack.enter_context, ray_session(RayConfig(num_cpus=2)))
                (ray_metrics, ray_maps, _), ray_s = timed(
                    evaluate, gt, pred, settings, chunk_size=args.chunk_size, on_ray=True,
                    concurrency=2, num_cpus=0.5,
                )  # fmt: skip
            rows.append(("u2seg on Ray Data", ray_s))
            print(f"  Ray start-up {ray_start_s:.2f} s (not counted)")
            print(f"  {ray_s:.2f} s, {args.images / ray_s:.1f} images/s (actor start-up included)")
            diff = differences(without_seconds(metrics), without_seconds(ray_metrics))
            assert not diff, f"Ray metrics differ from in-process ones: {diff[:10]}"
            assert ray_maps == maps, f"Ray maps {ray_maps} differ from in-process {maps}"
            print("  metrics match the in-process ones (1e-9, images.seconds aside)")

        print("\n3. Baseline: one COCOeval per box / mask over the set, PQ image by image")
        gt_data = json.loads(gt_json.read_text())
        pred_data = json.loads((pred_dir / "panoptic.json").read_text())
        pred_instances = json.loads((pred_dir / "instances.json").read_text())
        known = {**plan.instance, **plan.stuff}
        (base_ap, base_pq, base_confusion), base_s = timed(
            baseline, gt_data, gt_json.with_suffix(""), pred_data, pred_dir / "panoptic",
            pred_instances, known,
        )  # fmt: skip
        rows.append(("baseline (monolithic)", base_s))
        print(f"  {base_s:.2f} s, {args.images / base_s:.1f} images/s")
    for iou_type in ("bbox", "segm"):
        ours = metrics["class_agnostic"][iou_type]
        print(ap_line(f"class-agnostic {iou_type}, u2seg", ours))
        print(ap_line(f"class-agnostic {iou_type}, baseline", base_ap["class_agnostic"][iou_type]))
        diff = differences(ours, base_ap["class_agnostic"][iou_type])
        assert not diff, f"class-agnostic {iou_type} AP differs: {diff}"
    print("  class-agnostic AP of u2seg's chunked COCOeval equals the single COCOeval (1e-9)")
    assert (first.confusion.counts == base_confusion).all(), "confusion matrices differ"
    print("  the streamed pixel confusion matrix equals the baseline's")
    if known_maps:
        for iou_type in ("bbox", "segm"):
            ours_ap = {k: metrics["instance"][iou_type][k] for k in SUMMARY}
            diff = differences(ours_ap, base_ap["instance"][iou_type])
            assert not diff, f"class-aware {iou_type} AP differs: {diff}"
        print("  class-aware box and mask AP equal the baseline's with the known map (1e-9)")
        ours_pq = {g: metrics["panoptic"][g] for g in ("All", "Things", "Stuff")}
        diff = differences(ours_pq, base_pq)
        assert not diff, f"PQ differs from the baseline's: {diff}"
        print(f"  PQ equals the baseline's with the known map (1e-9): {base_pq['All']['PQ']:.2f}")
    else:
        pq = base_pq["All"]["PQ"]
        print(f"  baseline PQ with the known map {pq:.2f} (maps differ: not compared)")

    print(f"\n{'path':<24} | {'seconds':>8} | {'images/s':>9} | ratio vs baseline")
    print(f"{'-' * 24}-+-{'-' * 8}-+-{'-' * 9}-+-{'-' * 17}")
    for name, seconds in rows:
        print(f"{name:<24} | {seconds:>8.2f} | {args.images / seconds:>9.1f} | "
              f"{base_s / seconds:>6.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
