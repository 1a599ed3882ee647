"""k-means of embedding vectors with faiss, in one process or over Ray actors holding shards.

- `kmeans_local`: `faiss.Kmeans` (faiss's C++ loop) on an in-memory (N, d) array.
- `kmeans_sharded`: the same k-means over a `ShardedDataset`, faiss's `DatasetAssign`
  interface implemented by Ray actors that each load one shard, assign it to the centroids
  and return per-cluster partial sums (the design of faiss's distributed k-means benchmark,
  with Ray actors in place of its RPC servers). The driver holds O(K x d) floats plus O(N)
  cluster ids and distances, never the (N, d) vectors.
- `kmeans`: picks a mode from a `ClusterConfig`.

Both modes run one algorithm: faiss's initial sample (`faiss.rand_perm` with seed + 1), its
assign / average / split-empty-clusters iteration and its stop once the objective no longer
changes. The sharded loop (`train_kmeans`) follows faiss's C++ `Clustering::train` step for
step rather than using `faiss.contrib.clustering.kmeans`: that loop re-seeds empty clusters
with another random rule, which sends the two modes to different local minima (1.5 % apart
in objective on blob data); with the C++ rule they agree to float rounding.

Empty clusters are re-seeded during training by splitting large ones; clusters that still
end empty after the final assignment (duplicate vectors) are reported in
`KMeansResult.empty_clusters`, not treated as an error.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Union

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse
from fsspec.core import url_to_fs

from u2seg.config import ClusterConfig

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

MODES = ("auto", "local", "sharded")
# Rows checked for NaN/inf at a time: bounds the temporary boolean array.
_CHECK_BLOCK = 65_536


@dataclass(frozen=True, eq=False)
class KMeansResult:
    """A clustering of N vectors of dimension d into K clusters.

    `centroids` float32 (K, d); `assignment` int64 (N,) cluster of each vector (in shard
    order for sharded input); `sizes` int64 (K,) vectors per cluster; `objective` sum of
    squared distances of the vectors to their assigned centroid; `empty_clusters` how many
    clusters have no vector; `iterations` k-means iterations run: `niter`, or fewer when the
    clustering converged (faiss stops once the objective no longer changes).
    """

    centroids: np.ndarray
    assignment: np.ndarray
    sizes: np.ndarray
    objective: float
    empty_clusters: int
    iterations: int

    @property
    def empty_cluster_ids(self) -> np.ndarray:
        """int64 (E,) ids of the clusters with no vector."""
        return np.flatnonzero(self.sizes == 0).astype(np.int64)


@dataclass(frozen=True)
class ParquetShard:
    """One shard of vectors in a Parquet file (local path or fsspec URL).

    `column` holds one vector per row as a fixed-size list (or equal-length lists) of floats;
    null vectors are an error, since every row must receive a cluster.
    """

    path: str
    column: str = "embedding"

    def num_rows(self) -> int:
        """Row count from the file footer, without reading the vectors."""
        fs, path = url_to_fs(self.path)
        with fs.open(path, "rb") as fh:
            return int(pq.ParquetFile(fh).metadata.num_rows)

    def load(self, batch_rows: int = 16_384) -> np.ndarray:
        """float32 (n, d) vectors of the column.

        Read in batches of `batch_rows` rows into one preallocated array, so the peak is the
        result plus about one row group, not the file, the Arrow table and the result."""
        name = f"{self.path}:{self.column}"
        fs, path = url_to_fs(self.path)
        with fs.open(path, "rb") as fh:
            parquet = pq.ParquetFile(fh, buffer_size=1 << 22, pre_buffer=False)
            if self.column not in parquet.schema_arrow.names:
                raise ValueError(f"{name}: no such column (columns: {parquet.schema_arrow.names})")
            n = parquet.metadata.num_rows
            out: np.ndarray | None = None
            row = 0
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=[self.column]):
                part = vectors_from_arrow(batch.column(0), name)
                if out is None:
                    out = np.empty((n, part.shape[1]), dtype=np.float32)
                elif len(part) and part.shape[1] != out.shape[1]:
                    raise ValueError(f"{name}: vectors of different lengths")
                out[row : row + len(part)] = part
                row += len(part)
        # Arrow's allocator keeps freed batches for reuse; they are not coming back.
        pa.default_memory_pool().release_unused()
        if out is None:  # no rows
            kind = parquet.schema_arrow.field(self.column).type
            return np.zeros((0, getattr(kind, "list_size", 0)), dtype=np.float32)
        return out


# An array, a Parquet file, a zero-argument callable returning an (n, d) array, or a Ray
# object reference to an array: whatever a Ray actor can turn into its shard by itself.
ShardSource = Union[np.ndarray, ParquetShard, Callable[[], np.ndarray], "ObjectRef[Any]"]


def vectors_from_arrow(column: pa.ChunkedArray | pa.Array, name: str = "column") -> np.ndarray:
    """float32 (n, d) array of a list-of-floats Arrow column; errors name the column."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    kind = column.type
    if not (
        pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)
    ):
        raise ValueError(f"{name}: expected a list-of-floats vector column, got {kind}")
    if column.null_count:
        raise ValueError(f"{name}: {column.null_count} rows have a null vector")
    n = len(column)
    if pa.types.is_fixed_size_list(kind):
        d = kind.list_size
    else:
        lengths = np.concatenate(
            [pc.list_value_length(c).to_numpy(zero_copy_only=False) for c in chunks]
            or [np.zeros(0, np.int64)]
        )
        if n and lengths.min() != lengths.max():
            raise ValueError(
                f"{name}: vectors of different lengths ({lengths.min()} to {lengths.max()})"
            )
        d = int(lengths[0]) if n else 0
    # Filled chunk by chunk, so the table and one float32 copy is the peak, not two copies.
    out = np.empty((n, d), dtype=np.float32)
    row = 0
    for chunk in chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        out[row : row + len(chunk)] = values.reshape(len(chunk), d)
        row += len(chunk)
    return out


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
    return _as_vectors(x)


