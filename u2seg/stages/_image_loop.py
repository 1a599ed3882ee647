"""The loop shared by the per-image stages (features, maskcut, ...).

Images stream through Ray Data: read tasks decode and resize them to a square, an actor pool
holding the backbone turns batches into result rows, and the driver writes Parquet shards of
`data.shard_size` images as they complete. A re-run processes only the shards that are
missing; failed images travel as rows with an `error` and end in the stage's error table.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from u2seg.artifacts import ShardWriter, StageDir, inputs_digest
from u2seg.config import ActorConfig, PipelineConfig, depends_on, sized, to_dict
from u2seg.data.images import SquareImages, list_images
from u2seg.models.vit import backbone_state, check_precision, check_weights, input_size
from u2seg.runtime import actor_pool, gpus_per_actor, ray_session
from u2seg.workers.vit import BackboneActor

RowsFn = Callable[[dict[str, np.ndarray]], pa.Table]


def plan_shards(refs: pa.Table, shard_size: int) -> pa.Table:
    """Add `order` (position in the listing) and `shard` columns: consecutive runs of
    `shard_size` images in listing order."""
    order = np.arange(refs.num_rows, dtype=np.int64)
    refs = refs.append_column("order", pa.array(order))
    return refs.append_column("shard", pa.array(order // shard_size))


def shard_digests(plan: pa.Table) -> dict[int, str]:
    """Shard index -> digest of its images (ids and file names, in order): a shard on disk
    is reused only while the listing still gives it the same images."""
    shards = plan.column("shard").to_numpy()
    ids = plan.column("image_id").to_pylist()
    names = plan.column("file_name").to_pylist()
    bounds = np.flatnonzero(np.diff(shards)) + 1
    starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(shards)]])
    return {
        int(shards[a]): inputs_digest(zip(ids[a:b], names[a:b], strict=True))
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True)
        if b > a
    }


def base_columns(batch: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    """The columns every per-image shard starts with (and `shard`, `order`, dropped on
    write)."""
    errors = batch["error"].astype(str)
    return {
        "image_id": pa.array(batch["image_id"], pa.int64()),
        "file_name": pa.array(batch["file_name"].astype(str)),
        "width": pa.array(batch["width"], pa.int32()),
        "height": pa.array(batch["height"], pa.int32()),
        "error": pa.array([e or None for e in errors], pa.string()),
        "shard": pa.array(batch["shard"], pa.int64()),
        "order": pa.array(batch["order"], pa.int64()),
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
    # Inputs are checked before anything is written, so a mistake leaves nothing behind.
    size = input_size(spec.image_size, cfg.backbone.name, f"{spec.name}.image_size")
    check_weights(cfg.backbone.name, cfg.backbone.weights)
    check_precision(cfg.backbone.precision)
    refs = plan_shards(list_images(cfg.data.source, cfg.data.root), cfg.data.shard_size)
    stage = StageDir(cfg.output_dir, spec.name)
    stage.start(to_dict(cfg), depends_on(cfg, spec.depends_on))
    shards = refs.column("shard").to_numpy()
    digests = shard_digests(refs)
    done = stage.reusable_shards(digests)
    todo = refs.filter(pa.array(~np.isin(shards, list(done))))
    try:
        timing = _process(cfg, spec, stage, todo, size, digests) if todo.num_rows else {}
        errors = stage.error_rows(["image_id", "file_name"])
        if errors.num_rows == refs.num_rows:
            raise StageFailed(
                f"{spec.name}: all {refs.num_rows} images failed, "
                f"{failure_summary(errors.column('reason').to_pylist())}"
            )
    except StageFailed:
        stage.discard_attempt()  # this attempt's shards only: earlier runs' are kept
        raise
    counts = {
        "images": refs.num_rows,
        "ok": refs.num_rows - errors.num_rows,
        "errors": errors.num_rows,
        "shards": int(shards.max()) + 1,
        "resumed_shards": len(done),
    }
    return stage, {"counts": counts, "errors": errors, "timing": timing}


def _process(
    cfg: PipelineConfig,
    spec: ImageStage,
    stage: StageDir,
    todo: pa.Table,
    size: int,
    digests: dict[int, str],
) -> dict[str, float]:
    """The Ray Data pipeline over `todo`; returns its timing (`drain`)."""
    import ray.data

    shards, sizes = np.unique(todo.column("shard").to_numpy(), return_counts=True)
    expected = {int(k): int(v) for k, v in zip(shards, sizes, strict=True)}
    writer = ShardWriter(stage, expected, digests)
    with ray_session(cfg.ray):
        # One batch per block and per read task: a task's results reach the driver when the
        # task ends, so batch-sized tasks stream results (and shards) as images complete;
        # larger blocks would hold everything back until a worker's whole share is done.
        batch = spec.actors.batch_size
        refs: ray.data.Dataset = ray.data.from_arrow(
            [todo.slice(i, batch) for i in range(0, todo.num_rows, batch)]
        )
        ds = refs.map_batches(
            SquareImages(size, cfg.data.max_pixels),
            batch_size=batch,
            num_cpus=cfg.data.read_num_cpus,
        )
        ds = backbone_pool(ds, cfg, spec.actors, spec.actor, spec.actor_kwargs, spec.name)
        return drain(ds, writer, spec.to_rows, todo.num_rows, spec.name, cfg.data.fail_after)


def backbone_pool(
    ds: Any,
    cfg: PipelineConfig,
    actors: ActorConfig,
    actor: type[BackboneActor],
    actor_kwargs: dict[str, Any],
    name: str,
) -> Any:
    """`ds` mapped by a pool of `actor`s holding the backbone (GPUs when the cluster has
    them, unless `actors.num_gpus` says otherwise); `name` is the stage's config section.
    The driver loads the weights once into Ray's object store, so an actor (one that an
    autoscaler adds on a fresh node too) needs neither the weight file nor its cache."""
    import ray

    b = cfg.backbone
    state = ray.put(backbone_state(b.name, b.weights, b.cache_dir))
    num_gpus = gpus_per_actor(f"{name}.num_gpus", actors.num_gpus, cfg.ray.gpu_wait_s)
    backbone = to_dict(cfg.backbone)
    if num_gpus and backbone["device"] == "auto":
        backbone["device"] = "cuda"  # an actor holding a GPU torch cannot use fails, naming why
    return ds.map_batches(
        actor,
        fn_constructor_kwargs={
            "backbone": backbone,
            "threads": actors.torch_threads,
            "state": state,
            **actor_kwargs,
        },
        batch_size=actors.batch_size,
        compute=actor_pool(
            sized(actors.concurrency, f"{name}.concurrency"), actors.max_concurrency
        ),
        num_cpus=actors.num_cpus,
        num_gpus=num_gpus,
    )


class StageFailed(ValueError):
    """A stage whose inputs all fail: nothing is kept, the reason is named."""


def failure_summary(reasons: list[str]) -> str:
    """'N x reason' for the most common reason of failed rows."""
    reason, count = Counter(r.split(": ")[0] for r in reasons).most_common(1)[0]
    example = next(r for r in reasons if r.startswith(reason))
    return f"{count} x {reason} (e.g. {example})"


def drain(
    results: Any,
    writer: ShardWriter,
    to_rows: RowsFn,
    total: int,
    desc: str,
    fail_after: int,
    unit: str = "images",
) -> dict[str, float]:
    """Pull every result batch of `results` (a Ray Data dataset, or any iterable of result
    batches) into `writer` with a progress bar over `total` rows;
    returns its timing: `seconds` in all, `startup_s` until the first result (pipeline and
    actor start, model loading, the first batch), `{unit}_per_s` over everything and
    `steady_{unit}_per_s` after the first result (what an added actor contributes once it
    runs). An error if a shard did not receive all its rows, and a `StageFailed` as soon as
    the first `fail_after` rows have all failed (a wrong source or setting: the remaining
    rows would fail the same way)."""
    batches: Iterable[dict[str, np.ndarray]] = results
    if hasattr(results, "iter_batches"):
        # Results are taken as they complete, not in input order, so one slow batch does
        # not hold back the shards behind it; shards are sorted on write (ShardWriter).
        results.context.execution_options.preserve_order = False
        batches = results.iter_batches(batch_size=None, batch_format="numpy")
    start = time.perf_counter()
    first: tuple[float, int] | None = None  # (time, rows) of the first result
    with tqdm(total=total, desc=desc, unit="row") as bar:
        ok, reasons = 0, []
        for batch in batches:
            rows = to_rows(batch)
            writer.add(rows)
            bar.update(rows.num_rows)
            if first is None:
                first = time.perf_counter(), rows.num_rows
            errors = rows.column("error").to_pylist()
            ok += sum(e is None for e in errors)
            if not ok:
                reasons += [e for e in errors if e is not None]
                if len(reasons) >= fail_after:
                    raise StageFailed(
                        f"{desc}: the first {len(reasons)} inputs all failed, "
                        f"{failure_summary(reasons)}; stopped (data.fail_after={fail_after})"
                    )
    if writer.incomplete:
        raise RuntimeError(f"{desc}: shards {writer.incomplete[:10]} did not complete")
    end = time.perf_counter()
    first_at, first_rows = first or (end, 0)
    timing = {
        "seconds": end - start,
        "startup_s": first_at - start,
        f"{unit}_per_s": total / max(end - start, 1e-9),
    }
    if end > first_at:
        timing[f"steady_{unit}_per_s"] = (total - first_rows) / (end - first_at)
    return timing
