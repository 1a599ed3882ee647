"""k-means of mask embeddings: faiss vs numpy, sharded (Ray) vs in-process, driver memory.

    python benchmarks/cluster.py [--n 100000] [--d 768] [--k 800] [--niter 10]
                                 [--memory-sizes 100000 400000] [--memory-niter 2]

Prints, on clustered float32 vectors (Gaussian blobs around --k random centres):
1. In-process: `kmeans_local` (faiss) vs a plain numpy Lloyd loop (BLAS distances,
   `np.add.at` sums) from the same initial centroids for the same iterations: seconds, ratio,
   objectives.
2. Sharded: `kmeans_sharded` with 2 array shards on a local 2-CPU Ray vs `kmeans_local` on
   the same data: seconds (actor start-up and shard loading included), overhead ratio,
   objectives and their relative difference.
3. Driver memory: peak RSS growth of a fresh process running `kmeans_sharded` over 2 Parquet
   shards, against one running `kmeans_local` on the same files, for each --memory-sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from u2seg.config import RayConfig
from u2seg.data.vectors import ParquetShard
from u2seg.ops.kmeans import initial_rows, kmeans_local
from u2seg.runtime import ray_session
from u2seg.stages._sharded_kmeans import kmeans_sharded, load_shards

T = TypeVar("T")
BLOCK = 50_000
MIB = 2**20


def clustered(
    n: int, d: int, centres: int, seed: int = 0, start: int = 0, noise: float = 1.0
) -> np.ndarray:
    """float32 (n, d) rows start..start+n of a fixed blob dataset: each row is one of
    `centres` unit-Gaussian centres plus Gaussian noise of std `noise` (1: blobs overlap
    enough that k-means takes tens of iterations). Rows depend only on their index block,
    so a shard can be generated without the rest."""
    centre_rng = np.random.default_rng(seed)
    means = centre_rng.normal(size=(centres, d)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for i in range(0, n, BLOCK):
        rows = min(BLOCK, n - i)
        rng = np.random.default_rng([seed, (start + i) // BLOCK])
        labels = rng.integers(0, centres, rows)
        out[i : i + rows] = means[labels] + noise * rng.normal(size=(rows, d)).astype(np.float32)
    return out


def numpy_lloyd(x: np.ndarray, init: np.ndarray, niter: int) -> tuple[float, int]:
    """Plain Lloyd iterations from (K, d) `init`; returns the final objective and the
    iterations run (stopping, like faiss, once the objective no longer changes).

    Distances by blocks of a BLAS matmul (||x||^2 - 2 x.c + ||c||^2); an empty cluster keeps
    its centroid."""
    centroids = init.copy()
    x_sq = np.einsum("ij,ij->i", x, x)

    def assign(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c_sq = np.einsum("ij,ij->i", c, c)
        labels = np.empty(len(x), dtype=np.int64)
        dist = np.empty(len(x), dtype=np.float32)
        for i in range(0, len(x), 8192):
            d2 = x_sq[i : i + 8192, None] - 2 * (x[i : i + 8192] @ c.T) + c_sq[None]
            labels[i : i + 8192] = d2.argmin(axis=1)
            dist[i : i + 8192] = np.take_along_axis(d2, labels[i : i + 8192, None], 1)[:, 0]
        return labels, np.maximum(dist, 0)

    previous, iterations = None, 0
    for _ in range(niter):
        labels, dist = assign(centroids)
        iterations += 1
        objective = float(dist.sum(dtype=np.float64))
        if objective == previous:
            break
        previous = objective
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        counts = np.bincount(labels, minlength=len(centroids))
        full = counts > 0
        centroids[full] = sums[full] / counts[full, None]
    _, dist = assign(centroids)
    return float(dist.sum(dtype=np.float64)), iterations


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """fn's result and its wall-clock seconds."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def write_shards(folder: Path, n: int, d: int, centres: int, count: int = 2) -> list[str]:
    """`count` Parquet files of a fixed-size-list `embedding` column, n rows in all."""
    paths = []
    bounds = np.linspace(0, n, count + 1).astype(int)
    for s in range(count):
        path = folder / f"part-{s:05d}.parquet"
        with pq.ParquetWriter(path, pa.schema([("embedding", pa.list_(pa.float32(), d))])) as w:
            for i in range(bounds[s], bounds[s + 1], BLOCK):
                rows = min(BLOCK, bounds[s + 1] - i)
                x = clustered(rows, d, centres, start=i)
                flat = pa.array(x.reshape(-1), type=pa.float32())
                w.write_table(pa.table({"embedding": pa.FixedSizeListArray.from_arrays(flat, d)}))
        paths.append(str(path))
    return paths


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> float:
    """Current RSS in MiB, after restarting the peak count at it (Linux clear_refs 5), so
    the later peak belongs to what runs next and not to imports or start-up."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    return _status_mib("VmHWM")


def child(mode: str, paths: list[str], k: int, niter: int) -> None:
    """In a fresh process: peak RSS before and after one k-means of the Parquet shards."""
    shards = [ParquetShard(p) for p in paths]
    if mode == "sharded":
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        with ray_session(RayConfig(num_cpus=2)):
            before = reset_peak_rss()
            result, seconds = timed(kmeans_sharded, shards, k, niter, num_cpus_per_actor=1.0)
            after = peak_rss_mib()
    else:
        before = reset_peak_rss()
        start = time.perf_counter()
        x = load_shards(shards)
        result = kmeans_local(x, k, niter)
        seconds = time.perf_counter() - start
        after = peak_rss_mib()
    print(
        json.dumps(
            {"before": before, "after": after, "seconds": seconds, "objective": result.objective}
        )
    )


def run_child(mode: str, paths: list[str], k: int, niter: int) -> dict[str, float]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--k",
        str(k),
        "--niter",
        str(niter),
        "--paths",
        *paths,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--k", type=int, default=800)
    parser.add_argument("--niter", type=int, default=10)
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[100_000, 400_000])
    parser.add_argument("--memory-niter", type=int, default=2)
    parser.add_argument("--child", choices=["local", "sharded"], help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.paths, args.k, args.niter)
        return

    print(
        f"{os.cpu_count()} CPUs; {args.n} x {args.d} float32, K={args.k}, {args.niter} iterations"
    )
    x = clustered(args.n, args.d, args.k)

    print("\n1. In-process k-means, same initial centroids and iterations")
    init = x[initial_rows(len(x), args.k, 0)]
    (np_obj, np_iter), np_s = timed(numpy_lloyd, x, init, args.niter)
    local, local_s = timed(kmeans_local, x, args.k, args.niter, 0)
    print(f"  numpy Lloyd (baseline): {np_s:7.2f} s  objective {np_obj:.6g} ({np_iter} iterations)")
    print(
        f"  faiss kmeans_local    : {local_s:7.2f} s  objective {local.objective:.6g} "
        f"({local.iterations} iterations)"
    )
    # Per assignment pass (iterations + the final one), in case one of them stopped early.
    ratio = (np_s / (np_iter + 1)) / (local_s / (local.iterations + 1))
    print(f"  speed-up faiss / numpy: {np_s / local_s:.2f}x total, {ratio:.2f}x per iteration")

    print("\n2. Sharded (2 Ray actors, 1 CPU each) vs in-process, same data")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    with ray_session(RayConfig(num_cpus=2)):
        shards = np.array_split(x, 2)
        sharded, sharded_s = timed(kmeans_sharded, shards, args.k, args.niter, 0, 1.0)
    rel = abs(sharded.objective - local.objective) / local.objective
    print(f"  in-process (baseline) : {local_s:7.2f} s  objective {local.objective:.6g}")
    print(f"  sharded               : {sharded_s:7.2f} s  objective {sharded.objective:.6g}")
    print(
        f"  overhead sharded / in-process: {sharded_s / local_s:.2f}x; "
        f"objective relative difference {rel:.2e} ({'<' if rel < 0.01 else '>='} 1%)"
    )
    del x, shards

    if not args.memory_sizes:
        return
    print(f"\n3. Peak RSS growth of the driver, 2 Parquet shards, {args.memory_niter} iterations")
    print(
        f"  {'N':>8} {'data MiB':>9} {'in-process MiB':>15} {'sharded MiB':>12} "
        f"{'in-process s':>13} {'sharded s':>10}"
    )
    for n in args.memory_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_shards(Path(tmp), n, args.d, args.k)
            loc = run_child("local", paths, args.k, args.memory_niter)
            sha = run_child("sharded", paths, args.k, args.memory_niter)
        print(
            f"  {n:>8} {n * args.d * 4 / MIB:>9.0f} {loc['after'] - loc['before']:>15.0f} "
            f"{sha['after'] - sha['before']:>12.0f} {loc['seconds']:>13.1f} "
            f"{sha['seconds']:>10.1f}"
        )
    print(f"  (K x d centroids: {args.k * args.d * 4 / MIB:.1f} MiB)")


if __name__ == "__main__":
    main()