def _as_vectors(x: Any) -> np.ndarray:
    """C-contiguous float32 (n, d); a copy only when the dtype or layout requires it."""
    x = np.asarray(x)
    if x.size == 0 and x.ndim < 2:
        x = x.reshape(0, 0)
    if x.ndim != 2:
        raise ValueError(f"vectors must be a 2-D (N, d) array, got shape {x.shape}")
    if x.shape[0] and x.shape[1] == 0:
        raise ValueError("vectors have dimension 0")
    return np.ascontiguousarray(x, dtype=np.float32)


def count_nonfinite_rows(x: np.ndarray) -> int:
    """Rows of (n, d) `x` with a NaN or an infinite value."""
    bad = 0
    for i in range(0, len(x), _CHECK_BLOCK):
        bad += int(np.count_nonzero(~np.isfinite(x[i : i + _CHECK_BLOCK]).all(axis=1)))
    return bad


def _check_k(k: int, niter: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer, got {k!r}")
    if k <= 0:
        raise ValueError(f"k must be a positive number of clusters, got k={k}")
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")


def _check_counts(k: int, n: int, nonfinite: int) -> None:
    if n == 0:
        raise ValueError("no vectors to cluster (empty input)")
    if nonfinite:
        raise ValueError(f"{nonfinite} of the {n} vectors contain NaN or infinite values")
    if k > n:
        raise ValueError(f"k={k} is more than the {n} vectors to cluster")


def initial_rows(n: int, k: int, seed: int) -> np.ndarray:
    """int64 (K,) distinct row ids of the initial centroids: the sample `faiss.Kmeans` takes
    with this seed (the first K of `faiss.rand_perm(n, seed + 1)`)."""
    perm = np.empty(n, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, seed + 1)  # type: ignore[attr-defined]
    return perm[:k].astype(np.int64)


def require_faiss_gpu() -> None:
    """Raise a clear error unless faiss was built with GPU support and sees a GPU."""
    if not hasattr(faiss, "StandardGpuResources"):
        raise RuntimeError(
            "gpu=True needs faiss with GPU support: install the `gpu` extra "
            "(pip install 'u2seg[gpu]'; faiss-gpu-cu12 replaces faiss-cpu)"
        )
    if faiss.get_num_gpus() == 0:
        raise RuntimeError("gpu=True but faiss sees no CUDA device")


def _result(
    centroids: np.ndarray, assignment: np.ndarray, objective: float, iterations: int
) -> KMeansResult:
    k = len(centroids)
    sizes = np.bincount(assignment, minlength=k).astype(np.int64)
    return KMeansResult(
        centroids=np.ascontiguousarray(centroids, dtype=np.float32),
        assignment=assignment.astype(np.int64, copy=False),
        sizes=sizes,
        objective=objective,
        empty_clusters=int(np.count_nonzero(sizes == 0)),
        iterations=iterations,
    )


# ---- in one process --------------------------------------------------------------------


def kmeans_local(
    vectors: np.ndarray, k: int, niter: int = 100, seed: int = 0, gpu: bool = False
) -> KMeansResult:
    """Euclidean k-means of float32 (N, d) `vectors` into `k` clusters with `faiss.Kmeans`.

    Trains on all N vectors: faiss's subsampling above 256 points per centroid is off, as
    in `kmeans_sharded`, so both modes give the same result. faiss warns on stderr when
    there are fewer than 39 points per centroid ("please provide at least ... training
    points"); that is advice, not an error, so the threshold is set to 1 and small inputs
    cluster quietly.
    """
    _check_k(k, niter)
    x = _as_vectors(vectors)
    _check_counts(k, len(x), count_nonfinite_rows(x) if len(x) else 0)
    if gpu:
        require_faiss_gpu()
    n, d = x.shape
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        verbose=False,
        gpu=bool(gpu),
        min_points_per_centroid=1,
        max_points_per_centroid=max(1, -(-n // k)),
    )
    km.train(x)
    assert km.centroids is not None and km.iteration_stats is not None
    # The index holds the final centroids: one more assignment gives the final objective.
    distances, labels = km.index.search(x, 1)
    objective = float(distances.sum(dtype=np.float64))
    return _result(km.centroids, labels.ravel(), objective, len(km.iteration_stats))


# ---- over Ray actors ---------------------------------------------------------------------


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


class DatasetAssign(Protocol):
    """What k-means needs of the vectors (faiss.contrib.clustering's interface)."""

    def count(self) -> int: ...

    def dim(self) -> int: ...

    def get_subset(self, indices: np.ndarray) -> np.ndarray: ...

    def assign_to(
        self, centroids: np.ndarray, weights: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class _FaissRandom:
    """The float stream of faiss's `RandomGenerator(seed).rand_float()`: mt19937 words over
    their maximum, in float32. numpy's legacy RandomState is the same mt19937 with the same
    seeding, so the stream is drawn in blocks instead of one SWIG call per number."""

    def __init__(self, seed: int) -> None:
        self._state = np.random.RandomState(seed)
        self._floats = np.zeros(0, dtype=np.float32)

    def floats(self, start: int, count: int) -> np.ndarray:
        """float32 (count,) numbers start..start+count of the stream."""
        while len(self._floats) < start + count:
            words = self._state.randint(0, 2**32, size=max(count, 4096), dtype=np.uint32)
            block = words.astype(np.float32) / np.float32(4294967295.0)
            self._floats = np.concatenate([self._floats, block])
        return self._floats[start : start + count]


_SPLIT_EPS = 1 / 1024.0  # faiss: "a bit above machine epsilon for float16"


def split_empty_clusters(centroids: np.ndarray, hassign: np.ndarray, n: int) -> int:
    """Re-seed the empty clusters in place by splitting others, exactly as faiss's C++ k-means.

    `centroids` float32 (K, d), `hassign` float32 (K,) vectors per cluster, `n` vectors in
    all. For each empty cluster in id order, clusters are scanned cyclically from 0 and the
    j-th is taken with probability (size - 1) / (n - K) against faiss's RandomGenerator(1234)
    (restarted at every call); its centroid is copied, the two copies are pushed apart by
    a factor 1 +- 1/1024 per coordinate, and its count is shared. Returns the splits made.
    """
    empty = np.flatnonzero(hassign == 0)
    if not len(empty):
        return 0
    k, d = centroids.shape
    rng = _FaissRandom(1234)
    position = 0
    even = np.arange(d) % 2 == 0
    up, down = np.float32(1 + _SPLIT_EPS), np.float32(1 - _SPLIT_EPS)
    grow, shrink = np.where(even, up, down), np.where(even, down, up)
    denominator = float(np.float32(n - k))
    for ci in empty:
        # faiss computes p in double and stores it in a float: the same rounding here.
        p = ((hassign.astype(np.float64) - 1.0) / denominator).astype(np.float32)
        scanned = 0
        while True:
            block = max(4 * k, 4096)
            draws = rng.floats(position + scanned, block)
            hits = np.flatnonzero(draws < p[(scanned + np.arange(block)) % k])
            if len(hits):
                step = scanned + int(hits[0])
                break
            scanned += block
        cj = step % k
        position += step + 1
        centroids[ci] = centroids[cj] * grow
        centroids[cj] = centroids[cj] * shrink
        hassign[ci] = hassign[cj] / np.float32(2)
        hassign[cj] -= hassign[ci]
    return len(empty)


def train_kmeans(
    data: DatasetAssign, k: int, niter: int, seed: int
) -> tuple[np.ndarray, list[float]]:
    """faiss's k-means (C++ `Clustering::train`, one redo, no subsampling) over any
    `DatasetAssign`. Returns float32 (K, d) centroids and the objective of each iteration
    (computed before its update, float32-accumulated like faiss's `iteration_stats`).

    Stops early once an iteration's objective equals the previous one, like faiss.
    """
    n = data.count()
    if n == k:
        # faiss's corner case: the vectors are the centroids, one nominal iteration.
        return np.ascontiguousarray(data.get_subset(np.arange(n)), dtype=np.float32), [0.0]
    centroids = np.ascontiguousarray(data.get_subset(initial_rows(n, k, seed)), np.float32)
    objectives: list[float] = []
    for _ in range(niter):
        labels, distances, sums = data.assign_to(centroids)
        # faiss sums the distances in a float, one after the other: cumsum does the same,
        # so the convergence test sees the numbers faiss sees.
        objective = float(np.cumsum(distances, dtype=np.float32)[-1])
        hassign = np.bincount(labels, minlength=k).astype(np.float32)
        # faiss multiplies by the reciprocal; empty clusters start from zero, then split.
        with np.errstate(divide="ignore"):
            norm = np.where(hassign > 0, np.float32(1) / hassign, np.float32(0))
        centroids = (np.asarray(sums, dtype=np.float32) * norm[:, None]).astype(np.float32)
        split_empty_clusters(centroids, hassign, n)
        converged = bool(objectives) and objective == objectives[-1]
        objectives.append(objective)
        if converged:
            break
    return centroids, objectives


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
    arg = ray.put(_as_vectors(source)) if isinstance(source, np.ndarray) else source
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

    _check_k(k, niter)
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
        _check_counts(k, n, sum(i.nonfinite for i in infos))
        data = ShardedDataset(actors, [i.count for i in infos], dims.pop())
        centroids, objectives = train_kmeans(data, k, niter, seed)
        # One more assignment, to the final centroids, gives the final objective.
        distances, labels = data.perform_search(centroids)
        objective = float(distances.sum(dtype=np.float64))
        return _result(centroids, labels.ravel(), objective, len(objectives))
    finally:
        for actor in actors:
            ray.kill(actor)


# ---- by configuration --------------------------------------------------------------------


def _known_count(data: np.ndarray | Sequence[ShardSource]) -> int | None:
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
    n = _known_count(shards)
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


def choose_mode(data: np.ndarray | Sequence[ShardSource], cfg: ClusterConfig) -> str:
    """The mode to run, "local" or "sharded": `cfg.mode`, or for "auto" local when
    N <= max_local_vectors (sharded when N is unknown without loading, e.g. callables)."""
    if cfg.mode not in MODES:
        raise ValueError(f"cluster.mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.mode != "auto":
        return cfg.mode
    n = _known_count(data)
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
        shards = np.array_split(_as_vectors(data), max(1, min(cfg.num_shards, len(data))))
    else:
        shards = data
    return kmeans_sharded(shards, cfg.k, cfg.niter, cfg.seed, cfg.shard_num_cpus, cfg.gpu)


__all__ = [
    "DatasetAssign",
    "KMeansResult",
    "ParquetShard",
    "ShardInfo",
    "ShardSource",
    "ShardWorker",
    "ShardedDataset",
    "choose_mode",
    "initial_rows",
    "kmeans",
    "kmeans_local",
    "kmeans_sharded",
    "load_shards",
    "split_empty_clusters",
    "train_kmeans",
    "vectors_from_arrow",
]
