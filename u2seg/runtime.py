"""Where work runs: the compute device and the Ray session."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from u2seg.config import RayConfig


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Use the running Ray, join the one in `cfg.address` / RAY_ADDRESS, or start a local one.

    A local Ray binds to 127.0.0.1 and is shut down on exit; a joined one is left running.
    """
    import ray
    import ray.data

    started = False
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            # Without this Ray replaces 127.0.0.1 with the machine's external address.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            ray.init(
                num_cpus=cfg.num_cpus,
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    if not cfg.progress_bars:
        # The stage draws its own progress bar; Ray Data's per-dataset INFO lines are noise.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Results reach the driver in input order, so it holds at most a shard or two.
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def cluster_has_gpus() -> bool:
    import ray

    return bool(ray.cluster_resources().get("GPU", 0) > 0)


def actor_pool(size: int, max_size: int | None, name: str) -> Any:
    """The `compute=` of a Ray Data actor pool: `size` actors, or, with `max_size`, a pool
    that starts at `size` and grows to `max_size` as the cluster adds resources (and lets
    idle actors go). `name`: the config section, for the error."""
    import ray.data

    if size < 1:
        raise ValueError(f"{name}.concurrency must be >= 1, got {size}")
    if max_size is None or max_size == size:
        return ray.data.ActorPoolStrategy(size=size)
    if max_size < size:
        raise ValueError(
            f"{name}.max_concurrency={max_size} is below {name}.concurrency={size}"
        )
    return ray.data.ActorPoolStrategy(min_size=size, max_size=max_size)
