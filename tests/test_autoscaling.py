"""A labelling stage under Ray's autoscaler v2 (KubeRay's; fake multi-node provider): it
starts with no worker node, the stage asks for the GPUs its config names, the autoscaler
adds a node for each of its two GPU actors, the stage completes, and the nodes are
released after the idle timeout. The cluster runs in a subprocess of its own, on its own
ports, and only its processes are stopped: other Rays on the machine keep running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_a_stage_grows_the_cluster_from_zero_and_lets_it_go(
    tmp_path: Path, weights_cache: Path, local_ray: None
) -> None:
    import ray

    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.autoscale_run", str(tmp_path), str(weights_cache)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    # The plan reads the autoscaler's node groups: the pool is one GPU actor per GPU the
    # GPU group can grow to, and an actor no group can hold was refused.
    assert seen["plan"] == {"groups_known": True, "gpus": 2.0, "concurrency": 2, "num_gpus": 1.0}
    assert seen["before"] == 0  # no worker node when the stage started
    assert seen["most"] == 2  # the autoscaler added a node for each of the 2 GPU actors
    assert seen["ok"] == 12  # every image went through
    assert seen["after"] == 0  # and the idle nodes were released
    assert "stopped" in done.stderr
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2  # ours still runs
