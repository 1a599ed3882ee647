"""Shared fixtures: a local Ray, the converted demo weights."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="session")
def weights_cache() -> Path:
    """One on-disk cache of the converted packaged weights for the whole test session."""
    path = REPO / ".cache" / "weights"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A 2-CPU Ray bound to 127.0.0.1, started once per module."""
    import ray

    from u2seg.config import RayConfig
    from u2seg.runtime import ray_session

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    with ray_session(RayConfig(num_cpus=2)):
        assert ray.is_initialized()
        yield
