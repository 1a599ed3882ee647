"""Feature extraction throughput: the Ray Data stage vs a bare forward, same images and model.

    python benchmarks/features.py [--images 48] [--image-size 476] [--batch-size 4]

Prints images/s of (a) a bare forward of the backbone over preloaded, resized images in this
process, (b) `u2seg features` through Ray Data (read + decode + resize tasks, an actor pool,
Parquet shards) end to end, and from its first result batch on (steady state, without actor
start-up and model loading), and the ratios (b)/(a); then the seconds until the first result
and what one new actor spends before its first batch (what every actor an autoscaler adds
pays): Ray worker start, imports, weights (from the object store, as the stages do, against
the disk cache and the first conversion on a node that has no cache), first forward. Ray is
started before timing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from u2seg.config import RayConfig, load_config
from u2seg.data.demo import write_demo_dataset
from u2seg.data.images import read_image, resize_square
from u2seg.models.vit import backbone_state, input_size, load_backbone, normalise
from u2seg.runtime import ray_session
from u2seg.stages.features import run

PACKAGED = "dinov2_vits14"


def make_images(folder: Path, count: int) -> list[Path]:
    """`count` files cycling through the demo photos."""
    demo = write_demo_dataset(folder / "demo")
    photos = sorted(demo.root.iterdir())
    paths = []
    for i in range(count):
        src = photos[i % len(photos)]
        dst = folder / "images" / f"{i:05d}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        paths.append(dst)
    return paths


def bare_forward(paths: list[Path], size: int, batch: int) -> tuple[float, int]:
    """Best images/s of the backbone alone on preloaded square images, over 1..#CPU torch
    threads, and the thread count that gave it."""
    model = load_backbone("dinov2_vits14", weights="packaged")
    pixels = np.stack([resize_square(read_image(str(p), 10**9), size) for p in paths])
    device = torch.device("cpu")
    best = (0.0, 1)
    for threads in range(1, (os.cpu_count() or 1) + 1):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            model(normalise(pixels[:batch], device), want_keys=False)  # warm-up
            start = time.perf_counter()
            for i in range(0, len(pixels), batch):
                model(normalise(pixels[i : i + batch], device), want_keys=False)
            best = max(best, (len(pixels) / (time.perf_counter() - start), threads))
    return best


class StartupProbe:
    """Times, in a fresh Ray worker, what a feature actor's start spends."""

    def __init__(self, submitted: float, state: list, size: int, batch: int) -> None:
        entered = time.time()
        import importlib

        # Unpickling this class imports numpy and torch: they count in the worker start.
        phases = {"Ray worker start + import torch": entered - submitted}
        for module in ("timm", "ray.data", "u2seg.stages.features"):
            start = time.perf_counter()
            importlib.import_module(module)
            phases[f"import {module}"] = time.perf_counter() - start
        import ray

        from u2seg.models import vit

        start = time.perf_counter()
        model = vit.load_backbone(PACKAGED, state=ray.get(state[0]))
        phases["weights from the object store"] = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as cold:
            start = time.perf_counter()
            vit.load_backbone(PACKAGED, "packaged", cache_dir=cold)
            phases["(instead: first conversion, empty cache)"] = time.perf_counter() - start
            start = time.perf_counter()
            vit.load_backbone(PACKAGED, "packaged", cache_dir=cold)
            phases["(instead: from the disk cache)"] = time.perf_counter() - start
        torch.set_num_threads(1)
        pixels = np.zeros((batch, size, size, 3), np.uint8)
        for label in ("first forward", "(second forward)"):
            start = time.perf_counter()
            with torch.inference_mode():
                model(vit.normalise(pixels, torch.device("cpu")), want_keys=False)
            phases[label] = time.perf_counter() - start
        self.phases = phases

    def report(self) -> dict[str, float]:
        return self.phases


def startup_phases(size: int, batch: int) -> dict[str, float]:
    """`StartupProbe`'s phases, in a new 1-CPU actor of the running Ray."""
    import ray

    state = ray.put(backbone_state(PACKAGED, "packaged"))
    probe = ray.remote(num_cpus=1)(StartupProbe).remote(time.time(), [state], size, batch)
    return ray.get(probe.report.remote())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=476)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--actors", type=int, default=os.cpu_count() or 1, help="feature actors, 1 thread each"
    )
    args = parser.parse_args()
    size = input_size(args.image_size, "dinov2_vits14")
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images)
        bare, threads = bare_forward(paths, size, args.batch_size)
        cfg = load_config(
            overrides=[
                f"data.source={Path(tmp) / 'images'}",
                f"output={Path(tmp) / 'run'}",
                "backbone.name=dinov2_vits14",
                "backbone.weights=packaged",
                f"features.image_size={size}",
                f"features.batch_size={args.batch_size}",
                f"features.concurrency={args.actors}",
                "features.torch_threads=1",
                "data.shard_size=16",
            ]
        )
        with ray_session(RayConfig(num_cpus=os.cpu_count())):
            timing = run(cfg)["timing"]
            phases = startup_phases(size, args.batch_size)
    print(
        f"images: {args.images} at {size}x{size}, DINOv2 ViT-S/14, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"bare forward          : {bare:7.2f} images/s (baseline, best at {threads} threads)")
    value, steady = timing["images_per_s"], timing["steady_images_per_s"]
    print(
        f"ray data, end to end  : {value:7.2f} images/s  ratio {value / bare:.2f} "
        f"({args.actors} actors x 1 thread; start-up included)"
    )
    print(
        f"ray data, steady      : {steady:7.2f} images/s  ratio {steady / bare:.2f} "
        "(after the first result)"
    )
    print(f"start-up              : {timing['startup_s']:7.2f} s until the first result")
    print("one new actor, alone, until its first batch is done:")
    for label, seconds in phases.items():
        print(f"  {label:<42}: {seconds:6.2f} s")
    counted = sum(v for k, v in phases.items() if not k.startswith("("))
    print(f"  {'in all':<42}: {counted:6.2f} s")


if __name__ == "__main__":
    main()
