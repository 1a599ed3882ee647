"""Stage `features`: per-image CLS and mean-pooled patch vectors from the frozen ViT.

Images stream through Ray Data: read tasks decode and resize them to a square, an actor pool
holding the backbone turns batches into vectors, and the driver writes Parquet shards of
`shard_size` images as they complete. Full patch grids are never stored (a 60x60x768 grid is
~11 MB per image); later stages recompute what they need.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm import tqdm

from u2seg.artifacts import ShardWriter, StageDir, concat_tables
from u2seg.backbone import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, load_backbone
from u2seg.config import BackboneConfig, PipelineConfig, to_dict
from u2seg.ingest import SquareImages, list_images, ref_blocks
from u2seg.runtime import cluster_has_gpus, ray_session, resolve_device

STAGE = "features"
ERROR_SCHEMA = pa.schema(
    [("image_id", pa.int64()), ("file_name", pa.string()), ("reason", pa.string())]
)


def normalise(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) with ImageNet mean/std, on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


def input_size(image_size: int, patch_size: int) -> int:
    """The square side actually used: `image_size` rounded down to a multiple of the patch."""
    size = (image_size // patch_size) * patch_size
    if size <= 0:
        raise ValueError(f"features.image_size={image_size} is smaller than a patch ({patch_size})")
    return size


class FeatureExtractor:
    """Ray Data actor: square images -> CLS and mean patch vector per image.

    Rows whose `error` is set pass through with zero vectors (the writer stores nulls).
    """

    def __init__(self, backbone: dict[str, Any], threads: int | None = None) -> None:
        cfg = BackboneConfig(**backbone)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu" and threads:
            # Ray pins fractional-CPU actors to one thread; the forward is the bottleneck.
            torch.set_num_threads(threads)
        self.model = load_backbone(
            cfg.name, weights=cfg.weights, cache_dir=cfg.cache_dir, device=self.device
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        n, dim = len(ok), self.model.embed_dim
        cls = np.zeros((n, dim), dtype=np.float32)
        patch_mean = np.zeros((n, dim), dtype=np.float32)
        if ok.any():
            with torch.inference_mode():
                out = self.model(normalise(batch["image"][ok], self.device), want_keys=False)
            cls[ok] = out.cls.float().cpu().numpy()
            patch_mean[ok] = out.patch_tokens.float().mean(dim=(1, 2)).cpu().numpy()
        result = {k: v for k, v in batch.items() if k not in ("image", "path")}
        result["cls"] = cls
        result["patch_mean"] = patch_mean
        return result


def _vectors(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """(N, D) float32 -> fixed-size-list column, null where not `valid`."""
    dim = values.shape[1]
    flat = pa.array(values.reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))


def to_shard_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    """The driver-side table of one result batch (errors as null vectors)."""
    errors = batch["error"].astype(str)
    valid = errors == ""
    return pa.table(
        {
            "image_id": pa.array(batch["image_id"], pa.int64()),
            "file_name": pa.array(batch["file_name"].astype(str)),
            "width": pa.array(batch["width"], pa.int32()),
            "height": pa.array(batch["height"], pa.int32()),
            "error": pa.array([e or None for e in errors], pa.string()),
            "cls": _vectors(batch["cls"], valid),
            "patch_mean": _vectors(batch["patch_mean"], valid),
            "shard": pa.array(batch["shard"], pa.int64()),
        }
    )


def plan_shards(refs: pa.Table, shard_size: int) -> pa.Table:
    """Add a `shard` column: consecutive runs of `shard_size` images in listing order."""
    shard = np.arange(refs.num_rows, dtype=np.int64) // shard_size
    return refs.append_column("shard", pa.array(shard))


def error_table(stage: StageDir) -> pa.Table:
    """All rows of a stage's shards that carry an error, as (image_id, file_name, reason)."""
    parts = []
    for name in stage.shard_names():
        table = stage.read_table(name).select(["image_id", "file_name", "error"])
        bad = table.filter(pc.is_valid(table.column("error")))
        parts.append(bad.rename_columns(["image_id", "file_name", "reason"]))
    return concat_tables(parts, ERROR_SCHEMA)


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Extract features for every image of `cfg.data`; returns the stage manifest."""
    stage = StageDir(cfg.output_dir, STAGE)
    stage.start(
        to_dict(cfg),
        {k: to_dict(getattr(cfg, k)) for k in ("data", "backbone", "features")},
    )
    refs = plan_shards(list_images(cfg.data.source, cfg.data.root), cfg.data.shard_size)
    shards = refs.column("shard").to_numpy()
    done = stage.complete_shards()
    todo = refs.filter(pa.array(~np.isin(shards, list(done))))
    timing = _extract(cfg, stage, todo) if todo.num_rows else {}
    errors = error_table(stage)
    counts = {
        "images": refs.num_rows,
        "ok": refs.num_rows - errors.num_rows,
        "errors": errors.num_rows,
        "shards": int(shards.max()) + 1,
        "resumed_shards": len(done),
    }
    return stage.finish(counts, errors, {"timing": timing})


def _extract(cfg: PipelineConfig, stage: StageDir, todo: pa.Table) -> dict[str, float]:
    """Run the Ray Data pipeline over `todo`; returns its wall time and images/s, actor
    start-up and model loading included."""
    import ray.data

    if cfg.backbone.name not in BACKBONES:
        raise ValueError(
            f"backbone.name={cfg.backbone.name!r} is not one of {', '.join(BACKBONES)}"
        )
    patch = BACKBONES[cfg.backbone.name].patch_size
    size = input_size(cfg.features.image_size, patch)
    shards, sizes = np.unique(todo.column("shard").to_numpy(), return_counts=True)
    writer = ShardWriter(stage, {int(k): int(v) for k, v in zip(shards, sizes, strict=True)})
    with ray_session(cfg.ray):
        num_gpus = cfg.features.num_gpus
        if num_gpus is None:
            num_gpus = 1.0 if cluster_has_gpus() else 0.0
        refs: ray.data.Dataset = ray.data.from_arrow(
            list(ref_blocks(todo, cfg.features.batch_size, cfg.features.concurrency))
        )
        ds = refs.map_batches(
            SquareImages(size, cfg.data.max_pixels),
            batch_size=8,
            num_cpus=cfg.data.read_num_cpus,
        )
        ds = ds.map_batches(
            FeatureExtractor,
            fn_constructor_kwargs={
                "backbone": to_dict(cfg.backbone),
                "threads": cfg.features.torch_threads,
            },
            batch_size=cfg.features.batch_size,
            concurrency=cfg.features.concurrency,
            num_cpus=cfg.features.num_cpus,
            num_gpus=num_gpus,
        )
        start = time.perf_counter()
        with tqdm(total=todo.num_rows, desc="features", unit="img") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add(to_shard_rows(batch))
                bar.update(len(batch["image_id"]))
        seconds = time.perf_counter() - start
    if writer.incomplete:
        raise RuntimeError(f"features: shards {writer.incomplete[:10]} did not complete")
    return {"seconds": seconds, "images_per_s": todo.num_rows / seconds}
