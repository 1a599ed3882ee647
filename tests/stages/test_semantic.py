"""The semantic stage's STEGO token cache streams to disk instead of the driver's memory."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from u2seg.stages import semantic
from u2seg.stages.semantic import write_rows


def _batches(sizes: list[int]) -> Iterator[np.ndarray]:
    for k, n in enumerate(sizes):  # 12 KB a row, each row its own values
        batch = np.full((n, 8, 8, 96), k, dtype=np.float16)
        batch[:, 0, 0, 0] = np.arange(n)
        yield batch


@pytest.mark.parametrize("sizes", [[16] * 40, [16, 0, 9, *[16] * 30, 3]], ids=["all", "fewer"])
def test_token_grids_stream_into_the_cache_file(
    tmp_path: Path, sizes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(semantic, "COPY_BYTES", 200_000)  # the 64 MB slices, scaled down
    path = tmp_path / "tokens.npy"
    expected = np.concatenate(list(_batches(sizes)))
    tracemalloc.start()
    count = write_rows(_batches(sizes), 640, path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == sum(sizes)
    cached = np.load(path, mmap_mode="r")
    assert cached.shape == expected.shape and cached.dtype == np.float16
    np.testing.assert_array_equal(cached, expected)
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.npy"]  # no partial file left
    # Held at once: about one batch (200 KB) and a slice, never the 7.9 MB of all rows.
    assert peak < 0.2 * expected.nbytes, f"{peak / 1e3:.0f} KB held"


def test_no_readable_rows_write_nothing(tmp_path: Path) -> None:
    assert write_rows(iter([]), 4, tmp_path / "tokens.npy") == 0
    assert not list(tmp_path.iterdir())
