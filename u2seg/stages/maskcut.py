"""Stage `maskcut`: class-agnostic pseudo masks, images -> ViT -> MaskCut -> refine -> COCO.

Resize, ViT forward, the normalized cuts and the refinement are fused in one Ray Data actor
pool, so patch features never leave the actor (3600 x 768 floats would be ~11 MB per image).
Each shard row holds one image (and its path) and its annotations (COCO RLE, JSON text); once
every shard is written, `instances.json` is streamed from the shards in listing order, with
annotation ids 1..M in that order, so a resumed run writes the same file as a clean one.
A row also records the refinement backend that really ran (`refine`) and, per annotation,
whether the eigensolver of its cut converged (`converged`); the manifest counts both
(`refinement`, `counts.unconverged_masks`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from u2seg.artifacts import StageDir
from u2seg.config import MaskCutConfig, PipelineConfig, to_dict
from u2seg.lease import leased
from u2seg.ops.refine import resolve_backend
from u2seg.plan import planned
from u2seg.stages import import_masks
from u2seg.stages._image_loop import ImageStage, base_columns, run_image_stage
from u2seg.workers.maskcut import MaskCutWorker

STAGE = "maskcut"
INSTANCES = "instances.json"
CATEGORIES = [{"id": 1, "name": "fg", "supercategory": "fg"}]
FEATURES = ("keys", "tokens")
DISCOVERY = ("rounds", "pool")


def check_options(cfg: MaskCutConfig) -> None:
    """Fail before any work on options that the actors would reject."""
    if cfg.feature not in FEATURES:
        raise ValueError(f"maskcut.feature={cfg.feature!r} is not one of {', '.join(FEATURES)}")
    if cfg.n_masks < 1:
        raise ValueError(f"maskcut.n_masks={cfg.n_masks} must be >= 1")
    if cfg.discovery not in DISCOVERY:
        raise ValueError(
            f"maskcut.discovery={cfg.discovery!r} is not one of {', '.join(DISCOVERY)}"
        )
    resolve_backend(cfg.crf)


def to_shard_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    """The driver-side table of one result batch."""
    annotations = [str(a) for a in batch["annotations"]]
    return pa.table(
        {
            **base_columns(batch),
            "path": pa.array(batch["path"].astype(str)),
            "num_masks": pa.array([len(json.loads(a)) for a in annotations], pa.int32()),
            "annotations": pa.array(annotations, pa.string()),
            "refine": pa.array(batch["refine"].astype(str)),
            # Per annotation: whether the eigensolver of its cut converged.
            "converged": pa.array(
                [json.loads(str(c)) for c in batch["converged"]], pa.list_(pa.bool_())
            ),
        }
    )


def _good_rows(stage: StageDir) -> Iterator[dict[str, Any]]:
    """Rows of images that were read, shard by shard, in listing order."""
    for name in stage.shard_names():
        table = stage.read_table(name)
        yield from table.filter(pc.is_null(table.column("error"))).to_pylist()


def _annotations(stage: StageDir) -> Iterator[dict[str, Any]]:
    next_id = 1
    for row in _good_rows(stage):
        for ann in json.loads(row["annotations"]):
            yield {"id": next_id, "image_id": row["image_id"], **ann}
            next_id += 1


def write_instances(stage: StageDir) -> tuple[int, int]:
    """Stream `instances.json` (COCO instances, one category "fg") from the shards, holding
    one shard at a time; returns (images, annotations)."""
    images = (
        {
            "id": r["image_id"],
            "file_name": r["file_name"],
            "width": r["width"],
            "height": r["height"],
        }
        for r in _good_rows(stage)
    )
    fixed = {
        "info": {"description": "u2seg MaskCut pseudo masks"},
        "licenses": [],
        "categories": CATEGORIES,
    }
    counts = stage.write_json_arrays(
        INSTANCES, fixed, {"images": images, "annotations": _annotations(stage)}
    )
    return counts["images"], counts["annotations"]


@planned("maskcut")
@leased
def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Pseudo masks for every image of `cfg.data`, cut, or imported from
    `maskcut.source`; returns the stage manifest."""
    if cfg.maskcut.source:
        return import_masks.run(cfg)
    check_options(cfg.maskcut)
    spec = ImageStage(
        name=STAGE,
        depends_on=("data", "backbone", "maskcut"),
        actor=MaskCutWorker,
        actor_kwargs={"options": to_dict(cfg.maskcut)},
        actors=cfg.maskcut,
        image_size=cfg.maskcut.image_size,
        to_rows=to_shard_rows,
    )
    stage, result = run_image_stage(cfg, spec)
    _, n_annotations = write_instances(stage)
    backends, unconverged = shard_tallies(stage)
    counts = {**result["counts"], "masks": n_annotations, "unconverged_masks": unconverged}
    extra = {"timing": result["timing"], "file": INSTANCES, "refinement": backends}
    return stage.finish(counts, result["errors"], extra)


def shard_tallies(stage: StageDir) -> tuple[dict[str, int], int]:
    """One pass over the shards: images per refinement backend that really ran (what
    `crf: auto` resolved to is recorded, not "auto") and the
    masks whose cut came from a Fiedler vector Lanczos did not converge on (the best Ritz
    vector was used: a graph the eigensolver cannot separate)."""
    used: Counter[str] = Counter()
    unconverged = 0
    for name in stage.shard_names():
        table = stage.read_table(name, columns=["refine", "error", "converged"])
        used.update(table.filter(pc.is_null(table.column("error"))).column("refine").to_pylist())
        flags = pc.list_flatten(table.column("converged"))
        unconverged += len(flags) - int(pc.sum(flags).as_py() or 0)
    return dict(sorted(used.items())), unconverged
