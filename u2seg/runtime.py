"""Where work runs: the compute device, the Ray session and its actor pools, and a quiet
terminal (torch and Ray are imported on use, so the `u2seg` command starts fast)."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from u2seg.config import RayConfig

if TYPE_CHECKING:
    import torch


class NoGpu(RuntimeError):
    """Work that was asked to run on GPUs cannot have one: never a silent CPU fallback."""


def cuda_problem() -> str:
    """Why torch cannot use CUDA here, in words: torch's own reason (an old driver, no
    device, a CPU build) with the torch and CUDA versions and the visible devices."""
    import torch

    try:
        torch.cuda.init()
        reason = f"{torch.cuda.device_count()} CUDA devices"
    except Exception as exc:  # torch's message names the cause (driver too old, no device)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (
        f"{reason} (torch {torch.__version__} built for CUDA {torch.version.cuda or 'none'}; "
        f"CUDA_VISIBLE_DEVICES={visible!r})"
    )


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else is passed to torch. A CUDA
    device that torch cannot use raises `NoGpu` with the reason, instead of failing later
    (or running on the CPU) with the GPU held."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NoGpu(f"device {name!r} asked for, but torch cannot use CUDA: {cuda_problem()}")
    return device


# Watches the driver that started a local Ray and, once the driver is gone (killed, say),
# kills the processes it had started. Ray's raylet and GCS die with the driver, but the
# agents the raylet starts (dashboard agent, runtime-env agent) outlive a SIGKILLed one.
_WATCHDOG = """
import os, sys, time
import psutil
driver, me, seen = psutil.Process(int(sys.argv[1])), os.getpid(), {}
while True:
    try:
        if driver.status() == psutil.STATUS_ZOMBIE:
            break
        seen.update((p.pid, p) for p in driver.children(recursive=True) if p.pid != me)
    except psutil.NoSuchProcess:
        break
    time.sleep(0.5)
for process in seen.values():
    try:
        if process.is_running():
            process.kill()
    except psutil.Error:
        pass
"""


def _start_watchdog() -> subprocess.Popen[bytes]:
    """A process that kills this driver's Ray processes if the driver dies without
    shutting Ray down (stopped when the session ends normally)."""
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _drop_token_banner(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray")


def local_ray_address(cfg: RayConfig) -> str | None:
    """The Ray to join (`cfg.address` or RAY_ADDRESS), or None for a local one. For a local
    Ray, makes it bind to 127.0.0.1: without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray uses
    the machine's external address, and Ray reads it once, when first imported, so the
    command calls this before any stage imports Ray."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return address


_LOCAL_RAY: list[bool] = []  # True while a local Ray that `ray_session` started is up


