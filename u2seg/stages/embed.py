"""Stage `embed`: one vector per pseudo mask, the backbone's CLS token of the instance crop.

Reads the `maskcut/` shards inside Ray tasks (one task per shard, so the driver never holds
the masks), cuts every mask's crop from its original image, and runs the crops through the
backbone actor pool. Shards mirror the maskcut shards: `embed/part-0000k.parquet` holds the
masks of maskcut's shard k, keyed by `annotation_id` (the id in `maskcut/instances.json`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from u2seg.artifacts import ShardWriter, StageDir, inputs_digest, read_parquet
from u2seg.config import PipelineConfig, depends_on, to_dict
from u2seg.data.coco import rle_to_mask
from u2seg.data.images import ImageError, read_image
from u2seg.lease import leased
from u2seg.models.vit import (
    BACKBONES,
    IMAGENET_MEAN,
    check_precision,
    check_weights,
    input_size,
)
from u2seg.plan import planned
from u2seg.runtime import ray_session
from u2seg.stages._image_loop import backbone_pool, drain
from u2seg.workers.vit import CropEmbedder

STAGE = "embed"
CROP_RULES = ("mean", "box", "white")
# The colour the backbone normalises to zero: filling with it hides the background best.
MEAN_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)


def instance_crop(image: np.ndarray, mask: np.ndarray, size: int, rule: str = "mean") -> np.ndarray:
    """The crop of one instance, uint8 (size, size, 3), from uint8 (H, W, 3) and bool (H, W).

    The mask's bounding box is cut out; with rule "mean" ("white") the pixels outside the
    mask become the ImageNet mean colour (white); "box" keeps them. The crop is the centre
    square of the box (side: its short side), resized to `size` x `size` (bicubic): the
    region of "resize to short side `size`, then centre-crop", without resizing the whole
    box first (a 1 x 1000 px mask would take gigabytes at short side 480).
    """
    if rule not in CROP_RULES:
        raise ValueError(f"embed.crop={rule!r} is not one of {', '.join(CROP_RULES)}")
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise ValueError("empty mask")
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    crop = image[box].copy()
    if rule != "box":
        crop[~mask[box]] = MEAN_RGB if rule == "mean" else (255, 255, 255)
    h, w = crop.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = np.ascontiguousarray(crop[top : top + side, left : left + side])
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BICUBIC))


class ShardMasks:
    """Ray Data batch function: maskcut shard files -> one row per image with masks.

    Input rows: shard, file, first_id (the annotation id of the shard's first mask). Output
    rows: image_id, path, shard, first_id (of this image's first mask), annotations (JSON).
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for shard, file, first in zip(
            batch["shard"], batch["file"], batch["first_id"], strict=True
        ):
            columns = ["image_id", "path", "error", "num_masks", "annotations"]
            table = read_parquet(str(file), columns)
            table = table.filter(pc.is_null(table.column("error")))
            counts = table.column("num_masks").to_numpy()
            starts = int(first) + np.concatenate([[0], np.cumsum(counts)[:-1]])
            table = table.append_column("first_id", pa.array(starts, pa.int64()))
            table = table.append_column("shard", pa.array(np.full(len(counts), int(shard))))
            parts.append(table.filter(pa.array(counts > 0)))
        rows = pa.concat_tables(parts)
        return {
            "image_id": rows.column("image_id").to_numpy(),
            "path": np.asarray(rows.column("path").to_pylist(), dtype=object),
            "shard": rows.column("shard").to_numpy(),
            "first_id": rows.column("first_id").to_numpy(),
            "annotations": np.asarray(rows.column("annotations").to_pylist(), dtype=object),
        }


class MaskCrops:
    """Ray Data batch function: image rows -> one row per mask with its square crop.

    An unreadable image gives one row per mask with an `error` and a blank crop, so every
    shard still receives all its rows.
    """

    def __init__(self, size: int, rule: str, max_pixels: int) -> None:
        self.size, self.rule, self.max_pixels = size, rule, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list[Any]] = {
            k: [] for k in ("image_id", "annotation_id", "shard", "error")
        }
        crops: list[np.ndarray] = []
        for i, text in enumerate(batch["annotations"]):
            annotations = json.loads(str(text))
            image, error = self._read(str(batch["path"][i]))
            for k, ann in enumerate(annotations):
                crop = np.zeros((self.size, self.size, 3), dtype=np.uint8)
                if image is not None:
                    mask = rle_to_mask(ann["segmentation"])
                    crop = instance_crop(image, mask, self.size, self.rule)
                crops.append(crop)
                rows["image_id"].append(int(batch["image_id"][i]))
                rows["annotation_id"].append(int(batch["first_id"][i]) + k)
                rows["shard"].append(int(batch["shard"][i]))
                rows["error"].append(error)
        out: dict[str, np.ndarray] = {
            k: np.asarray(v, dtype=object if k == "error" else np.int64) for k, v in rows.items()
        }
        out["image"] = (
            np.stack(crops) if crops else np.zeros((0, self.size, self.size, 3), np.uint8)
        )
        return out

    def _read(self, path: str) -> tuple[np.ndarray | None, str]:
        try:
            return read_image(path, self.max_pixels), ""
        except ImageError as exc:
            return None, str(exc)


def to_shard_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    errors = batch["error"].astype(str)
    valid = errors == ""
    dim = batch["vector"].shape[1]
    flat = pa.array(batch["vector"].reshape(-1), type=pa.float32())
    return pa.table(
        {
            "image_id": pa.array(batch["image_id"], pa.int64()),
            "annotation_id": pa.array(batch["annotation_id"], pa.int64()),
            "error": pa.array([e or None for e in errors], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid)),
            "shard": pa.array(batch["shard"], pa.int64()),
            "order": pa.array(batch["annotation_id"], pa.int64()),
        }
    )


