"""Write u2seg's KubeRay manifests (ray.io/v1) from one description.

    python cluster/render.py            # rewrites cluster/*.yaml
    python cluster/render.py --check    # exits 1 if a committed manifest differs

One RayCluster for interactive use and `ray job submit`, and two RayJobs that bring up
the same cluster for one job and take it down afterwards: the pseudo-label pipeline
(`ray_jobs/run.py --until panoptic`) and training (`ray_jobs/train.py`). All three share
the pod templates below, so the image, the worker groups and the storage cannot drift
apart; `tests/test_cluster.py` validates the files against KubeRay's CRD schemas.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RAY_VERSION = "2.60.0"  # the pin in pyproject.toml
IMAGE = "ghcr.io/u2seg/u2seg:0.1.0"  # built from cluster/Dockerfile
SHARED_CLAIM = "u2seg-shared"  # a ReadWriteMany volume: runs and data under /data
CONFIG = "configs/coco.yaml"
OUTPUT = "/data/runs/coco"
SOURCE = "/data/coco/train2017"
WEIGHTS = "/data/weights/dino_resnet50_pretrain.pth"  # the DINO ResNet-50 training starts from
MANIFESTS = (
    "shared-storage.yaml", "raycluster.yaml", "rayjob-labels.yaml", "rayjob-train.yaml",
    "rayjob-self-train.yaml",
)  # fmt: skip


def _container(name: str, cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {
        "name": name,
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"limits": limits, "requests": dict(limits)},
        "env": [{"name": "TORCH_EXTENSIONS_DIR", "value": "/data/.cache/torch_extensions"}],
        "volumeMounts": [
            {"name": "shared", "mountPath": "/data"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }


def _pod(container: dict[str, Any], shm: str, gpu: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_CLAIM}},
            # Ray's object store and the data loaders live in /dev/shm: the container
            # default of 64 MiB is far too small.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        ],
    }
    if gpu:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {"spec": spec}


def cluster_spec() -> dict[str, Any]:
    """The RayCluster spec: a head that schedules nothing (num-cpus 0), a CPU group for
    decoding and evaluation and a GPU group that scales from 0, under Ray's autoscaler v2."""
    head = _container("ray-head", "4", "16Gi")
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 300,
            "resources": {
                "limits": {"cpu": "500m", "memory": "1Gi"},
                "requests": {"cpu": "500m", "memory": "1Gi"},
            },
        },
        "headGroupSpec": {
            "serviceType": "ClusterIP",  # the dashboard stays inside: kubectl port-forward
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(head, "8Gi"),
        },
        "workerGroupSpecs": [
            {
                "groupName": "cpu",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": 8,
                "rayStartParams": {},
                "template": _pod(_container("ray-worker", "16", "64Gi"), "16Gi"),
            },
            {
                "groupName": "gpu",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": 16,
                "rayStartParams": {},
                "template": _pod(_container("ray-worker", "8", "64Gi", gpus=1), "16Gi", True),
            },
        ],
    }


def _job(name: str, entrypoint: str, deadline_hours: int) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "u2seg"}},
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "activeDeadlineSeconds": deadline_hours * 3600,
            # A retried job resumes: every stage keeps its shards and training its
            # checkpoints on the shared volume.
            "backoffLimit": 2,
            "rayClusterSpec": cluster_spec(),
        },
    }


def manifests() -> dict[str, dict[str, Any]]:
    args = f"--config {CONFIG} output={OUTPUT} data.source={SOURCE}"
    return {
        "shared-storage.yaml": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": SHARED_CLAIM},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "2Ti"}},
            },
        },
        "raycluster.yaml": {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {"name": "u2seg", "labels": {"app.kubernetes.io/name": "u2seg"}},
            "spec": cluster_spec(),
        },
        "rayjob-labels.yaml": _job(
            "u2seg-labels", f"python ray_jobs/run.py --until panoptic {args}", 72
        ),
        "rayjob-train.yaml": _job(
            "u2seg-train", f"python ray_jobs/train.py {args} train.weights={WEIGHTS}", 240
        ),
        "rayjob-self-train.yaml": _job(
            "u2seg-self-train", f"python ray_jobs/self_train.py {args}", 240
        ),
    }


def render(name: str, manifest: dict[str, Any]) -> str:
    head = f"# Written by cluster/render.py (edit it, not this file): {name}\n"
    return head + yaml.safe_dump(manifest, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name, manifest in manifests().items():
        text = render(name, manifest)
        path = HERE / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)} (run python cluster/render.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
