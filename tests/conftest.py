"""Shared fixtures: a local Ray, the converted demo weights, a local S3 server."""

from __future__ import annotations

import os
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO

#: Module fixtures that run a stage or start a cluster (a minute or more): the tests that
#: use one stay in one test process (`make test` runs two, `--dist loadgroup`), the others
#: go to whichever process is free.
SHARED = {"run_dir", "ray_head", "clean", "trained", "local_checkpoint"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SHARED & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


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


@pytest.fixture
def s3() -> Iterator[Any]:
    """A moto S3 server on a free port with the bucket `u2seg`; the AWS_* variables point
    boto, s3fs and pyarrow (Ray Train's storage) at it, here and in Ray's workers."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # The server's buckets live in moto's process-wide state: start every test empty.
    reset = f"http://127.0.0.1:{port}/moto-api/reset"
    urllib.request.urlopen(urllib.request.Request(reset, method="POST"), timeout=30).close()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec
    import s3fs

    # fsspec keeps one S3 filesystem per set of arguments, made with the endpoint of its
    # time: one left from an earlier server would call a port nobody listens on.
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("u2seg")
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
