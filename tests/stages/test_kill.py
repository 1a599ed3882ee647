"""A live stage killed (its driver, or one of its actors) loses at most the shards in flight:
the resumed or surviving run writes the clean run's files byte for byte, and a killed driver
leaves no Ray process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import DEMO_CONFIG, REPO
from u2seg.cli import main
from u2seg.data.demo import write_demo_dataset
from u2seg.lease import LEASE

SHARDS = 16  # 32 photos, 2 per shard


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 8 demo photos, 4 copies each under other names."""
    demo = write_demo_dataset(tmp_path_factory.mktemp("demo"))
    folder = tmp_path_factory.mktemp("photos")
    for copy in range(4):
        for photo in sorted(demo.root.glob("*.jpg")):
            shutil.copyfile(photo, folder / f"{copy}_{photo.name}")
    return folder


def _command(photos: Path, out: Path, cache: Path) -> list[str]:
    return [
        sys.executable, "-m", "u2seg.cli", "maskcut", "--config", str(DEMO_CONFIG),
        f"data.source={photos}", f"output={out}", "data.shard_size=2", "maskcut.batch_size=2",
        "maskcut.image_size=224", "maskcut.n_masks=10", f"backbone.cache_dir={cache}",
    ]  # fmt: skip


def _start(photos: Path, out: Path, cache: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        _command(photos, out, cache), cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def _shards(out: Path) -> list[Path]:
    return sorted((out / "maskcut").glob("part-*.parquet"))


def _wait_for_shards(proc: subprocess.Popen[bytes], out: Path, count: int) -> None:
    deadline = time.monotonic() + 240
    while len(_shards(out)) < count:
        assert proc.poll() is None, f"the stage ended early: {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no shard reached disk while the stage ran"
        time.sleep(0.05)


def _files(out: Path) -> dict[str, bytes]:
    names = [p.name for p in _shards(out)] + ["instances.json"]
    return {n: (out / "maskcut" / n).read_bytes() for n in names}


@pytest.fixture(scope="module")
def clean(photos: Path, weights_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("clean")
    proc = _start(photos, out, weights_cache)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    files = _files(out)
    assert len(files) == SHARDS + 1
    return files


@pytest.mark.slow
@pytest.mark.ray
def test_sigkill_of_the_driver_keeps_written_shards_and_resumes_to_the_clean_result(
    photos: Path, clean: dict[str, bytes], tmp_path: Path, weights_cache: Path
) -> None:
    out = tmp_path / "run"
    proc = _start(photos, out, weights_cache)
    _wait_for_shards(proc, out, 3)
    ray_processes = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    survived = _shards(out)
    # Shards reached disk while the stage ran, and the kill came before the end.
    assert 3 <= len(survived) < SHARDS
    # The local Ray the driver started does not outlive it.
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not alive, f"left running: {[p.cmdline()[:2] for p in alive]}"
    written = {p.name: p.read_bytes() for p in survived}
    for name, data in written.items():
        assert data == clean[name]  # a shard on disk is whole, never half written

    resumed = _start(photos, out, weights_cache)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    # The killed driver's lease is taken over, and the new driver says so.
    said = resumed.stderr.read().decode()  # type: ignore[union-attr]
    assert f"took over {out}/{LEASE} from" in said and f"process {proc.pid} no longer runs" in said
    assert _files(out) == clean
    for name, data in written.items():  # the survivors were reused, not redone
        assert (out / "maskcut" / name).read_bytes() == data


@pytest.mark.slow
@pytest.mark.ray
def test_sigkill_of_one_actor_is_survived_with_the_clean_result(
    photos: Path, clean: dict[str, bytes], tmp_path: Path, weights_cache: Path
) -> None:
    out = tmp_path / "run"
    proc = _start(photos, out, weights_cache)
    _wait_for_shards(proc, out, 2)
    actors = [
        p for p in psutil.Process(proc.pid).children(recursive=True)
        if any("MapWorker" in part for part in p.cmdline())
    ]  # fmt: skip
    assert actors, "no actor process found"
    actors[0].send_signal(signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    assert _files(out) == clean


@pytest.mark.slow
@pytest.mark.ray
def test_a_second_driver_on_a_busy_output_is_refused_while_the_first_completes(
    photos: Path, tmp_path: Path, weights_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    settings = [
        "--config", str(DEMO_CONFIG), f"data.source={photos}", f"output={out}",
        "data.shard_size=2", "features.image_size=112", f"backbone.cache_dir={weights_cache}",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    first = subprocess.Popen(
        [sys.executable, "-m", "u2seg.cli", "features", *settings], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / LEASE).exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first never started"
        time.sleep(0.05)
    # A resubmitted job on the same output: refused, naming the driver that holds it.
    assert main(["features", *settings]) == 2
    said = capsys.readouterr().err
    assert "another driver is writing this output" in said and f"pid {first.pid}" in said
    assert first.poll() is None  # refused while the first still ran
    assert first.wait(timeout=600) == 0, first.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    manifest = json.loads((out / "features" / "manifest.json").read_text())
    assert manifest["counts"]["ok"] == manifest["counts"]["images"] == 2 * SHARDS
    assert manifest["counts"]["resumed_shards"] == 0
    assert not (out / LEASE).exists()  # released at the end
