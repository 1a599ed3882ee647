"""Run by tests/test_autoscaling.py in a process of its own: a labelling stage on a cluster
that starts with no worker node, under Ray's autoscaler v2 (the one KubeRay runs,
`autoscalerOptions.version: v2`) on its fake multi-node provider. The cluster has its own
ports and temporary folder, and only its own processes are stopped at the end (never
`ray stop`, which stops every Ray on the machine). Writes <out>/seen.json: worker nodes
seen before, during and after the stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import ray
from ray.cluster_utils import FAKE_HEAD_NODE_ID

from tests.helpers import demo_config, free_ports, save_photo, stop_session
from u2seg.plan import PlanError, find_cluster, size
from u2seg.stages import features


@contextmanager
def refused_at_once() -> Iterator[None]:
    """No group's node has 3 CPUs: the stage is refused at once, no node is asked for."""
    try:
        yield
    except PlanError as exc:
        assert "lower features.num_cpus" in str(exc), exc
    else:
        raise AssertionError("an actor no node group can hold was not refused")


def _config(gcs: str) -> dict[str, object]:
    """Ray's autoscaler config on the fake provider, as `AutoscalingCluster(autoscaler_v2=
    True)` writes it (that class runs `ray stop --force` first): worker "nodes" are extra
    raylets on this machine; nodes with one (logical) GPU stand in for a GPU worker group
    that scales from 0 to 2."""
    return {
        "cluster_name": "u2seg-autoscaling-test",
        "max_workers": 2,
        # Ray's fake provider class, named as an "external" provider: its "fake_multinode"
        # type makes autoscaler v2 read a defaults file that Ray's wheel does not ship.
        "provider": {"type": "external", "use_node_id_as_ip": True,
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider."
                               "FakeMultiNodeProvider",
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID,
                     "gcs_address": gcs},
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
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }  # fmt: skip


def _start(temp_dir: str) -> tuple[str, subprocess.Popen[bytes]]:
    """`ray start --head` with autoscaler v2 on the fake provider, on free ports and its own
    temporary folder, started in a session of its own; the GCS address and the process."""
    gcs_port, client, agent, agent_grpc, env_agent, metrics = free_ports(6)
    gcs = f"127.0.0.1:{gcs_port}"
    config = Path(temp_dir) / "autoscaling.json"
    config.write_text(json.dumps(_config(gcs)))
    env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
           "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
           "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}  # fmt: skip
    start = subprocess.Popen(
        ["ray", "start", "--head", f"--autoscaling-config={config}", "--num-cpus=0",
         f"--port={gcs_port}", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
         f"--metrics-export-port={metrics}", "--include-dashboard=false",
         "--disable-usage-stats"],
        env=env, start_new_session=True,
    )  # fmt: skip
    return gcs, start


def _workers() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


def main(out: Path, cache: Path) -> None:
    temp_dir = tempfile.mkdtemp(prefix="u2as-", dir="/tmp")  # short: Ray's socket paths
    gcs, start = _start(temp_dir)
    try:
        if start.wait(timeout=300):
            raise RuntimeError(f"ray start failed with {start.returncode}")
        ray.init(gcs)
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
        # The pool is left unset: sized from the autoscaler's GPU group (2 nodes of 1 GPU),
        # one GPU per actor (the stage asks the autoscaler for it and waits), 2 actors. The
        # fake nodes' GPUs are only logical, so the actors compute on the CPU (on `auto`
        # they would refuse CUDA).
        cfg = demo_config(
            photos, out / "run", cache, "features.image_size=112", "features.batch_size=1",
            "features.num_cpus=0.5", "features.concurrency=null",
            "data.read_num_cpus=0.25", "ray.gpu_wait_s=120", "backbone.device=cpu",
        )  # fmt: skip
        # The groups as cluster/render.py describes a RayCluster's to every pod.
        os.environ["U2SEG_NODE_GROUPS"] = json.dumps(
            [{"name": "gpu", "cpus": 2, "gpus": 1, "memory_gib": 4, "max": 2}]
        )
        cluster = find_cluster(cfg)
        sized = size(cfg, cluster)
        seen["plan"] = {"groups_known": cluster.groups_known, "gpus": cluster.gpus,
                        "concurrency": sized.features.concurrency,
                        "num_gpus": sized.features.num_gpus}  # fmt: skip
        with refused_at_once():
            features.run(replace(cfg, features=replace(cfg.features, num_cpus=3.0)))
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
        print(f"stopped {stop_session(start.pid)} processes of this cluster", file=sys.stderr)
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
