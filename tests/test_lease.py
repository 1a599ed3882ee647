"""One driver per output directory: the lease refuses a second one, naming the first, and is
taken over from a driver that is gone; locally (O_EXCL) and on S3 (a conditional put)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO
from u2seg.lease import LEASE, Lease, LeaseHeld, hold


def test_a_second_driver_is_refused_naming_the_first(tmp_path: Path) -> None:
    first = Lease(str(tmp_path))
    first.acquire()
    try:
        with pytest.raises(LeaseHeld, match=rf"held by {socket.gethostname()} pid {os.getpid()}"):
            Lease(str(tmp_path)).acquire()
        assert json.loads((tmp_path / LEASE).read_text())["token"] == first.token
    finally:
        first.release()
    assert not (tmp_path / LEASE).exists()
    second = Lease(str(tmp_path))
    second.acquire()  # free again once released
    second.release()


def test_the_lease_is_re_entrant_within_a_process_and_covers_sub_folders(tmp_path: Path) -> None:
    with hold(str(tmp_path)) as outer:
        assert outer is not None
        with hold(str(tmp_path)) as again, hold(str(tmp_path / "self-train" / "round-1")) as sub:
            assert again is None and sub is None  # held already: nothing more is taken
        assert (tmp_path / LEASE).exists()
        assert not (tmp_path / "self-train").exists()
    assert not (tmp_path / LEASE).exists()


def test_the_heartbeat_refreshes_the_lease(tmp_path: Path) -> None:
    lease = Lease(str(tmp_path), heartbeat_s=0.05)
    lease.acquire()
    try:
        first = json.loads((tmp_path / LEASE).read_text())["heartbeat"]
        deadline = time.monotonic() + 10
        while json.loads((tmp_path / LEASE).read_text())["heartbeat"] == first:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.02)
    finally:
        lease.release()


def test_the_lease_of_a_killed_driver_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = (
        "import sys, time; from u2seg.lease import Lease; "
        "Lease(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    with pytest.raises(LeaseHeld, match=f"pid {proc.pid}"):
        Lease(str(tmp_path)).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    lease = Lease(str(tmp_path))
    lease.acquire()
    try:
        assert lease.took_over is not None and lease.took_over["pid"] == proc.pid
        assert f"process {proc.pid} no longer runs" in capsys.readouterr().err
    finally:
        lease.release()


def test_a_lease_without_heartbeat_is_stale(tmp_path: Path) -> None:
    # A driver on another node whose heartbeat stopped 5 minutes ago (its node was lost).
    record = {"token": "x", "host": "node-elsewhere", "pid": 1, "command": "u2seg run",
              "since": time.time() - 3600, "heartbeat": time.time() - 300}  # fmt: skip
    (tmp_path / LEASE).write_text(json.dumps(record))
    lease = Lease(str(tmp_path))
    lease.acquire()
    try:
        assert lease.took_over is not None and "no heartbeat for 300 s" in lease.took_over["reason"]
    finally:
        lease.release()
    # A fresh heartbeat on another node is a live driver.
    (tmp_path / LEASE).write_text(json.dumps({**record, "heartbeat": time.time()}))
    with pytest.raises(LeaseHeld, match="held by node-elsewhere pid 1"):
        Lease(str(tmp_path)).acquire()


@pytest.mark.slow
def test_on_s3_the_lease_is_a_conditional_put(s3: Any) -> None:
    first = Lease("s3://u2seg/runs/x")
    first.acquire()
    try:
        with pytest.raises(LeaseHeld, match="held by"):
            Lease("s3://u2seg/runs/x").acquire()
        assert json.loads(s3.cat(f"u2seg/runs/x/{LEASE}"))["token"] == first.token
    finally:
        first.release()
    assert not s3.exists(f"u2seg/runs/x/{LEASE}")
