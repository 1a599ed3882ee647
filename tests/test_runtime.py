"""The terminal filter for Ray's native noise, and actor pool sizes from config."""

from __future__ import annotations

import os

import pytest

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
