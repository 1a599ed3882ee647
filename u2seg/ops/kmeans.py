"""k-means of embedding vectors with faiss (docs/method.md stage 3): the numeric core.

- `kmeans_local`: `faiss.Kmeans` (faiss's C++ loop) on an in-memory (N, d) array.
- `train_kmeans`: the same k-means over any `DatasetAssign` (faiss.contrib.clustering's
  interface: count, dim, get_subset, assign_to), so the vectors may live elsewhere; the
  Ray actors that hold shards of them are `u2seg.stages._sharded_kmeans`.

Both run one algorithm: faiss's initial sample (`faiss.rand_perm` with seed + 1), its
assign / average / split-empty-clusters iteration and its stop once the objective no longer
changes. `train_kmeans` follows faiss's C++ `Clustering::train` step for step rather than
using `faiss.contrib.clustering.kmeans`: that loop re-seeds empty clusters with another
random rule, which sends the two modes to different local minima (1.5 % apart in objective
on blob data); with the C++ rule they agree to float rounding.

Empty clusters are re-seeded during training by splitting large ones; clusters that still
end empty after the final assignment (duplicate vectors) are reported in
`KMeansResult.empty_clusters`, not treated as an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import faiss
import numpy as np

if TYPE_CHECKING:
    pass


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


def as_vectors(x: Any) -> np.ndarray:
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


def check_k(k: int, niter: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer, got {k!r}")
    if k <= 0:
        raise ValueError(f"k must be a positive number of clusters, got k={k}")
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")


def check_counts(k: int, n: int, nonfinite: int) -> None:
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


def kmeans_result(
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
    check_k(k, niter)
    x = as_vectors(vectors)
    check_counts(k, len(x), count_nonfinite_rows(x) if len(x) else 0)
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
    return kmeans_result(km.centroids, labels.ravel(), objective, len(km.iteration_stats))


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
