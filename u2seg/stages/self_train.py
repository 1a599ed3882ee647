"""Stage `self-train`: rounds of training on the model's own confident predictions (docs/method.md
stage 6, CutLER's recipe), after `train` (round 0).

Round r = 1..R lives in `self-train/round-<r>/`, a run directory of its own whose steps are
the ordinary stages, so each resumes as that stage does:

1. `predict/`: the previous model (round 1: `train/model.pt`) over the training images,
   at most `self_train.detections_per_image` (30) detections per image;
2. `panoptic/`: the new pseudo labels. Per image: the predictions with score >= the
   round's `self_train.score_thresh` (0.7, then 0.65), plus every old pseudo mask whose max
   mask IoU with them is below `self_train.add_back_iou` (0.5); an image with no kept
   prediction keeps its old masks. They are merged as the panoptic stage merges (painted by
   box area, `panoptic.stuff_overlap`) over the old stuff labels; old thing pixels that no
   mask covers any more become void. Written in the panoptic stage's layout, one Ray task
   per shard of `data.shard_size` images (shards resume);
3. `train/`: training from the previous round's weights (`train.init`) for
   `self_train.max_iter` steps at `self_train.base_lr` constant, DropLoss off, copy-paste
   scale `self_train.copy_paste_scale`.

Then `self-train/final-<R>/predict/`: the last round's model over `predict.images` with the
predict section's settings; `u2seg evaluate` scores it as the set `self-train`. The
stage's manifest lists each round: predictions kept, masks added back, images that kept
their old masks, the training summary.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image
from pycocotools import mask as mask_utils

from u2seg.artifacts import StageDir, inputs_digest
from u2seg.config import ConfigError, PipelineConfig, check_scale_range, depends_on, to_dict
from u2seg.data.coco import load_json, panoptic_file_names, rle_to_mask
from u2seg.lease import leased
from u2seg.plan import planned
from u2seg.runtime import ray_session
from u2seg.stages import panoptic, predict, train
from u2seg.stages.panoptic import ROW_SCHEMA, write_outputs

STAGE = "self-train"
FINAL = "final"
_SECTIONS = ("data", "backbone", "train", "predict", "self_train", "panoptic")


def round_dir(cfg: PipelineConfig, r: int) -> str:
    return f"{cfg.output_dir.rstrip('/')}/{STAGE}/round-{r}"


def _threshold(cfg: PipelineConfig, r: int) -> float:
    thresholds = cfg.self_train.score_thresh
    return float(thresholds[min(r, len(thresholds)) - 1])


def round_config(cfg: PipelineConfig, r: int, model: str) -> PipelineConfig:
    """The run config of round r: its own output directory, the predictions of `model`, and
    training from `model` on the schedule of `self_train`."""
    st = cfg.self_train
    return dataclasses.replace(
        cfg,
        output=round_dir(cfg, r),
        predict=dataclasses.replace(
            cfg.predict,
            model=model,
            images="",
            root=None,
            detections_per_image=st.detections_per_image,
        ),
        train=dataclasses.replace(
            cfg.train,
            init=model,
            weights="",
            base_lr=st.base_lr,
            steps=[],
            max_iter=st.max_iter,
            drop_loss_iou=0.0,
            copy_paste_scale=list(st.copy_paste_scale),
        ),  # fmt: skip
    )


def _check(cfg: PipelineConfig) -> None:
    st = cfg.self_train
    if not st.score_thresh or not all(0 <= t <= 1 for t in st.score_thresh):
        raise ConfigError(
            f"bad value self_train.score_thresh={list(st.score_thresh)}: values in [0, 1]"
        )
    check_scale_range("self_train.copy_paste_scale", st.copy_paste_scale)


def _mask_iou(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> np.ndarray:
    """(len(a), len(b)) mask IoU of two lists of COCO RLE segmentations."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    rles = [[{**s, "counts": s["counts"].encode()} if isinstance(s["counts"], str) else s
             for s in group] for group in (a, b)]  # fmt: skip
    return np.asarray(mask_utils.iou(rles[0], rles[1], [0] * len(b)), dtype=np.float64)


