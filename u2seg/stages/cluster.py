"""Stage `cluster`: k-means of the mask embeddings into K pseudo thing classes.

`faiss.Kmeans` in one Ray task when the vectors fit one node (the task reads the shards
itself and asks Ray for their memory, so a cluster runs it on a worker node, never on the
head that drives the job), else the sharded mode: Ray actors each load one `embed/` shard
and compute assignments and partial sums, driven by faiss's C++ k-means loop step for step
(u2seg.ops.kmeans), so both modes give the same clustering. Outputs
`cluster/centroids.npy` (K, d) float32 and `cluster/assignments.parquet` (annotation_id,
image_id, cluster 0..K-1, category_id = cluster + 1, the pseudo class of docs/method.md stage 3).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from u2seg.artifacts import MANIFEST, StageDir
from u2seg.config import ClusterConfig, PipelineConfig, depends_on, sized, to_dict
from u2seg.data.vectors import vectors_from_arrow
from u2seg.lease import leased
from u2seg.ops.kmeans import KMeansResult, as_vectors, kmeans_local
from u2seg.plan import planned
from u2seg.runtime import gpus_asked, ray_session
from u2seg.stages._sharded_kmeans import ShardSource, kmeans_sharded, known_count, load_shards

STAGE = "cluster"
ASSIGNMENTS = "assignments.parquet"
CENTROIDS = "centroids.npy"


def _read_ok(embed: StageDir, name: str, columns: list[str]) -> pa.Table:
    table = embed.read_table(name, columns=[*columns, "error"])
    return table.filter(pc.is_null(table.column("error"))).select(columns)


def shard_vectors(run_dir: str, name: str) -> np.ndarray:
    """float32 (n, d) vectors of one embed shard, masks whose embedding failed left out.
    Runs wherever it is called: inside a Ray actor in sharded mode."""
    table = _read_ok(StageDir(run_dir, "embed"), name, ["vector"])
    return vectors_from_arrow(table.column("vector"), f"embed/{name}")


def _kmeans_task(run_dir: str, names: list[str], c: ClusterConfig) -> tuple[KMeansResult, str]:
    """The local mode's k-means, in the Ray task that `_cluster` places; with the id of the
    node it ran on."""
    import faiss
    import ray

    faiss.omp_set_num_threads(max(1, int(sized(c.num_cpus, "cluster.num_cpus"))))
    vectors = np.concatenate([shard_vectors(run_dir, n) for n in names])
    result = kmeans_local(vectors, c.k, c.niter, c.seed, c.gpu)
    return result, ray.get_runtime_context().get_node_id()


def resolve_mode(c: ClusterConfig, count: int) -> str:
    """The mode `cluster.mode` runs for `count` vectors (auto: local up to
    `cluster.max_local_vectors`, sharded above)."""
    return c.mode if c.mode != "auto" else ("local" if count <= c.max_local_vectors else "sharded")


def task_memory(count: int, dim: int) -> int:
    """Bytes the local mode's task asks Ray for: the shards, their concatenation and faiss's
    copy, 4 bytes a value each."""
    return 3 * 4 * count * max(1, dim)


def _cluster(
    cfg: PipelineConfig, embed: StageDir, names: list[str], count: int
) -> tuple[KMeansResult, str, str | None]:
    """(result, mode, the node the local mode's task ran on)."""
    c = cfg.cluster
    if c.mode not in MODES:
        raise ValueError(f"cluster.mode={c.mode!r} is not one of {', '.join(MODES)}")
    mode = resolve_mode(c, count)
    with ray_session(cfg.ray):
        import ray

        gpus_asked("cluster.gpu", c.gpu, 1, cfg.ray.gpu_wait_s)
        if mode == "sharded":
            sources = [functools.partial(shard_vectors, cfg.output_dir, n) for n in names]
            result = kmeans_sharded(sources, c.k, c.niter, c.seed, c.shard_num_cpus, c.gpu)
            return result, mode, None
        with embed.fs.open(embed.file(names[0]), "rb") as fh:  # the schema only
            dim = pq.read_schema(fh).field("vector").type.list_size
        task = ray.remote(_kmeans_task).options(
            num_cpus=c.num_cpus,
            num_gpus=1 if c.gpu else 0,
            memory=task_memory(count, dim),
        )
        result, node = ray.get(task.remote(cfg.output_dir, names, c))
        return result, mode, node


@planned("cluster")
@leased
def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Cluster every embedded mask; returns the stage manifest."""
    embed = StageDir(cfg.output_dir, "embed")
    embed.manifest()  # an error naming the stage when embed has not completed
    stage = StageDir(cfg.output_dir, STAGE)
    depends = ("data", "backbone", "maskcut", "embed", "cluster")
    stage.start(to_dict(cfg), depends_on(cfg, depends))
    if stage.exists(MANIFEST):
        return stage.manifest()  # one k-means job: done or redone whole
    names = [n for n in embed.shard_names() if embed.read_table(n, ["annotation_id"]).num_rows]
    keys = [_read_ok(embed, n, ["annotation_id", "image_id"]) for n in names]
    count = sum(t.num_rows for t in keys)
    if count == 0:
        raise ValueError("cluster: no embedded masks to cluster (did maskcut find any?)")
    if cfg.cluster.k > count:
        raise ValueError(
            f"cluster.k={cfg.cluster.k} is more than the {count} embedded masks: lower cluster.k"
        )
    result, mode, node = _cluster(cfg, embed, names, count)
    ids = pa.concat_tables(keys)
    cluster = pa.array(result.assignment, pa.int64())
    assignments = ids.append_column("cluster", cluster).append_column(
        "category_id", pc.add(cluster, 1)
    )
    stage.write_table(ASSIGNMENTS, assignments)
    stage.write_array(CENTROIDS, result.centroids)
    counts = {"masks": count, "k": cfg.cluster.k, "empty_clusters": result.empty_clusters}
    extra = {
        "mode": mode,
        "node": node,
        "objective": result.objective,
        "iterations": result.iterations,
        "sizes": result.sizes.tolist(),
    }
    return stage.finish(counts, pa.table({"annotation_id": pa.array([], pa.int64())}), extra)


MODES = ("auto", "local", "sharded")


def choose_mode(data: np.ndarray | Sequence[ShardSource], cfg: ClusterConfig) -> str:
    """The mode to run, "local" or "sharded": `cfg.mode`, or for "auto" local when
    N <= max_local_vectors (sharded when N is unknown without loading, e.g. callables)."""
    if cfg.mode not in MODES:
        raise ValueError(f"cluster.mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.mode != "auto":
        return cfg.mode
    n = known_count(data)
    return "local" if n is not None and n <= cfg.max_local_vectors else "sharded"


def kmeans(data: np.ndarray | Sequence[ShardSource], cfg: ClusterConfig) -> KMeansResult:
    """k-means of `data` (float32 (N, d) array, or shard sources in order) per `cfg`.

    Local mode concatenates shard sources in this process; sharded mode splits an array into
    `cfg.num_shards` shards (and needs a running Ray).
    """
    mode = choose_mode(data, cfg)
    if mode == "local":
        x = data if isinstance(data, np.ndarray) else load_shards(data)
        return kmeans_local(x, cfg.k, cfg.niter, cfg.seed, cfg.gpu)
    shards: Sequence[ShardSource]
    if isinstance(data, np.ndarray):
        shards = np.array_split(as_vectors(data), max(1, min(cfg.num_shards, len(data))))
    else:
        shards = data
    return kmeans_sharded(shards, cfg.k, cfg.niter, cfg.seed, cfg.shard_num_cpus, cfg.gpu)