def local_ray_running() -> bool:
    """Whether the running Ray is a local one `ray_session` started (no autoscaler: it has
    the machine's resources and no more)."""
    return bool(_LOCAL_RAY)


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Use the running Ray, join the one in `cfg.address` / RAY_ADDRESS, or start a local one.

    A local Ray binds to 127.0.0.1 and is shut down on exit; a joined one is left running.
    """
    address = local_ray_address(cfg)
    import ray
    import ray.data

    started = False
    watchdog: subprocess.Popen[bytes] | None = None
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            # Ray turns token auth on for a new local cluster and says so on every start; the
            # cluster is this process's own, on 127.0.0.1, so the banner is dropped (token
            # auth stays on).
            logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
                _drop_token_banner
            )
            ray.init(
                # "local": a cluster of this process's own even when `ray start` left one
                # on this machine (which a bare init would join, refusing num_cpus).
                address="local",
                num_cpus=cfg.num_cpus,
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            watchdog = _start_watchdog()
            _LOCAL_RAY.append(True)
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    if not cfg.progress_bars:
        # The stage draws its own progress bar; Ray Data's per-dataset INFO lines, and its
        # warning that its own bars are off, are noise.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Results in input order: the evaluation merges its chunks in that order. The per-image
    # stages take theirs as they complete instead (`_image_loop.drain`).
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()
        if watchdog is not None:
            _LOCAL_RAY.clear()
            watchdog.terminate()
            watchdog.wait()


def cluster_has_gpus() -> bool:
    import ray

    return bool(ray.cluster_resources().get("GPU", 0) > 0)


def gpus_asked(key: str, asked: float | bool | None, count: float, wait_s: float) -> bool:
    """Whether work runs on GPUs, from the setting `key` = `asked`: None -> when the cluster
    has GPUs now; true or > 0 -> yes, once the cluster has `count` of them
    (`wait_for_gpus`, which fails naming `key`); false or 0 -> no."""
    if asked is None:
        return cluster_has_gpus()
    if asked:
        shown, off = ("true", "false") if isinstance(asked, bool) else (f"{asked:g}", "0")
        wait_for_gpus(count, wait_s, f"{key}={shown}", f"{key}={off}")
        return True
    return False


def gpus_per_actor(key: str, asked: float | None, wait_s: float) -> float:
    """An actor pool's GPUs per actor from its setting `key` = `asked` (`gpus_asked`): as
    asked, once the cluster has that many; None -> 1 when the cluster has GPUs now, else 0."""
    on_gpu = gpus_asked(key, asked, asked or 1.0, wait_s)
    return asked if asked is not None else float(on_gpu)


def wait_for_gpus(count: float, wait_s: float, asked_by: str, on_cpu: str) -> None:
    """Return once the Ray cluster has `count` GPUs, asking its autoscaler for them
    (a GPU group that scales from 0 has none when a job starts); `NoGpu` naming `asked_by`
    (the setting that wants them) and `on_cpu` (the one that would run without) after
    `wait_s` seconds without."""
    import ray
    from ray.autoscaler.sdk import request_resources

    def have() -> float:
        return float(ray.cluster_resources().get("GPU", 0))

    if have() >= count:
        return
    deadline = time.monotonic() + wait_s
    request_resources(bundles=[{"GPU": 1}] * max(1, math.ceil(count)))
    try:
        while have() < count:
            if time.monotonic() >= deadline:
                held = ray.cluster_resources()
                resources = (
                    f"CPU {held.get('CPU', 0):g}, memory {held.get('memory', 0) / 2**30:.1f} GiB"
                )
                raise NoGpu(
                    f"{asked_by} asks for {count:g} GPU(s), but the Ray cluster had {have():g} "
                    f"after ray.gpu_wait_s={wait_s:g} s ({resources}). "
                    "No GPU node joined: on KubeRay check the GPU worker group's maxReplicas, "
                    "the NVIDIA device plugin and the GPU node pool's quota; to run on CPUs "
                    f"instead, set {on_cpu}"
                )
            time.sleep(min(2.0, max(0.1, wait_s / 10)))
    finally:
        request_resources(bundles=[])  # the work's own demand keeps the nodes from here on


def actor_pool(size: int, max_size: int | None) -> Any:
    """The `compute=` of a Ray Data actor pool: `size` actors, or, with `max_size`, a pool
    that starts at `size` and grows to `max_size` as the cluster adds resources (and lets
    idle actors go). The config checks both (`max_concurrency >= concurrency >= 1`)."""
    import ray.data

    if max_size is None or max_size == size:
        return ray.data.ActorPoolStrategy(size=size)
    return ray.data.ActorPoolStrategy(min_size=size, max_size=max_size)


# Ray's native (C++) log lines, "[2026-01-01 12:00:00,000 E 123 123] file.cc:42: ...".
_NATIVE_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z] \d+ \d+\] ")
_PARTIAL_PREFIX = re.compile(rb"\[[\d\- :,A-Z]*\]?$")
# Native lines known to be harmless here, dropped from the terminal (Ray's session logs
# keep them). Ray Data always puts an actor pool's constructor arguments in the object
# store and keeps them alive while the pool runs, so this error line on every actor
# start is spurious (ray-project/ray#53727).
RAY_NOISE = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments "
               rb"in the object store and max_restarts > 0"),
)  # fmt: skip


def drop_noise(buffer: bytes) -> tuple[bytes, bytes]:
    """Split stderr bytes into (what to write now, what to hold until more arrives): native
    log lines matching `RAY_NOISE` are removed; everything else passes unchanged, a native
    line only once its newline has arrived."""
    out = bytearray()
    pos = 0
    while (match := _NATIVE_LINE.search(buffer, pos)) is not None:
        end = buffer.find(b"\n", match.start())
        out += buffer[pos : match.start()]
        if end < 0:
            return bytes(out), buffer[match.start() :]
        line = buffer[match.start() : end + 1]
        if not any(p.search(line) for p in RAY_NOISE):
            out += line
        pos = end + 1
    tail = buffer[pos:]
    partial = _PARTIAL_PREFIX.search(tail[-64:])
    if partial is not None:  # maybe the first bytes of a native line: wait for the rest
        cut = len(tail) - len(tail[-64:]) + partial.start()
        return bytes(out + tail[:cut]), tail[cut:]
    return bytes(out + tail), b""


def _forward(read_fd: int, out_fd: int) -> None:
    """Copy the pipe to `out_fd` through `drop_noise` until every writer has closed it."""
    held = b""
    while chunk := os.read(read_fd, 1 << 16):
        now, held = drop_noise(held + chunk)
        while now:
            now = now[os.write(out_fd, now) :]
    while held:
        held = held[os.write(out_fd, held) :]
    os.close(read_fd)
    os.close(out_fd)


@contextmanager
def quiet_ray_stderr() -> Iterator[None]:
    """Drop the `RAY_NOISE` lines from this process's stderr (file descriptor 2, where Ray's
    native code writes) while the block runs; everything else, progress bars included,
    passes through as it comes. For the `u2seg` command, not for library use."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    read_fd, write_fd = os.pipe()
    sys.stderr.flush()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    forwarder = threading.Thread(target=_forward, args=(read_fd, saved), daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes this process's write end of the pipe; `saved` stays open
        # Processes started inside the block may still hold the pipe: the forwarder then
        # keeps copying; otherwise it has drained the pipe and ends.
        forwarder.join(timeout=2.0)
