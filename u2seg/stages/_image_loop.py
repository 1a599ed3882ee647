"""The loop shared by the per-image stages (features, maskcut, ...).

Images stream through Ray Data: read tasks decode and resize them to a square, an actor pool
holding the backbone turns batches into result rows, and the driver writes Parquet shards of
`data.shard_size` images as they complete. A re-run processes only the shards that are
missing; failed images travel as rows with an `error` and end in the stage's error table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from u2seg.artifacts import ShardWriter, StageDir
from u2seg.config import ActorConfig, BackboneConfig, PipelineConfig, to_dict
from u2seg.data.images import SquareImages, list_images, ref_blocks
from u2seg.models.vit import ViTBackbone, input_size, load_backbone
from u2seg.runtime import actor_pool, cluster_has_gpus, ray_session, resolve_device

RowsFn = Callable[[dict[str, np.ndarray]], pa.Table]


class BackboneActor:
    """Base of the Ray Data actors that run the frozen ViT: loads it once, on its device."""

    def __init__(self, backbone: dict[str, Any], threads: int | None = None) -> None:
        cfg = BackboneConfig(**backbone)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu" and threads:
            # Ray pins fractional-CPU actors to one thread; the forward is the bottleneck.
            torch.set_num_threads(threads)
        self.model: ViTBackbone = load_backbone(
            cfg.name, weights=cfg.weights, cache_dir=cfg.cache_dir, device=self.device
        )


def plan_shards(refs: pa.Table, shard_size: int) -> pa.Table:
    """Add a `shard` column: consecutive runs of `shard_size` images in listing order."""
    shard = np.arange(refs.num_rows, dtype=np.int64) // shard_size
    return refs.append_column("shard", pa.array(shard))


def base_columns(batch: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    """The columns every per-image shard starts with (and `shard`, dropped on write)."""
    errors = batch["error"].astype(str)
    return {
        "image_id": pa.array(batch["image_id"], pa.int64()),
        "file_name": pa.array(batch["file_name"].astype(str)),
        "width": pa.array(batch["width"], pa.int32()),
        "height": pa.array(batch["height"], pa.int32()),
        "error": pa.array([e or None for e in errors], pa.string()),
        "shard": pa.array(batch["shard"], pa.int64()),
    }


@dataclass(frozen=True)
class ImageStage:
    """What a per-image stage plugs into the loop."""

    name: str
    depends_on: tuple[str, ...]  # config sections that change this stage's output
    actor: type[BackboneActor]
    actor_kwargs: dict[str, Any]
    actors: ActorConfig
    image_size: int
    to_rows: RowsFn


def run_image_stage(cfg: PipelineConfig, spec: ImageStage) -> tuple[StageDir, dict[str, Any]]:
    """Run `spec` over every image of `cfg.data`, resuming complete shards.

    Returns the stage directory (not yet finished: the caller writes its extra outputs and
    then the manifest) and the counts, errors and timing for the manifest.
    """
    stage = StageDir(cfg.output_dir, spec.name)
    stage.start(to_dict(cfg), {k: to_dict(getattr(cfg, k)) for k in spec.depends_on})
    size = input_size(spec.image_size, cfg.backbone.name)
    refs = plan_shards(list_images(cfg.data.source, cfg.data.root), cfg.data.shard_size)
    shards = refs.column("shard").to_numpy()
    done = stage.complete_shards()
    todo = refs.filter(pa.array(~np.isin(shards, list(done))))
    timing = _process(cfg, spec, stage, todo, size) if todo.num_rows else {}
    errors = stage.error_rows(["image_id", "file_name"])
    counts = {
        "images": refs.num_rows,
        "ok": refs.num_rows - errors.num_rows,
        "errors": errors.num_rows,
        "shards": int(shards.max()) + 1,
        "resumed_shards": len(done),
    }
    return stage, {"counts": counts, "errors": errors, "timing": timing}


def _process(
    cfg: PipelineConfig, spec: ImageStage, stage: StageDir, todo: pa.Table, size: int
) -> dict[str, float]:
    """The Ray Data pipeline over `todo`; returns its wall time and images/s (actor start-up
    and model loading included)."""
    import ray.data

    shards, sizes = np.unique(todo.column("shard").to_numpy(), return_counts=True)
    writer = ShardWriter(stage, {int(k): int(v) for k, v in zip(shards, sizes, strict=True)})
    with ray_session(cfg.ray):
        workers = spec.actors.max_concurrency or spec.actors.concurrency
        refs: ray.data.Dataset = ray.data.from_arrow(
            list(ref_blocks(todo, spec.actors.batch_size, workers))
        )
        ds = refs.map_batches(
            SquareImages(size, cfg.data.max_pixels),
            batch_size=8,
            num_cpus=cfg.data.read_num_cpus,
        )
        ds = backbone_pool(ds, cfg, spec.actors, spec.actor, spec.actor_kwargs, spec.name)
        seconds = drain(ds, writer, spec.to_rows, todo.num_rows, spec.name)
    return {"seconds": seconds, "images_per_s": todo.num_rows / seconds}


def backbone_pool(
    ds: Any,
    cfg: PipelineConfig,
    actors: ActorConfig,
    actor: type[BackboneActor],
    actor_kwargs: dict[str, Any],
    name: str,
) -> Any:
    """`ds` mapped by a pool of `actor`s holding the backbone (GPUs when the cluster has
    them, unless `actors.num_gpus` says otherwise); `name` is the stage's config section."""
    num_gpus = actors.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if cluster_has_gpus() else 0.0
    return ds.map_batches(
        actor,
        fn_constructor_kwargs={
            "backbone": to_dict(cfg.backbone),
            "threads": actors.torch_threads,
            **actor_kwargs,
        },
        batch_size=actors.batch_size,
        compute=actor_pool(actors.concurrency, actors.max_concurrency),
        num_cpus=actors.num_cpus,
        num_gpus=num_gpus,
    )


def drain(ds: Any, writer: ShardWriter, to_rows: RowsFn, total: int, desc: str) -> float:
    """Pull every result batch of `ds` into `writer` with a progress bar over `total` rows;
    returns the seconds it took. An error if a shard did not receive all its rows."""
    start = time.perf_counter()
    with tqdm(total=total, desc=desc, unit="row") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            writer.add(to_rows(batch))
            bar.update(len(batch["image_id"]))
    if writer.incomplete:
        raise RuntimeError(f"{desc}: shards {writer.incomplete[:10]} did not complete")
    return time.perf_counter() - start
