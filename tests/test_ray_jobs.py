"""`ray job submit` against a real local Ray head, as users drive a cluster."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, free_ports, stop_session

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head on 127.0.0.1 with its own auth token; yields (dashboard URL, env)."""
    env = dict(os.environ)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
    )
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, client, agent, agent_grpc, env_agent, metrics = free_ports(7)
    # A short temp root: the dashboard's modules listen on Unix sockets under it, and a
    # socket path longer than 107 bytes (pytest-xdist's worker folders add to tmp_path)
    # fails to bind ("Module MetricsHead failed to start").
    temp = tempfile.mkdtemp(prefix="u2rj-", dir="/tmp")
    start = subprocess.Popen(
        [RAY, "start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats",
         f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
         f"--temp-dir={temp}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    output, _ = start.communicate(timeout=120)
    try:
        assert start.returncode == 0, output.decode()[-3000:]
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        assert stop_session(start.pid) > 0  # this head's processes only, not every Ray here
        shutil.rmtree(temp, ignore_errors=True)


def test_demo_job_submitted_to_cluster(
    ray_head: tuple[str, dict[str, str]], tmp_path: Path, weights_cache: Path
) -> None:
    """The whole demo (`u2seg demo` through its launcher) as one job, on smaller images, 4
    training steps and a 2-step self-training round: every stage's artifact, the scores of
    every prediction set, the progress lines and the tables reach the submitter."""
    address, env = ray_head
    out = tmp_path / "demo"
    smaller = [
        "features.image_size=224", "maskcut.image_size=224", "embed.image_size=112",
        "semantic.image_size=112", "train.max_iter=4", "train.log_every=2",
        "train.checkpoint_every=2", "train.short_sides=[128]", "train.max_side=160",
        "predict.short_side=128", "predict.max_side=160", "self_train.max_iter=2",
        # one actor a stage: the small photos need no second, whose start costs a torch import
        "maskcut.concurrency=1", "embed.concurrency=1", "semantic.concurrency=1",
    ]  # fmt: skip
    job = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--",
         sys.executable, str(REPO / "ray_jobs" / "demo.py"), f"output={out}",
         f"backbone.cache_dir={weights_cache}", *smaller],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    printed = job.stdout
    assert job.returncode == 0, printed[-3000:] + job.stderr[-3000:]
    assert "succeeded" in printed + job.stderr
    assert "[train] step 4/4" in printed and "[features]" in printed and "[evaluate]" in printed
    assert "| predictions | PQ |" in printed
    features = json.loads((out / "features" / "manifest.json").read_text())
    assert features["counts"]["ok"] == features["counts"]["images"] >= 8
    assert features["config"]["backbone"]["weights"] == "packaged"
    assert (out / "data" / "annotations" / "instances.json").is_file()
    train = json.loads((out / "train" / "manifest.json").read_text())
    assert train["training"]["deepspeed"] and train["training"]["zero_stage"] == 2
    assert train["training"]["world_size"] == 2 and train["training"]["ranks_agree"]
    assert [e["step"] for e in train["curve"]] == [2, 4]
    rounds = json.loads((out / "self-train" / "manifest.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1] and rounds[0]["train"]["steps"] == 2
    assert rounds[0]["from"] == f"file://{out / 'train' / 'model.pt'}"
    assert (out / "visualize" / "predict" / "sheet.png").is_file()
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())["predictions"]
    assert set(metrics) == {"maskcut", "semantic", "panoptic", "predict", "self-train"}
    for name in ("panoptic", "predict", "self-train"):
        assert {"class_agnostic", "instance", "semantic", "panoptic"} <= set(metrics[name])
    assert metrics["maskcut"]["images"]["scored"] == 3  # the photos with ground truth


@pytest.mark.parametrize("job", sorted(p.stem for p in (REPO / "ray_jobs").glob("*.py")))
def test_every_job_launches_its_command(job: str) -> None:
    """Each launcher runs the `u2seg` subcommand of its name (its --help says so)."""
    shown = subprocess.run(
        [sys.executable, str(REPO / "ray_jobs" / f"{job}.py"), "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"usage: u2seg {job.replace('_', '-')} ")