def shard_plan(maskcut: StageDir) -> pa.Table:
    """Per maskcut shard: its index, file, masks, the annotation id of its first mask (ids
    run 1..M over the shards in order, as in `maskcut/instances.json`) and the digest of
    these inputs, which a mirrored shard of a later stage is reused under; `file_names`:
    its images that were read (only they get labels)."""
    names = maskcut.shard_names()
    masks, file_names = [], []
    for name in names:
        table = maskcut.read_table(name, columns=["file_name", "error", "num_masks"])
        ok = table.filter(pc.is_null(table.column("error")))
        masks.append(int(pc.sum(ok.column("num_masks")).as_py() or 0))
        file_names.append(ok.column("file_name").to_pylist())
    first = 1 + np.concatenate([[0], np.cumsum(masks)[:-1]]).astype(np.int64)
    shards = [int(n[5:10]) for n in names]
    return pa.table(
        {
            "shard": shards,
            "file": [maskcut.fs.unstrip_protocol(maskcut.file(n)) for n in names],
            "masks": masks,
            "first_id": first,
            "file_names": file_names,  # the images of the shard that were read
            # What a shard of a later stage is made from: this maskcut shard (its images)
            # and the annotation ids its masks get.
            "inputs": [
                inputs_digest([[maskcut.shard_inputs(k), int(m), int(f)]])
                for k, m, f in zip(shards, masks, first.tolist(), strict=True)
            ],
        }
    )


@planned("embed")
@leased
def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Embed every MaskCut pseudo mask; returns the stage manifest."""
    if cfg.embed.crop not in CROP_RULES:
        raise ValueError(f"embed.crop={cfg.embed.crop!r} is not one of {', '.join(CROP_RULES)}")
    maskcut = StageDir(cfg.output_dir, "maskcut")
    maskcut.manifest()  # an error naming the stage when maskcut has not completed
    input_size(cfg.embed.image_size, cfg.backbone.name, "embed.image_size")
    check_weights(cfg.backbone.name, cfg.backbone.weights)
    check_precision(cfg.backbone.precision)
    stage = StageDir(cfg.output_dir, STAGE)
    depends = ("data", "backbone", "maskcut", "embed")
    stage.start(to_dict(cfg), depends_on(cfg, depends))
    plan = shard_plan(maskcut)
    digests = dict(
        zip(plan.column("shard").to_pylist(), plan.column("inputs").to_pylist(), strict=True)
    )
    done = stage.reusable_shards(digests)
    todo = plan.filter(pa.array(~np.isin(plan.column("shard").to_numpy(), list(done))))
    empty = to_shard_rows(_no_rows(BACKBONES[cfg.backbone.name].embed_dim))
    empty = empty.drop_columns(["shard", "order"])
    for row in todo.filter(pc.equal(todo.column("masks"), 0)).to_pylist():
        stage.write_table(stage.shard_name(row["shard"]), empty, row["inputs"])
    todo = todo.filter(pc.greater(todo.column("masks"), 0))
    timing = _embed(cfg, stage, todo, digests) if todo.num_rows else {}
    errors = stage.error_rows(["image_id", "annotation_id"])
    masks = int(pc.sum(plan.column("masks")).as_py() or 0)
    counts = {
        "masks": masks,
        "embedded": masks - errors.num_rows,
        "errors": errors.num_rows,
        "shards": plan.num_rows,
        "resumed_shards": len(done),
    }
    return stage.finish(counts, errors, {"timing": timing})


def _no_rows(dim: int) -> dict[str, np.ndarray]:
    """An empty result batch, for shards whose images have no masks."""
    ints = np.zeros(0, dtype=np.int64)
    return {
        "image_id": ints,
        "annotation_id": ints,
        "shard": ints,
        "error": np.zeros(0, dtype=object),
        "vector": np.zeros((0, dim), dtype=np.float32),
    }


def _embed(
    cfg: PipelineConfig, stage: StageDir, todo: pa.Table, digests: dict[int, str]
) -> dict[str, float]:
    import ray.data

    size = input_size(cfg.embed.image_size, cfg.backbone.name, "embed.image_size")
    shards_masks = zip(
        todo.column("shard").to_pylist(), todo.column("masks").to_pylist(), strict=True
    )
    writer = ShardWriter(stage, dict(shards_masks), digests)
    with ray_session(cfg.ray):
        one_per_block = [todo.slice(i, 1) for i in range(todo.num_rows)]
        shards: ray.data.Dataset = ray.data.from_arrow(one_per_block)
        images = shards.map_batches(ShardMasks(), batch_size=1, num_cpus=cfg.data.read_num_cpus)
        crops = images.map_batches(
            MaskCrops(size, cfg.embed.crop, cfg.data.max_pixels),
            batch_size=4,
            num_cpus=cfg.data.read_num_cpus,
        )
        ds = backbone_pool(crops, cfg, cfg.embed, CropEmbedder, {}, "embed")
        total = int(pc.sum(todo.column("masks")).as_py() or 0)
        return drain(ds, writer, to_shard_rows, total, STAGE, cfg.data.fail_after, "masks")
