"""The terminal filter for Ray's native noise, actor pool sizes from config, and the local
Ray a run starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import stop_session
from u2seg.config import ConfigError, load_config
from u2seg.runtime import actor_pool, drop_noise, quiet_ray_stderr

NOISE = (
    b"[2026-12-01 22:36:32,641 E 12723 12723] core_worker.cc:2465: Actor with class name: "
    b"'MapWorker(MapBatches(SquareImages)->MapBatches(FeatureExtractor))' and ID: '43cc' has "
    b"constructor arguments in the object store and max_restarts > 0. If the arguments in "
    b"the object store go out of scope or are lost, the actor restart will fail.\n"
)
REAL = b"[2026-12-01 22:36:40,002 E 12723 12740] core_worker.cc:901: The raylet died.\n"
BAR = b"\rfeatures:  50%|#####     | 4/8 [00:05<00:05, 0.80row/s]"


def _filtered(stream: bytes, chunk: int) -> bytes:
    out, held = b"", b""
    for start in range(0, len(stream), chunk):
        now, held = drop_noise(held + stream[start : start + chunk])
        out += now
    return out + held


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_noise_is_dropped_whatever_the_chunks(chunk: int) -> None:
    stream = b"features:   0%|" + BAR + NOISE + b"[features] 11.1s  images=8\n" + REAL + BAR
    expected = b"features:   0%|" + BAR + b"[features] 11.1s  images=8\n" + REAL + BAR
    assert _filtered(stream, chunk) == expected


def test_a_progress_bar_passes_at_once() -> None:
    now, held = drop_noise(BAR)
    assert (now, held) == (BAR, b"")


def test_stderr_of_the_process_is_filtered(capfd: pytest.CaptureFixture[str]) -> None:
    with quiet_ray_stderr():
        os.write(2, NOISE)  # as Ray's native code writes: straight to file descriptor 2
        os.write(2, b"kept line\n")
        os.write(2, REAL)
    assert capfd.readouterr().err == (b"kept line\n" + REAL).decode()
    os.write(2, NOISE)  # after the block nothing is filtered
    assert capfd.readouterr().err == NOISE.decode()


def test_actor_pools_fixed_or_growing() -> None:
    fixed = actor_pool(3, None)
    assert (fixed.min_size, fixed.max_size) == (3, 3)
    growing = actor_pool(1, 8)
    assert (growing.min_size, growing.max_size) == (1, 8)
    with pytest.raises(ConfigError, match="maskcut.max_concurrency=2: below maskcut.concurrency=4"):
        load_config(None, ["maskcut.concurrency=4", "maskcut.max_concurrency=2"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_without_an_address_starts_its_own_ray_beside_a_local_head() -> None:
    """`ray start --head` on this machine (what docs/cluster.md has users do)
    does not stop a run with no `ray.address`: it gets a Ray of its own (2 CPUs here,
    where the head has 1) instead of joining the head and failing on `num_cpus`."""
    ray = str(Path(sys.executable).with_name("ray"))
    # A short temp root of this test's own: the head's "current cluster" file, which a
    # bare ray.init() looks for, and Ray's socket paths (length-limited) live there.
    root = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": root, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    script = (
        "import ray\n"
        "from u2seg.config import load_config\n"
        "from u2seg.runtime import ray_session\n"
        "with ray_session(load_config(overrides=['ray.num_cpus=2']).ray):\n"
        "    print('cpus', ray.cluster_resources()['CPU'])\n"
    )
    try:
        deadline = time.monotonic() + 120
        while not Path(root, "ray", "ray_current_cluster").exists():
            assert head.poll() is None and time.monotonic() < deadline, "the head did not start"
            time.sleep(0.5)
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        assert "cpus 2.0" in run.stdout
    finally:
        # The head's whole session, at once (on SIGTERM `ray start --block` waits 30 s for
        # its processes).
        stop_session(head.pid)
        head.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)
