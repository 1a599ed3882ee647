"""k-means over Ray actors that each hold one shard of the vectors (the `cluster` stage's
sharded mode).

Each `ShardWorker` actor loads one shard source, assigns it to the centroids and returns
per-cluster partial sums (the design of faiss's distributed k-means benchmark, with Ray
actors in place of its RPC servers); `ShardedDataset` presents the actors as faiss's
`DatasetAssign`, and `u2seg.ops.kmeans.train_kmeans` drives the loop. The driver holds
O(K x d) floats plus O(N) cluster ids and distances, never the (N, d) vectors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import faiss
import numpy as np
import scipy.sparse

from u2seg.data.vectors import ParquetShard
from u2seg.ops.kmeans import (
    KMeansResult,
    as_vectors,
    check_counts,
    check_k,
    count_nonfinite_rows,
    kmeans_result,
    require_faiss_gpu,
    train_kmeans,
)

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle


# An array, a Parquet file, a zero-argument callable returning an (n, d) array, or a Ray
# object reference to an array: whatever a Ray actor can turn into its shard by itself.
ShardSource = Union[np.ndarray, ParquetShard, Callable[[], np.ndarray], "ObjectRef[Any]"]


def _load_source(source: Any) -> np.ndarray:
    """The float32 (n, d) vectors of one shard source (a resolved Ray reference included)."""
    if isinstance(source, ParquetShard):
        x = source.load()
    elif isinstance(source, np.ndarray):
        x = source
    elif type(source).__name__ == "ObjectRef":  # checked by name: Ray is imported lazily
        import ray

        x = ray.get(source)
    elif callable(source):
        x = source()
    else:
        raise TypeError(
            f"unsupported shard source {type(source).__name__}: use an array, a ParquetShard,"
            " a zero-argument callable or a Ray object reference"
        )
    return as_vectors(x)


@dataclass(frozen=True)
class ShardInfo:
    """What an actor found in its shard: `count` vectors of dimension `dim` (None when the
    shard is empty), `nonfinite` of them with NaN/inf."""

    count: int
    dim: int | None
    nonfinite: int


class ShardWorker:
    """One shard of vectors, resident in a Ray actor (also usable in-process). `threads`:
    faiss's OpenMP threads in this process (None leaves them).

    Its methods are the per-shard halves of the `DatasetAssign` interface; arrays returned
    are O(n) ids and distances or O(K x d) sums, never the shard itself.
    """

    def __init__(self, source: Any, threads: int | None = None, gpu: bool = False) -> None:
        self._source = source
        self._gpu = gpu
        self._x = np.zeros((0, 0), dtype=np.float32)
        self._index: Any = None
        if threads is not None:
            # A fractional-CPU actor must not spread OpenMP threads over the whole machine.
            faiss.omp_set_num_threads(max(1, threads))

    def load(self) -> ShardInfo:
        """Load and check the shard (an error here surfaces from `ray.get` as itself)."""
        if self._gpu:
            require_faiss_gpu()
        self._x = _load_source(self._source)
        self._source = None
        n = len(self._x)
        dim = self._x.shape[1] if n else None
        # The flat index faiss.Kmeans searches (not faiss.knn, whose float rounding differs
        # enough to move points between the two halves of a split cluster).
        if self._gpu and n:
            self._res = faiss.StandardGpuResources()
            self._index = faiss.GpuIndexFlatL2(self._res, self._x.shape[1])
        else:
            self._index = faiss.IndexFlatL2(max(1, self._x.shape[1]))
        return ShardInfo(n, dim, count_nonfinite_rows(self._x) if n else 0)

    def rows(self, local: np.ndarray) -> np.ndarray:
        """float32 (m, d) copy of the rows with local ids `local`."""
        return np.ascontiguousarray(self._x[local])

    def search(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (n, 1) squared distances to, and int64 (n, 1) ids of, the nearest of the
        (K, d) `centroids`."""
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self._index.reset()
        self._index.add(centroids)
        distances, labels = self._index.search(self._x, 1)
        return distances, labels

    def assign_to(
        self, centroids: np.ndarray, weights: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int64 (n,) nearest centroid, float32 (n,) squared distance, and float32 (K, d)
        (weighted) sum of the shard's vectors per centroid."""
        distances, labels = self.search(centroids)
        labels, distances = labels.ravel(), distances.ravel()
        return labels, distances, self._cluster_sums(labels, len(centroids), weights)

    def _cluster_sums(self, labels: np.ndarray, k: int, weights: np.ndarray | None) -> np.ndarray:
        # A (K, n) one-hot sparse matrix times the shard: one pass over the vectors, no (n, d)
        # temporary (np.add.at is ~4x slower, sorting the rows copies the shard). Rows are
        # added in their order, as faiss does, so one shard gives faiss's sums exactly.
        n = len(labels)
        order = np.argsort(labels, kind="stable")
        indptr = np.zeros(k + 1, dtype=np.int64)
        np.cumsum(np.bincount(labels, minlength=k), out=indptr[1:])
        data = (
            np.ones(n, dtype=np.float32)
            if weights is None
            else np.asarray(weights, dtype=np.float32)[order]
        )
        onehot = scipy.sparse.csr_matrix((data, order, indptr), shape=(k, n))
        return np.asarray(onehot @ self._x, dtype=np.float32)


class ShardedDataset:
    """The `faiss.contrib.clustering.DatasetAssign` interface over Ray actors (`ShardWorker`),
    one shard each: N = sum of the shard counts, global row ids run through the shards in
    order. Per-shard results are combined in the driver: ids and distances concatenated
    (O(N) numbers), partial sums added (O(K x d)). It also runs under
    `faiss.contrib.clustering.kmeans`.
    """

    def __init__(self, actors: Sequence[ActorHandle], counts: Sequence[int], dim: int) -> None:
        self.actors = list(actors)
        self.counts = [int(c) for c in counts]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.d = int(dim)

    def count(self) -> int:
        return int(self.offsets[-1])

    def dim(self) -> int:
        return self.d

    def _busy(self) -> list[int]:
        """Shards with at least one vector (empty ones are not asked)."""
        return [s for s, c in enumerate(self.counts) if c]

    def get_subset(self, indices: np.ndarray) -> np.ndarray:
        """float32 (m, d) rows with global ids `indices` (in that order)."""
        import ray

        indices = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.empty((len(indices), self.d), dtype=np.float32)
        wanted = [s for s in self._busy() if np.any(shard == s)]
        positions = [np.flatnonzero(shard == s) for s in wanted]
        parts: list[np.ndarray] = ray.get(
            [
                self.actors[s].rows.remote(indices[p] - self.offsets[s])
                for s, p in zip(wanted, positions, strict=True)
            ]
        )
        for p, rows in zip(positions, parts, strict=True):
            out[p] = rows
        return out

    def perform_search(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (N, 1) squared distances and int64 (N, 1) ids of the nearest centroid."""
        import ray

        ref = ray.put(np.ascontiguousarray(centroids, dtype=np.float32))
        busy = self._busy()
        parts: list[tuple[np.ndarray, np.ndarray]] = ray.get(
            [self.actors[s].search.remote(ref) for s in busy]
        )
        if not parts:
            return np.zeros((0, 1), np.float32), np.zeros((0, 1), np.int64)
        return (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
        )

    def assign_to(
        self, centroids: np.ndarray, weights: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int64 (N,) nearest centroid, float32 (N,) squared distance, float32 (K, d) sum of
        the (weighted) vectors per centroid. `weights`: float (N,) or None."""
        import ray

        ref = ray.put(np.ascontiguousarray(centroids, dtype=np.float32))
        busy = self._busy()
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = ray.get(
            [
                self.actors[s].assign_to.remote(
                    ref,
                    None if weights is None else weights[self.offsets[s] : self.offsets[s + 1]],
                )
                for s in busy
            ]
        )
        sums = np.zeros((len(centroids), self.d), dtype=np.float32)
        for part in parts:
            sums += part[2]
        labels = np.concatenate([p[0] for p in parts])
        distances = np.concatenate([p[1] for p in parts])
        return labels, distances, sums


def _check_resources(num_actors: int, num_cpus_per_actor: float, gpu: bool) -> None:
    """Fail early on a missing faiss GPU build; warn when the actors cannot all start."""
    import ray

    if gpu and not hasattr(faiss, "StandardGpuResources"):
        # The driver's faiss stands for the workers' (one environment for the whole job).
        require_faiss_gpu()
    resources = ray.cluster_resources()
    need = {"CPU": num_actors * num_cpus_per_actor, "GPU": num_actors if gpu else 0}
    for name, amount in need.items():
        if amount > resources.get(name, 0):
            # Every actor must be alive at once: on a cluster that does not scale up, the
            # loop would wait forever for the missing ones.
            warnings.warn(
                f"{num_actors} shard actors need {amount:g} {name}s, the Ray cluster has "
                f"{resources.get(name, 0):g}: they start only if it scales up",
                stacklevel=3,
            )


def _start_worker(source: ShardSource, num_cpus: float, gpu: bool) -> ActorHandle:
    """A `ShardWorker` actor for one shard source (not yet loaded)."""
    import ray

    remote: Any = ray.remote(ShardWorker).options(num_cpus=num_cpus, num_gpus=1 if gpu else 0)
    # Arrays go to the object store; a top-level reference is resolved before __init__.
    arg = ray.put(as_vectors(source)) if isinstance(source, np.ndarray) else source
    return remote.remote(arg, max(1, int(num_cpus)), gpu)


def kmeans_sharded(
    shards: Sequence[ShardSource],
    k: int,
    niter: int = 100,
    seed: int = 0,
    num_cpus_per_actor: float = 1.0,
    gpu: bool = False,
) -> KMeansResult:
    """Euclidean k-means over shards held by Ray actors (needs a running Ray).

    Each shard source is loaded by its own actor (`num_cpus_per_actor` CPUs, one GPU when
    `gpu`); `train_kmeans` drives faiss's loop through a `ShardedDataset`. Same result as
    `kmeans_local` on the concatenated shards, up to float rounding. The assignment follows
    the shards in order. Driver memory: O(K x d) floats for the centroids, sums and the
    initial sample, plus O(N) cluster ids and distances.
    """
    import ray

    check_k(k, niter)
    if not ray.is_initialized():
        raise RuntimeError(
            "kmeans_sharded needs a running Ray: wrap the call in u2seg.runtime.ray_session"
        )
    if not shards:
        raise ValueError("no vectors to cluster (no shards)")
    _check_resources(len(shards), num_cpus_per_actor, gpu)
    actors: list[ActorHandle] = []
    try:
        for source in shards:
            actors.append(_start_worker(source, num_cpus_per_actor, gpu))
        infos: list[ShardInfo] = ray.get([a.load.remote() for a in actors])
        dims = {i.dim for i in infos if i.count and i.dim is not None}
        if len(dims) > 1:
            raise ValueError(f"shards have vectors of different dimensions: {sorted(dims)}")
        n = sum(i.count for i in infos)
        check_counts(k, n, sum(i.nonfinite for i in infos))
        data = ShardedDataset(actors, [i.count for i in infos], dims.pop())
        centroids, objectives = train_kmeans(data, k, niter, seed)
        # One more assignment, to the final centroids, gives the final objective.
        distances, labels = data.perform_search(centroids)
        objective = float(distances.sum(dtype=np.float64))
        return kmeans_result(centroids, labels.ravel(), objective, len(objectives))
    finally:
        for actor in actors:
            ray.kill(actor)


def known_count(data: np.ndarray | Sequence[ShardSource]) -> int | None:
    """N when it is known without loading any vectors, else None."""
    if isinstance(data, np.ndarray):
        return len(data)
    total = 0
    for source in data:
        if isinstance(source, np.ndarray):
            total += len(source)
        elif isinstance(source, ParquetShard):
            total += source.num_rows()
        else:
            return None
    return total


def load_shards(shards: Sequence[ShardSource]) -> np.ndarray:
    """float32 (N, d) concatenation of shard sources in this process. When N is known from
    array shapes and Parquet footers, each shard is copied into one preallocated array as it
    is read, so the peak is the result plus one shard, not twice the result."""
    n = known_count(shards)
    if n is None or not shards:
        loaded = [_load_source(s) for s in shards]
        return np.concatenate(loaded) if loaded else np.zeros((0, 0), np.float32)
    out: np.ndarray | None = None
    row = 0
    for source in shards:
        part = _load_source(source)
        if not len(part):
            continue
        if out is None:
            out = np.empty((n, part.shape[1]), dtype=np.float32)
        if part.shape[1] != out.shape[1]:
            raise ValueError(
                f"shards have vectors of different dimensions: {out.shape[1]}, {part.shape[1]}"
            )
        if row + len(part) > n:
            raise ValueError(f"shard sources hold more than the {n} vectors they declare")
        out[row : row + len(part)] = part
        row += len(part)
    if row != n:
        raise ValueError(f"shard sources hold {row} vectors, not the {n} they declare")
    return out if out is not None else np.zeros((0, 0), np.float32)
