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

import inspect
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from u2seg.artifacts import StageDir
from u2seg.config import MaskCutConfig, PipelineConfig, to_dict
from u2seg.data.coco import mask_to_annotation
from u2seg.models.vit import ViTFeatures, normalise
from u2seg.ops.discovery import PoolOptions, discover
from u2seg.ops.maskcut import (
    discovery_score,
    maskcut_batch,
    nonfinite_images,
)
from u2seg.ops.refine import refine_stack, resize_mask, resolve_backend, upsample_mask
from u2seg.stages._image_loop import BackboneActor, ImageStage, base_columns, run_image_stage

STAGE = "maskcut"
INSTANCES = "instances.json"
CATEGORIES = [{"id": 1, "name": "fg", "supercategory": "fg"}]
FEATURES = ("keys", "tokens")
DISCOVERY = ("rounds", "pool")
# Per-annotation fields kept in the shards; ids are given when instances.json is merged.
_KEPT = ("segmentation", "bbox", "area", "iscrowd", "category_id", "score")


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


def cut_options(cfg: MaskCutConfig) -> dict[str, Any]:
    """The keyword options of `maskcut_batch`, every one taken from `cfg` (a missing one is
    an AttributeError, not a silently published default)."""
    params = inspect.signature(maskcut_batch).parameters.values()
    return {p.name: getattr(cfg, p.name) for p in params if p.kind is p.KEYWORD_ONLY}


def pool_masks(
    out: ViTFeatures, images: Sequence[int], cfg: MaskCutConfig
) -> list[list[tuple[np.ndarray, float]]]:
    """Candidate-pool discovery (`discovery: pool`, u2seg.ops.discovery) of the images
    `images` of a ViT batch `out`: per image, its masks at patch resolution with their
    scores, best first."""
    assert out.keys is not None and out.attention is not None
    options = PoolOptions(
        n_masks=cfg.n_masks,
        depth=cfg.pool_depth,
        max_k=cfg.pool_max_k,
        min_patches=cfg.pool_min_patches,
        nms_iou=cfg.pool_nms_iou,
    )
    chosen = list(images)
    return discover([out.keys[chosen], out.patch_tokens[chosen]], out.attention[chosen], options)


def refine_masks(
    image: np.ndarray,
    masks: list[np.ndarray],
    size: tuple[int, int],
    cfg: MaskCutConfig,
    device: torch.device | str = "cpu",
) -> list[np.ndarray | None]:
    """Patch masks (h, w) of one square frame `image` (S, S, 3) -> refined bool masks of the
    original `size` (H, W), one per mask; None where the refinement drops (unless
    `cfg.keep_unrefined`: then the mask before refinement) or empties it. The refinement
    runs on `device` (the ViT's) when the backend is "torch"."""
    if not masks:
        return []
    frames = np.stack([upsample_mask(mask, image.shape[:2]) for mask in masks])
    refined = refine_stack(
        image, frames, backend=cfg.crf, min_iou=cfg.min_refine_iou, device=device
    )
    out: list[np.ndarray | None] = []
    for frame, mask in zip(frames, refined, strict=True):
        if mask is None and cfg.keep_unrefined:
            mask = frame
        full = None if mask is None else resize_mask(mask, size)
        out.append(full if full is not None and full.any() else None)
    return out


#: One found mask: bool (h, w) at patch resolution, whether its eigensolver converged, and
#: its pool score (None: MaskCut rounds, scored by discovery order).
Found = tuple[np.ndarray, bool, float | None]


class MaskCutWorker(BackboneActor):
    """Ray Data actor: square images -> MaskCut pseudo masks as COCO annotations per image."""

    def __init__(
        self,
        backbone: dict[str, Any],
        options: dict[str, Any],
        threads: int | None = None,
        state: Any = None,
    ) -> None:
        super().__init__(backbone, threads, state)
        # The backend this worker really runs ("auto" resolved): recorded in every row.
        self.cfg = replace(MaskCutConfig(**options), crf=resolve_backend(options["crf"]))

    def cut(self, images: np.ndarray) -> list[list[Found] | None]:
        """uint8 (B, S, S, 3) -> per image, its masks at patch resolution, best first, each
        with whether its eigensolver converged and its pool score (None for MaskCut rounds,
        ranked by discovery order); None for an image whose features are not finite."""
        cfg = self.cfg
        pool = cfg.discovery == "pool"
        with torch.inference_mode():
            out = self.model(
                normalise(images, self.device), want_keys=pool or cfg.feature == "keys"
            )
        grid = out.keys if cfg.feature == "keys" or pool else out.patch_tokens
        assert grid is not None
        bad = set(nonfinite_images(grid))
        if pool:  # the pool reads the tokens too
            bad |= set(nonfinite_images(out.patch_tokens))
        good = [i for i in range(len(images)) if i not in bad]
        found = iter(self._pool(out, good) if pool else self._rounds(grid[good]))
        return [None if i in bad else next(found) for i in range(len(images))]

    def _rounds(self, grid: torch.Tensor) -> list[list[Found]]:
        """The published MaskCut rounds of a (B, h, w, d) batch: the masks they added."""
        cfg = self.cfg
        rounds = maskcut_batch(grid.float(), cfg.n_masks, cfg.tau, **cut_options(cfg))
        return [
            [(r.mask, r.converged, None) for r in image if r.mask is not None] for image in rounds
        ]

    def _pool(self, out: ViTFeatures, good: list[int]) -> list[list[Found]]:
        """Candidate-pool discovery of the images `good` of the batch (always converged)."""
        return [[(m, True, v) for m, v in ranked] for ranked in pool_masks(out, good, self.cfg)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = batch["error"].copy()
        ok = np.flatnonzero(errors == "")
        annotations = np.full(len(errors), "[]", dtype=object)
        converged = np.full(len(errors), "[]", dtype=object)
        if len(ok):
            for i, found in zip(ok, self.cut(batch["image"][ok]), strict=True):
                if found is None:
                    errors[i] = "non-finite backbone features (NaN or inf)"
                    continue
                size = (int(batch["height"][i]), int(batch["width"][i]))
                refined = refine_masks(
                    batch["image"][i], [m for m, _, _ in found], size, self.cfg, self.device
                )
                kept = [
                    (m, flag, value)
                    for m, (_, flag, value) in zip(refined, found, strict=True)
                    if m is not None
                ]
                # Rounds: scores rank the kept masks in discovery order; pool: its scores.
                anns = [
                    mask_to_annotation(m, 0, 0, score=discovery_score(k) if v is None else v)
                    for k, (m, _, v) in enumerate(kept)
                ]
                annotations[i] = json.dumps([{k: a[k] for k in _KEPT} for a in anns])
                converged[i] = json.dumps([flag for _, flag, _ in kept])
        result = {k: v for k, v in batch.items() if k != "image"}
        result["annotations"] = annotations
        result["converged"] = converged
        result["error"] = errors
        result["refine"] = np.full(len(errors), self.cfg.crf, dtype=object)
        return result


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


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Pseudo masks for every image of `cfg.data`; returns the stage manifest."""
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
