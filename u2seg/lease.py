"""One driver per output directory: the lease.

Every stage, training, evaluation and the pictures hold `<output>/.u2seg-lease.json` while
they run. The file is created only if absent (`open(..., "xb")`: O_EXCL on a local or NFS
path, a conditional put, If-None-Match, on S3), names its holder (host, process, command,
since) and is refreshed by a heartbeat thread every `HEARTBEAT_S` seconds. A second driver on
the same output (a resubmitted job, a retried RayJob, a second terminal) is refused, naming
the holder and since when. A lease whose driver is gone (a process of this host that no
longer exists, or no heartbeat for `STALE_S` seconds) is taken over, and the new holder says
so. Within one process the lease is re-entrant: `u2seg run` holds it across its stages, and
directories under a held one (self-training's rounds) share it.
"""

from __future__ import annotations

import _thread
import functools
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

LEASE = ".u2seg-lease.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0

_held: dict[str, Lease] = {}
_lock = threading.Lock()
F = TypeVar("F", bound=Callable[..., Any])


class LeaseHeld(RuntimeError):
    """Another driver holds the output directory."""


def _key(output_dir: str) -> str:
    fs, path = url_to_fs(output_dir)
    if isinstance(fs, LocalFileSystem):
        path = os.path.realpath(path)
    return f"{fs.unstrip_protocol(path).rstrip('/')}/"


class Lease:
    """The lease of one output directory (see the module docstring)."""

    def __init__(
        self, output_dir: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S
    ) -> None:
        self.fs: fsspec.AbstractFileSystem
        self.fs, root = url_to_fs(output_dir)
        self.path = f"{root.rstrip('/')}/{LEASE}"
        local = isinstance(self.fs, LocalFileSystem)
        self.url = self.path if local else self.fs.unstrip_protocol(self.path)  # for people
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self.holder = {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": " ".join(sys.argv)[:300],
            "since": time.time(),
        }
        self.took_over: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({**self.holder, "heartbeat": time.time()}).encode()

    def read(self) -> dict[str, Any] | None:
        """The lease file's holder record, or None when there is none (or it is unreadable:
        a record being replaced)."""
        self.fs.invalidate_cache(self.path.rsplit("/", 1)[0])
        try:
            with self.fs.open(self.path, "rb") as fh:
                record: dict[str, Any] = json.loads(fh.read())
                return record
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def stale_reason(self, record: dict[str, Any]) -> str | None:
        """Why the driver of `record` is gone, or None while it looks alive."""
        if record.get("host") == socket.gethostname() and not _alive(int(record.get("pid", 0))):
            return f"its process {record.get('pid')} no longer runs"
        age = time.time() - float(record.get("heartbeat", 0))
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s (stale after {self.stale_s:.0f} s)"
        return None

    def acquire(self) -> None:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        for _ in range(3):
            try:
                with self.fs.open(self.path, "xb") as fh:
                    fh.write(self._record())
                break
            except FileExistsError:
                record = self.read()
                if record is None:
                    continue  # released or replaced meanwhile: try again
                reason = self.stale_reason(record)
                if reason is None:
                    raise LeaseHeld(_describe(self.url, record, self.stale_s)) from None
                self.fs.rm(self.path)
                self.took_over = {**record, "reason": reason}
        else:
            raise LeaseHeld(f"{self.url}: could not be taken")
        if self.took_over is not None:
            print(
                f"[lease] took over {self.url} from "
                f"{self.took_over['host']} pid {self.took_over['pid']}: "
                f"{self.took_over['reason']}",
                file=sys.stderr,
            )
        self._thread = threading.Thread(target=self._beat, name="u2seg-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            record = self.read()
            if record is not None and record.get("token") != self.token:
                print(
                    f"[lease] {self.url} was taken over by "
                    f"{record.get('host')} pid {record.get('pid')}: stopping this driver",
                    file=sys.stderr,
                )
                _thread.interrupt_main()
                return
            # Replaced whole (a new file renamed over it), so a reader never sees half of it.
            tmp = f"{self.path}.{self.token}.tmp"
            self.fs.pipe_file(tmp, self._record())
            self.fs.mv(tmp, self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        record = self.read()
        if record is not None and record.get("token") == self.token:
            self.fs.rm(self.path)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _describe(url: str, record: dict[str, Any], stale_s: float) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("since", 0))))
    beat = time.time() - float(record.get("heartbeat", 0))
    return (
        f"another driver is writing this output: {url} is held by {record.get('host')} "
        f"pid {record.get('pid')} since {since} (last heartbeat {beat:.0f} s ago; "
        f"command: {record.get('command')}). Wait for it, stop it, or use another output; "
        f"a driver that is gone is taken over after {stale_s:.0f} s without heartbeat"
    )


@contextmanager
def hold(output_dir: str, **kwargs: float) -> Iterator[Lease | None]:
    """Hold the lease of `output_dir` for the block (re-entrant within the process: a
    directory under one already held yields None)."""
    key = _key(output_dir)
    with _lock:
        if any(key.startswith(held) for held in _held):
            outer = True
        else:
            outer = False
            lease = Lease(output_dir, **kwargs)
            lease.acquire()
            _held[key] = lease
    if outer:
        yield None
        return
    try:
        yield lease
    finally:
        with _lock:
            del _held[key]
        lease.release()


def leased(run: F) -> F:
    """Decorator of a stage's `run(cfg, ...)`: it holds the lease of `cfg.output_dir`."""

    @functools.wraps(run)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        with hold(cfg.output_dir):
            return run(cfg, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
