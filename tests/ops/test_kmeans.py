"""k-means in one process and over Ray actors: blobs, agreement of the modes, bad input."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faiss.contrib.clustering import DatasetAssign
from faiss.contrib.clustering import kmeans as contrib_kmeans
from scipy.optimize import linear_sum_assignment

from u2seg.config import ClusterConfig
from u2seg.data.vectors import ParquetShard, vectors_from_arrow
from u2seg.ops.kmeans import KMeansResult, _FaissRandom, initial_rows, kmeans_local, train_kmeans
from u2seg.stages._sharded_kmeans import (
    ShardedDataset,
    ShardSource,
    ShardWorker,
    kmeans_sharded,
    load_shards,
)
from u2seg.stages.cluster import choose_mode, kmeans

SEED = 2  # k-means seed whose random start separates the blobs of `blobs()`


def blobs(
    clusters: int = 6, per: int = 50, d: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """float32 (clusters * per, d) points around far-apart centres, and their int labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)) * 10
    labels = np.repeat(np.arange(clusters), per)
    x = (centres[labels] + rng.normal(size=(len(labels), d)) * 0.3).astype(np.float32)
    order = rng.permutation(len(x))
    return x[order], labels[order]


def noise(n: int = 3000, d: int = 16, seed: int = 1) -> np.ndarray:
    """float32 (n, d) Gaussian noise: no true clusters, so many near-ties between centroids."""
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def matched_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of points whose labels agree under the best one-to-one label matching."""
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(a))


def duplicates() -> np.ndarray:
    """float32 (50, 8): 10 distinct points, 5 copies each."""
    return np.repeat(noise(10, 8, seed=3), 5, axis=0)


def write_vectors(path: Path, x: np.ndarray, column: str = "embedding", fixed: bool = True) -> None:
    """Parquet file of one vector column (fixed-size or variable lists), 3 row groups."""
    flat = pa.array(x.reshape(-1), type=pa.float32())
    if fixed:
        vectors: pa.Array = pa.FixedSizeListArray.from_arrays(flat, x.shape[1])
    else:
        offsets = pa.array(np.arange(len(x) + 1, dtype=np.int32) * x.shape[1])
        vectors = pa.ListArray.from_arrays(offsets, flat)
    table = pa.table({"id": np.arange(len(x)), column: vectors})
    pq.write_table(table, path, row_group_size=max(1, -(-len(x) // 3)))


def check_consistent(result: KMeansResult, x: np.ndarray, k: int) -> None:
    """Shapes, sizes and objective agree with the assignment."""
    assert result.centroids.shape == (k, x.shape[1]) and result.centroids.dtype == np.float32
    assert result.assignment.shape == (len(x),) and result.assignment.dtype == np.int64
    np.testing.assert_array_equal(result.sizes, np.bincount(result.assignment, minlength=k))
    assert result.empty_clusters == int((result.sizes == 0).sum())
    objective = ((x - result.centroids[result.assignment]) ** 2).sum(dtype=np.float64)
    assert result.objective == pytest.approx(objective, rel=1e-4, abs=1e-3)


# ---- in one process ----------------------------------------------------------------------


def test_local_recovers_separated_blobs() -> None:
    # k-means from a random start (faiss's, the reference's) can park two centroids in one
    # blob and merge two others for good; with this seed the start does not.
    x, labels = blobs()
    result = kmeans_local(x, 6, niter=20, seed=SEED)
    assert matched_fraction(labels, result.assignment) == 1.0
    np.testing.assert_array_equal(np.sort(result.sizes), [50] * 6)
    assert result.iterations < 20  # converged: faiss stops early
    assert result.empty_clusters == 0
    check_consistent(result, x, 6)


def test_local_is_seeded_and_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    x = noise(300)  # fewer than faiss's 39 points per centroid: no warning either
    first, again = kmeans_local(x, 20, niter=10, seed=5), kmeans_local(x, 20, niter=10, seed=5)
    np.testing.assert_array_equal(first.centroids, again.centroids)
    np.testing.assert_array_equal(first.assignment, again.assignment)
    assert not np.array_equal(first.centroids, kmeans_local(x, 20, niter=10, seed=6).centroids)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


class InProcessShards:
    """A `DatasetAssign` over in-process `ShardWorker`s: `ShardedDataset` without Ray."""

    def __init__(self, x: np.ndarray, shards: int) -> None:
        self.x = x
        self.workers = [ShardWorker(part) for part in np.array_split(x, shards)]
        for worker in self.workers:
            worker.load()

    def count(self) -> int:
        return len(self.x)

    def dim(self) -> int:
        return int(self.x.shape[1])

    def get_subset(self, indices: np.ndarray) -> np.ndarray:
        return self.x[indices]

    def assign_to(
        self, centroids: np.ndarray, weights: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = [worker.assign_to(centroids) for worker in self.workers]
        sums = np.zeros_like(parts[0][2])
        for part in parts:
            sums += part[2]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), sums


def test_initial_rows_are_faiss_kmeans_start() -> None:
    x = noise(500)
    km = faiss.Kmeans(16, 12, niter=0, seed=4)
    km.train(x)
    np.testing.assert_array_equal(x[initial_rows(500, 12, 4)], km.centroids)


def test_split_random_stream_is_faiss_random_generator() -> None:
    generator = faiss.RandomGenerator(1234)  # type: ignore[attr-defined]
    expected = np.array([generator.rand_float() for _ in range(5000)], dtype=np.float32)
    np.testing.assert_array_equal(_FaissRandom(1234).floats(0, 5000), expected)


@pytest.mark.parametrize(
    ("x", "k"),
    [
        (blobs(clusters=50, per=80, d=128, seed=7)[0], 50),  # 2 clusters split on the way
        (duplicates(), 20),  # 10 empty clusters at every iteration
        (noise(), 20),
        (duplicates(), 50),  # K = N: faiss takes the vectors as they are
    ],
    ids=["blobs", "duplicates", "noise", "k-equals-n"],
)
def test_train_kmeans_replays_faiss_kmeans(x: np.ndarray, k: int) -> None:
    # The sharded mode's loop, one in-process shard: faiss.Kmeans step for step, empty
    # cluster splits and early stop included.
    km = faiss.Kmeans(x.shape[1], k, niter=15, seed=3, min_points_per_centroid=1)
    km.train(x)
    centroids, objectives = train_kmeans(InProcessShards(x, 1), k, 15, seed=3)
    assert km.obj is not None and km.centroids is not None
    np.testing.assert_allclose(objectives, km.obj, rtol=1e-6)
    np.testing.assert_allclose(centroids, km.centroids, rtol=1e-5, atol=1e-5)
    # Shards only change the order of float sums.
    centroids, objectives = train_kmeans(InProcessShards(x, 3), k, 15, seed=3)
    assert objectives[-1] == pytest.approx(km.obj[-1], rel=1e-5, abs=1e-3)


@pytest.mark.parametrize(
    ("vectors", "k", "message"),
    [
        (np.zeros((0, 8), np.float32), 2, "no vectors"),
        ([], 2, "no vectors"),
        (noise(10), 0, "positive"),
        (noise(10), -3, "positive"),
        (noise(10), 11, "k=11 is more than the 10 vectors"),
        (np.zeros(10, np.float32), 2, "2-D"),
        (np.zeros((10, 0), np.float32), 2, "dimension 0"),
    ],
)
def test_local_rejects_bad_input(vectors: np.ndarray, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kmeans_local(vectors, k)


def test_local_rejects_nonfinite_vectors_naming_the_rows() -> None:
    x = noise(100)
    x[[3, 40], 2] = np.nan
    x[70, 0] = np.inf
    with pytest.raises(ValueError, match="3 of the 100 vectors contain NaN or infinite"):
        kmeans_local(x, 4)


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources"), reason="faiss has GPU support")
def test_gpu_without_faiss_gpu_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="gpu"):
        kmeans_local(noise(100), 4, gpu=True)


@pytest.mark.parametrize(("k", "empty"), [(20, 10), (50, 40)])
def test_empty_clusters_are_reported(k: int, empty: int) -> None:
    x = duplicates()
    result = kmeans_local(x, k, niter=10)
    assert result.empty_clusters == empty
    assert len(result.empty_cluster_ids) == empty
    assert set(result.sizes[result.sizes > 0]) == {5}
    assert result.objective == pytest.approx(0.0, abs=1e-3)


# ---- shard parts without Ray -------------------------------------------------------------


def test_shard_worker_matches_faiss_dataset_assign() -> None:
    x = noise(500)
    centroids = x[:7].copy()
    weights = np.random.default_rng(0).random(len(x)).astype(np.float32)
    worker = ShardWorker(x)
    info = worker.load()
    assert (info.count, info.dim, info.nonfinite) == (500, 16, 0)
    reference = DatasetAssign(x)
    for w in (None, weights):
        labels, distances, sums = worker.assign_to(centroids, w)
        ref_labels, ref_distances, ref_sums = reference.assign_to(centroids, w)
        np.testing.assert_array_equal(labels, ref_labels)
        np.testing.assert_allclose(distances, ref_distances, rtol=1e-5)
        np.testing.assert_allclose(sums, ref_sums, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(worker.rows(np.array([9, 2])), x[[9, 2]])


def test_parquet_shards_load_fixed_and_variable_lists(tmp_path: Path) -> None:
    x = noise(40, 6)
    write_vectors(tmp_path / "fixed.parquet", x)
    write_vectors(tmp_path / "lists.parquet", x, column="cls", fixed=False)
    fixed = ParquetShard(str(tmp_path / "fixed.parquet"))
    assert fixed.num_rows() == 40
    np.testing.assert_array_equal(fixed.load(), x)
    np.testing.assert_array_equal(ParquetShard(str(tmp_path / "lists.parquet"), "cls").load(), x)
    with pytest.raises(ValueError, match="2 rows have a null vector"):
        vectors_from_arrow(pa.array([[1.0, 2.0], None, None]), "v")
    with pytest.raises(ValueError, match="different lengths"):
        vectors_from_arrow(pa.array([[1.0, 2.0], [1.0]]), "v")
    with pytest.raises(ValueError, match="list-of-floats"):
        vectors_from_arrow(pa.array([1.0, 2.0]), "v")
    with pytest.raises(ValueError, match="no such column"):
        ParquetShard(str(tmp_path / "fixed.parquet"), "cls").load()
    write_vectors(tmp_path / "empty.parquet", x[:0])
    assert ParquetShard(str(tmp_path / "empty.parquet")).load().shape == (0, 6)


def test_mode_choice() -> None:
    x = noise(100)
    assert choose_mode(x, ClusterConfig(mode="auto", max_local_vectors=100)) == "local"
    assert choose_mode(x, ClusterConfig(mode="auto", max_local_vectors=99)) == "sharded"
    assert choose_mode([x, x], ClusterConfig(mode="auto", max_local_vectors=150)) == "sharded"
    assert choose_mode([lambda: x], ClusterConfig(mode="auto")) == "sharded"
    assert choose_mode(x, ClusterConfig(mode="sharded")) == "sharded"
    with pytest.raises(ValueError, match="cluster.mode"):
        choose_mode(x, ClusterConfig(mode="ray"))
    # Shard sources in local mode are concatenated in this process.
    cfg = ClusterConfig(k=6, niter=20, mode="local")
    x, _ = blobs()
    whole = kmeans(x, cfg)
    parts = kmeans([x[:100], lambda: x[100:]], cfg)
    np.testing.assert_array_equal(whole.assignment, parts.assignment)


def test_load_shards_fills_one_array(tmp_path: Path) -> None:
    x = noise(90, 6)
    write_vectors(tmp_path / "a.parquet", x[:40])
    empty = np.zeros((0, 0), np.float32)
    sources: list[ShardSource] = [empty, ParquetShard(str(tmp_path / "a.parquet")), x[40:]]
    np.testing.assert_array_equal(load_shards(sources), x)
    np.testing.assert_array_equal(load_shards([x[:10], lambda: x[10:]]), x)
    with pytest.raises(ValueError, match="different dimensions"):
        load_shards([x, noise(5, 3)])


def test_sharded_needs_ray() -> None:
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray session is running")
    with pytest.raises(RuntimeError, match="running Ray"):
        kmeans_sharded([noise(10)], 2)


# ---- over Ray actors ---------------------------------------------------------------------


def split(x: np.ndarray, *cuts: int) -> list[np.ndarray]:
    return np.split(x, list(cuts))


@pytest.mark.ray
@pytest.mark.slow
def test_sharded_dataset_is_a_dataset_assign(local_ray: None) -> None:
    import ray

    x = noise(900)
    remote: Any = ray.remote(ShardWorker).options(num_cpus=0.5)
    shards = split(x, 300, 300)  # the middle shard is empty
    actors = [remote.remote(s) for s in shards]
    try:
        infos = ray.get([a.load.remote() for a in actors])
        data = ShardedDataset(actors, [i.count for i in infos], 16)
        reference = DatasetAssign(x)
        assert (data.count(), data.dim()) == (900, 16)
        indices = np.array([899, 0, 299, 300, 512, 7])
        np.testing.assert_array_equal(data.get_subset(indices), x[indices])
        centroids = x[:9].copy()
        distances, labels = data.perform_search(centroids)
        ref_distances, ref_labels = reference.perform_search(centroids)
        assert distances.shape == (900, 1) and labels.shape == (900, 1)
        np.testing.assert_array_equal(labels, ref_labels)
        weights = np.linspace(0.5, 2.0, 900).astype(np.float32)
        got, want = data.assign_to(centroids, weights), reference.assign_to(centroids, weights)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
        np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=1e-3)
        # It is the interface faiss's own Python loop drives, too.
        with contextlib.redirect_stdout(io.StringIO()):
            centroids = contrib_kmeans(9, data, niter=3, seed=1, verbose=False)
        assert centroids.shape == (9, 16)
    finally:
        for actor in actors:
            ray.kill(actor)


@pytest.mark.ray
@pytest.mark.slow
def test_sharded_matches_local(local_ray: None) -> None:
    x, labels = blobs()
    local = kmeans_local(x, 6, niter=20, seed=SEED)
    sharded = kmeans_sharded(split(x, 120), 6, niter=20, seed=SEED, num_cpus_per_actor=0.5)
    assert matched_fraction(local.assignment, sharded.assignment) == 1.0
    assert matched_fraction(labels, sharded.assignment) == 1.0
    assert sharded.iterations == local.iterations < 20
    check_consistent(sharded, x, 6)

    # Empty clusters appear on the way and are split: the modes must split the same ones.
    y = blobs(clusters=50, per=80, d=128, seed=7)[0]
    local = kmeans_local(y, 50, niter=25, seed=3)
    shards = split(y, 1000, 2200)
    sharded = kmeans_sharded(shards, 50, niter=25, seed=3, num_cpus_per_actor=0.5)
    assert abs(sharded.objective - local.objective) / local.objective < 0.01
    assert sharded.iterations == local.iterations
    # Float sums in another order may move a point between the two halves of a split.
    assert matched_fraction(local.assignment, sharded.assignment) > 0.999
    check_consistent(sharded, y, 50)
    again = kmeans_sharded(shards, 50, niter=25, seed=3, num_cpus_per_actor=0.5)
    np.testing.assert_array_equal(again.centroids, sharded.centroids)
    np.testing.assert_array_equal(again.assignment, sharded.assignment)


@pytest.mark.ray
@pytest.mark.slow
def test_sharded_sources_parquet_callable_reference(local_ray: None, tmp_path: Path) -> None:
    import ray

    x, labels = blobs()
    write_vectors(tmp_path / "a.parquet", x[:100])
    write_vectors(tmp_path / "b.parquet", x[100:200], column="cls", fixed=False)
    tail = x[200:].copy()
    sources: list[ShardSource] = [
        ParquetShard(str(tmp_path / "a.parquet")),
        ParquetShard(str(tmp_path / "b.parquet"), "cls"),
        lambda: tail,
        ray.put(np.zeros((0, 16), np.float32)),
    ]
    cfg = ClusterConfig(
        k=6, niter=20, seed=SEED, mode="auto", max_local_vectors=10, shard_num_cpus=0.5
    )
    result = kmeans(sources, cfg)
    local = kmeans_local(x, 6, niter=20, seed=SEED)
    np.testing.assert_array_equal(result.assignment, local.assignment)
    assert matched_fraction(labels, result.assignment) == 1.0

    # An array in sharded mode is split into cfg.num_shards actors.
    cfg = ClusterConfig(k=20, niter=10, mode="sharded", num_shards=2, shard_num_cpus=0.5)
    result = kmeans(duplicates(), cfg)
    assert result.empty_clusters == 10
    check_consistent(result, duplicates(), 20)


@pytest.mark.ray
@pytest.mark.slow
def test_sharded_rejects_bad_input(local_ray: None) -> None:
    x = noise(100)
    bad = x.copy()
    bad[[5, 6]] = np.nan
    with pytest.raises(ValueError, match="2 of the 200 vectors contain NaN"):
        kmeans_sharded([x, bad], 4, num_cpus_per_actor=0.5)
    with pytest.raises(ValueError, match="k=201 is more than the 200 vectors"):
        kmeans_sharded([x, x], 201, num_cpus_per_actor=0.5)
    with pytest.raises(ValueError, match="different dimensions"):
        kmeans_sharded([x, noise(100, 8)], 4, num_cpus_per_actor=0.5)
    with pytest.raises(ValueError, match="no vectors"):
        kmeans_sharded([np.zeros((0, 16), np.float32)], 4, num_cpus_per_actor=0.5)
    with pytest.raises(ValueError, match="positive"):
        kmeans_sharded([x], 0)