def relabel_image(
    item: dict[str, Any], threshold: float, add_back_iou: float
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One image's new instances (segmentation, category_id), as the module docstring says,
    and its counts (kept, added_back, kept_old)."""
    old = item["old"]
    kept = sorted(
        (p for p in item["predictions"] if p["score"] >= threshold), key=lambda p: -p["score"]
    )
    if not kept:
        return old, {"kept": 0, "added_back": 0, "kept_old": int(bool(old))}
    iou = _mask_iou([o["segmentation"] for o in old], [p["segmentation"] for p in kept])
    back = [o for o, best in zip(old, iou.max(axis=1) if old else [], strict=True)
            if best < add_back_iou]  # fmt: skip
    new = [{"segmentation": p["segmentation"], "category_id": p["category_id"]} for p in kept]
    return new + back, {"kept": len(kept), "added_back": len(back), "kept_old": 0}


def relabel_shard(
    items: list[dict[str, Any]], cfg: dict[str, Any], out_dir: str
) -> tuple[pa.Table, dict[str, int]]:
    """New labels of one shard of images: writes their PNGs under `out_dir`; the shard's
    rows (the panoptic stage's schema) and its counts."""
    rows, counts = [], {"kept": 0, "added_back": 0, "kept_old": 0}
    for item in items:
        instances, n = relabel_image(item, cfg["threshold"], cfg["add_back_iou"])
        counts = {k: counts[k] + n[k] for k in counts}
        height, width = item["height"], item["width"]
        stuff = np.full((height, width), 255, np.uint8)
        if item["semantic"]:  # stuff 1..S -> 0..S-1; things and void -> void
            with fsspec.open(item["semantic"], "rb") as fh:
                old = np.asarray(Image.open(io.BytesIO(fh.read())))
            is_stuff = (old >= 1) & (old <= cfg["s"])
            stuff[is_stuff] = old[is_stuff] - 1
        masks = [rle_to_mask(a["segmentation"]) for a in instances]
        labels = [int(a["category_id"]) for a in instances]
        rows.append(panoptic.label_row(item, masks, labels, stuff, cfg, out_dir))
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA), counts


def _items(old_dir: StageDir, predictions: StageDir) -> list[dict[str, Any]]:
    """Per image of the predictions: its old annotations, predictions, old semantic PNG."""
    what = "self-training labels"
    old = load_json(old_dir.file(panoptic.INSTANCES_JSON), what, ValueError)
    preds = load_json(predictions.file("instances.json"), what, ValueError)
    old_ids = {im["file_name"]: im["id"] for im in old["images"]}
    by_old: dict[int, list[dict[str, Any]]] = {}
    for a in old["annotations"]:
        by_old.setdefault(int(a["image_id"]), []).append(
            {"segmentation": a["segmentation"], "category_id": int(a["category_id"])}
        )
    by_pred: dict[int, list[dict[str, Any]]] = {}
    for a in preds["annotations"]:
        by_pred.setdefault(int(a["image_id"]), []).append(
            {"segmentation": a["segmentation"], "category_id": int(a["category_id"]),
             "score": float(a["score"])}
        )  # fmt: skip
    old_pngs = panoptic_file_names(list(old_ids))
    images = sorted(preds["images"], key=lambda im: im["id"])
    pngs = panoptic_file_names([im["file_name"] for im in images])
    items = []
    for im in images:
        name = im["file_name"]
        previous = old_ids.get(name)
        items.append(
            {
                "image_id": int(im["id"]), "file_name": name, "png": pngs[name],
                "width": int(im["width"]), "height": int(im["height"]),
                "old": by_old.get(previous, []) if previous is not None else [],
                "predictions": by_pred.get(int(im["id"]), []),
                "semantic": old_dir.fs.unstrip_protocol(
                    old_dir.file(f"semantic/{old_pngs[name]}")) if previous is not None else "",
            }
        )  # fmt: skip
    return items


def relabel(cfg: PipelineConfig, r: int, old_dir: StageDir) -> dict[str, Any]:
    """Round r's `panoptic/` from its `predict/` and the previous labels `old_dir`."""
    import ray

    round_cfg_dir = round_dir(cfg, r)
    stage = StageDir(round_cfg_dir, panoptic.STAGE)
    threshold = _threshold(cfg, r)
    depends = {"round": r, "threshold": threshold, "add_back_iou": cfg.self_train.add_back_iou,
               **to_dict(cfg.panoptic),
               "previous": old_dir.fs.unstrip_protocol(old_dir.path)}  # fmt: skip
    stage.start({"self_train": to_dict(cfg.self_train), **depends}, depends)
    if stage.exists("manifest.json"):
        return stage.manifest()
    categories = load_json(old_dir.file(panoptic.PANOPTIC_JSON), "labels", ValueError)["categories"]
    k = sum(1 for c in categories if c["isthing"])
    s = len(categories) - k
    items = _items(old_dir, StageDir(round_cfg_dir, predict.STAGE))
    size = cfg.data.shard_size
    shards = {i // size: items[i : i + size] for i in range(0, len(items), size)}
    digests = {i: inputs_digest([json.dumps(part, sort_keys=True)]) for i, part in shards.items()}
    done = stage.reusable_shards(digests)
    options = {"threshold": threshold, "add_back_iou": cfg.self_train.add_back_iou,
               **panoptic.merge_options(cfg, k, s)}  # fmt: skip
    out_dir = stage.fs.unstrip_protocol(stage.path)
    totals = {"kept": 0, "added_back": 0, "kept_old": 0}
    todo = {i: part for i, part in shards.items() if i not in done}
    if todo:
        with ray_session(cfg.ray):
            task = ray.remote(num_cpus=cfg.data.read_num_cpus)(relabel_shard)
            pending = {task.remote(part, options, out_dir): i for i, part in todo.items()}
            while pending:
                ready, _ = ray.wait(list(pending))
                index = pending.pop(ready[0])
                table, counts = ray.get(ready[0])
                stage.write_table(stage.shard_name(index), table, digests[index])
                totals = {key: totals[key] + counts[key] for key in totals}
    written = write_outputs(stage, k, s, f"u2seg self-training round {r} pseudo labels")
    counts = {**written, **totals, "resumed_shards": len(done)}
    empty = pa.table({"image_id": pa.array([], pa.int64())})
    return stage.finish(counts, empty, {"threshold": threshold})


@planned("self-train")
@leased
def run(cfg: PipelineConfig) -> dict[str, Any]:
    """R self-training rounds after `train`; returns the stage manifest."""
    _check(cfg)
    first = StageDir(cfg.output_dir, train.STAGE)
    first.manifest()  # round 0 must be complete
    stage = StageDir(cfg.output_dir, STAGE)
    depends = depends_on(cfg, _SECTIONS)
    depends["self_train"].pop("rounds")  # more rounds continue the ones done
    stage.start(to_dict(cfg), depends, has_results=stage.fs.exists(stage.path))
    model = first.fs.unstrip_protocol(first.file(train.MODEL_FILE))
    labels = StageDir(cfg.output_dir, panoptic.STAGE)
    # One Ray for every round's stages and the final predictions (each would start its own).
    with ray_session(cfg.ray):
        rounds = []
        for r in range(1, cfg.self_train.rounds + 1):
            round_cfg = round_config(cfg, r, model)
            predicted = predict.run(round_cfg)
            relabelled = relabel(cfg, r, labels)
            trained = train.run(round_cfg)
            out = StageDir(round_cfg.output_dir, train.STAGE)
            model = out.fs.unstrip_protocol(out.file(train.MODEL_FILE))
            labels = StageDir(round_cfg.output_dir, panoptic.STAGE)
            curve = trained["curve"]
            rounds.append({"round": r, "from": round_cfg.train.init,
                           "threshold": relabelled["threshold"], "predicted": predicted["counts"],
                           "labels": relabelled["counts"], "train": trained["counts"],
                           "loss": curve[-1]["loss"] if curve else None})  # fmt: skip
        final_dir = f"{FINAL}-{len(rounds)}"  # one per round count: more rounds, new predictions
        final = dataclasses.replace(
            cfg, output=f"{cfg.output_dir.rstrip('/')}/{STAGE}/{final_dir}",
            predict=dataclasses.replace(cfg.predict, model=model),
        )  # fmt: skip
        final_manifest = predict.run(final)
    counts = {"rounds": len(rounds), "images": final_manifest["counts"].get("images", 0)}
    empty = pa.table({"image_id": pa.array([], pa.int64())})
    return stage.finish(counts, empty, {"rounds": rounds, "model": model,
                                        "predictions": f"{final_dir}/{predict.STAGE}"})  # fmt: skip
