"""Run by tests/test_autoscaling.py in a process of its own (Ray's AutoscalingCluster
calls `ray stop --force`, which stops every Ray on the machine): a labelling stage on a
cluster that starts with no worker node, under Ray's autoscaler on its fake multi-node
provider. Writes <out>/seen.json: worker nodes seen before, during and after the stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray

from tests.helpers import demo_config, save_photo
from u2seg.stages import features

# Ray's autoscaler on its fake multi-node provider: worker "nodes" are extra raylets on
# this machine. Nodes with one (logical) GPU stand in for a GPU worker group from 0.
AUTOSCALING = {
    "cluster_name": "u2seg-autoscaling-test",
    "max_workers": 2,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "gpu": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {},
                "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default",
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
}  # fmt: skip


def _start() -> None:
    """`ray start --head` with the autoscaler on the fake provider (what Ray's own
    AutoscalingCluster does; its template file is not in the wheel)."""
    subprocess.check_call(["ray", "stop", "--force"])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(AUTOSCALING, fh)
    env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
    subprocess.check_call(
        ["ray", "start", "--head", f"--autoscaling-config={fh.name}", "--num-cpus=0",
         "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
        env=env,
    )  # fmt: skip


def _workers() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


def main(out: Path, cache: Path) -> None:
    _start()
    try:
        ray.init("auto")
        photos = out / "photos"
        photos.mkdir(parents=True)
        for k in range(12):
            save_photo(photos / f"p{k:02d}.jpg", (96, 80), seed=k)
        seen = {"before": _workers(), "most": 0}
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.5):
                seen["most"] = max(seen["most"], _workers())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        cfg = demo_config(
            photos, out / "run", cache, "features.image_size=112", "features.batch_size=2",
            "features.num_gpus=1", "features.num_cpus=0.5", "features.concurrency=1",
            "features.max_concurrency=2", "data.read_num_cpus=0.25",
        )  # fmt: skip
        manifest = features.run(cfg)
        done.set()
        watcher.join()
        deadline = time.monotonic() + 180
        while _workers() and time.monotonic() < deadline:
            time.sleep(1)
        seen["after"] = _workers()
        seen["ok"] = manifest["counts"]["ok"]
        (out / "seen.json").write_text(json.dumps(seen))
    finally:
        ray.shutdown()
        subprocess.check_call(["ray", "stop", "--force"])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
