"""Helpers shared by the tests: the demo config on a folder, tiny photos, bad files."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from u2seg.config import PipelineConfig, load_config

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def demo_config(folder: Path, out: Path, cache: Path, *extra: str) -> PipelineConfig:
    """configs/demo.yaml on the images of `folder`, writing to `out`, shards of 2 images."""
    return load_config(
        DEMO_CONFIG,
        [
            f"data.source={folder}",
            "data.shard_size=2",
            f"backbone.cache_dir={cache}",
            f"output={out}",
            *extra,
        ],
    )


def save_photo(path: Path, size: tuple[int, int], seed: int) -> None:
    """A smooth random RGB image of (width, height) `size`, JPEG or PNG by suffix."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(path)


def write_bad_files(folder: Path) -> dict[str, str]:
    """A truncated JPEG, a text file named .png, a zero-byte file and a 4-megapixel PNG (a
    small file: use max_pixels=1_000_000); returns file name -> expected reason prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    save_photo(folder / "whole.jpg", (64, 48), seed=99)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (2000, 2000)).save(folder / "big.png")
    return {
        "big.png": "too many pixels",
        "truncated.jpg": "truncated or corrupt image",
        "text.png": "not a readable image",
        "empty.jpg": "empty file",
    }


@contextmanager
def fault_when(
    fault: Callable[[], bool], timeout: float = 400, poll: float = 0.1
) -> Iterator[None]:
    """While the block runs, call `fault` every `poll` seconds in a thread until it returns
    True (it has caused its fault: killed a worker, removed a node) or `timeout` passes."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not fault():
            time.sleep(poll)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def stop_session(sid: int) -> int:
    """Kill every process of the session `sid` (a `ray start` run with
    `start_new_session=True`: its daemons keep the session wherever they are reparented and
    whatever names they take) and no other: `ray stop` would stop every Ray on the machine.
    How many."""

    def of_session(pid: int) -> bool:
        try:
            return pid != os.getpid() and os.getsid(pid) == sid
        except OSError:  # gone, or not ours to ask
            return False

    ours = [p for p in psutil.process_iter() if of_session(p.pid)]
    for process in ours:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(ours, timeout=30)
    return len(ours)


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now, for a Ray head's services: its defaults are
    fixed ports, which a second Ray on the machine may hold."""
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports
