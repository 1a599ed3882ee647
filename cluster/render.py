"""Write u2seg's KubeRay manifests (ray.io/v1) from one description.

    python cluster/render.py                  # rewrites cluster/*.yaml (the defaults below)
    python cluster/render.py --check          # exits 1 if a committed manifest differs
    python cluster/render.py --out my-cluster --storage-class efs-sc \\
        --image ghcr.io/u2seg/u2seg@sha256:... --gpu-product NVIDIA-H100-80GB-HBM3 \\
        --priority-class research --kueue-queue gpu-queue
    python cluster/render.py --out my-cluster --s3 s3://bucket/u2seg   # no volume at all
    python cluster/render.py --out my-cluster --config my.yaml --set cluster.k=300 \
        --set train.max_iter=90000                # your config and overrides in every job

One RayCluster for interactive use and `ray job submit`, and five RayJobs that bring up
the same cluster for one job and take it down afterwards: the pseudo-label pipeline
(`ray_jobs/run.py --until panoptic`), training (`ray_jobs/train.py`), self-training
(`ray_jobs/self_train.py`), prediction (`ray_jobs/predict.py`) and evaluation
(`ray_jobs/evaluate.py`). Every job runs configs/coco.yaml (the COCO recipe, from the image),
or with `--config FILE` that file, which it carries in the ConfigMap `u2seg-config`
(configmap.yaml) mounted into the head pod, where the job's driver runs; each `--set
KEY=VALUE` is appended to every job's command line. Both are checked when rendering: an
unknown key or a wrong type is refused by name. The data root (`/data` on the volume, or the
`--s3` prefix) reaches the config as U2SEG_DATA: configs/coco.yaml finds COCO, the DINO
weights and its output under it, so no job downloads anything at run time. All share the
pod templates below, so the image, the worker groups, the storage and the security settings
cannot drift apart; `tests/test_cluster.py`
validates the files against KubeRay's CRD schemas and the core Kubernetes Pod schema.

Storage: a ReadWriteMany volume of `--storage-class` (the default cloud classes are
ReadWriteOnce: EBS, PD, Azure Disk), e.g. `efs-sc` (AWS EFS CSI driver), `standard-rwx`
(GKE Filestore CSI driver), `azurefile-csi` (AKS), `nfs-client` (NFS subdir provisioner);
or `--s3 URL`: runs, data and weights under that prefix, no volume, credentials from the
Secret `u2seg-s3` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optionally AWS_ENDPOINT_URL
for an S3-compatible store). Ray's token authentication is on: the token comes from the
Secret `--auth-secret` (key `auth_token`), which KubeRay puts into every Ray container.

Network: a NetworkPolicy lets into the Ray pods only the Ray pods themselves (GCS, object
transfer, workers; the job submitter carries their label), the KubeRay operator (it reads
job status from the dashboard port), Prometheus from `--monitoring-namespace` on the metrics
port, and, with `--job-api-namespace NS`, the job API (dashboard port 8265) from pods of NS.
`kubectl port-forward` reaches the dashboard through the kubelet, outside the policy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RAY_VERSION = "2.60.0"  # the pin in pyproject.toml
# The image cluster/Dockerfile builds. A tag can be pushed again with other contents; render
# with --image NAME@sha256:DIGEST (what `docker push` prints) for an immutable reference.
IMAGE = "ghcr.io/u2seg/u2seg:0.1.0"
SHARED_CLAIM = "u2seg-shared"  # the ReadWriteMany volume: runs, data and caches under /data
STORAGE_CLASS = "nfs-client"
S3_SECRET = "u2seg-s3"
AUTH_SECRET = "u2seg-ray-token"
CONFIG = "configs/coco.yaml"
USER = 1000  # the image's non-root user (cluster/Dockerfile)
METRICS_PORT = 8080  # Ray's metrics export port, scraped by the PodMonitor
DASHBOARD_PORT = 8265  # the dashboard and the job API
MONITORING_NAMESPACE = "monitoring"
REPO = HERE.parent
CONFIG_MAP = "u2seg-config"
CONFIG_DIR = "/etc/u2seg"  # where the head pod mounts the ConfigMap
MANIFESTS = (
    "shared-storage.yaml", "raycluster.yaml", "rayjob-labels.yaml", "rayjob-train.yaml",
    "rayjob-self-train.yaml", "rayjob-predict.yaml", "rayjob-evaluate.yaml",
    "podmonitor.yaml", "networkpolicy.yaml",
)  # fmt: skip
# The jobs: (name, entry point and its arguments, deadline in hours).
JOBS = (
    ("labels", "ray_jobs/run.py --until panoptic", 72),
    ("train", "ray_jobs/train.py", 240),
    ("self-train", "ray_jobs/self_train.py", 240),
    ("predict", "ray_jobs/predict.py", 24),
    ("evaluate", "ray_jobs/evaluate.py", 24),
)
# What every container of a pod must say to pass Pod Security "restricted" (the pod adds
# runAsNonRoot and the seccomp profile).
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
LABELS = {"app.kubernetes.io/name": "u2seg"}


@dataclass(frozen=True)
class Options:
    """What a deployment chooses; the defaults are the committed manifests."""

    image: str = IMAGE
    storage_class: str = STORAGE_CLASS
    s3: str | None = None  # s3://bucket/prefix: object storage instead of the shared volume
    auth_secret: str = AUTH_SECRET
    gpu_product: str | None = (
        None  # the nodes' nvidia.com/gpu.product label (GPU feature discovery)
    )
    priority_class: str | None = None
    kueue_queue: str | None = None
    prometheus: str | None = None  # the dashboard's metrics charts read these two
    grafana: str | None = None
    monitoring_namespace: str = MONITORING_NAMESPACE  # where Prometheus scrapes from
    job_api_namespace: str | None = None  # a namespace whose pods may submit jobs
    config: str | None = None  # the text of the user's config (ConfigMap), None: coco.yaml
    sets: tuple[str, ...] = ()  # KEY=VALUE overrides for every job

    @property
    def root(self) -> str:
        return self.s3.rstrip("/") if self.s3 else "/data"


# The worker groups: (name, CPUs, memory GiB, GPUs, most pods). The plan of every stage
# reads them from U2SEG_NODE_GROUPS: an actor no group can hold is refused at once.
GROUPS = (("cpu", 16, 64, 0, 8), ("gpu", 8, 64, 1, 16))


def _node_groups() -> str:
    return json.dumps(
        [
            {"name": n, "cpus": c, "gpus": g, "memory_gib": m, "max": most}
            for n, c, m, g, most in GROUPS
        ]  # fmt: skip
    )


def _env(options: Options) -> list[dict[str, Any]]:
    # Caches of compiled ops and downloaded weights: on the shared volume, so that each new
    # pod finds them; with S3, on the pod's local disk.
    cache = "/tmp/u2seg-cache" if options.s3 else "/data/.cache"
    env: list[dict[str, Any]] = [
        {"name": "U2SEG_DATA", "value": options.root},
        {"name": "U2SEG_NODE_GROUPS", "value": _node_groups()},
        {"name": "TORCH_EXTENSIONS_DIR", "value": f"{cache}/torch_extensions"},
        {"name": "TORCH_HOME", "value": f"{cache}/torch"},
        {"name": "HF_HOME", "value": f"{cache}/huggingface"},
    ]
    if options.s3:
        keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {
                "name": S3_SECRET, "key": key, "optional": key == "AWS_ENDPOINT_URL"}}}
            for key in keys
        ]  # fmt: skip
    return env


def _container(
    options: Options, name: str, cpu: str, memory: str, disk: str, gpus: int = 0
) -> dict[str, Any]:
    # Ray spills objects and writes its logs to the container's disk: ask for that space.
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory, "ephemeral-storage": disk}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if not options.s3:
        mounts.insert(0, {"name": "shared", "mountPath": "/data"})
    return {
        "name": name,
        "image": options.image,
        # A digest never changes: the node's copy is the image. A tag may be pushed again.
        "imagePullPolicy": "IfNotPresent" if "@sha256:" in options.image else "Always",
        "resources": {"limits": limits, "requests": dict(limits)},
        "env": _env(options),
        "ports": [{"containerPort": METRICS_PORT, "name": "metrics"}],
        "volumeMounts": mounts,
        "securityContext": dict(CONTAINER_SECURITY),
    }


def _pod(options: Options, container: dict[str, Any], shm: str, gpu: bool = False) -> dict:
    volumes: list[dict[str, Any]] = [
        # Ray's object store and the data loaders live in /dev/shm: the container default
        # of 64 MiB is far too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
    ]
    if not options.s3:
        volumes.insert(0, {"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_CLAIM}})
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": USER,
            "runAsGroup": USER,
            "fsGroup": USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },  # fmt: skip
    }
    if options.priority_class:
        spec["priorityClassName"] = options.priority_class
    if gpu:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        if options.gpu_product:
            term = {"key": "nvidia.com/gpu.product", "operator": "In",
                    "values": [options.gpu_product]}  # fmt: skip
            spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [term]}]}}}  # fmt: skip
    return {"metadata": {"labels": dict(LABELS)}, "spec": spec}


def cluster_spec(options: Options) -> dict[str, Any]:
    """The RayCluster spec: a head that schedules nothing (num-cpus 0), a CPU group for
    decoding and evaluation and a GPU group that scales from 0, under Ray's autoscaler v2,
    with Ray's token authentication."""
    head = _container(options, "ray-head", "4", "16Gi", "20Gi")
    if options.prometheus:
        head["env"].append({"name": "RAY_PROMETHEUS_HOST", "value": options.prometheus})
    if options.grafana:
        head["env"] += [{"name": "RAY_GRAFANA_HOST", "value": options.grafana},
                        {"name": "RAY_GRAFANA_IFRAME_HOST", "value": options.grafana}]  # fmt: skip
    head_pod = _pod(options, head, "8Gi")
    if options.config is not None:  # the job's driver runs here and reads the config
        head["volumeMounts"].append({"name": "config", "mountPath": CONFIG_DIR, "readOnly": True})
        head_pod["spec"]["volumes"].append({"name": "config", "configMap": {"name": CONFIG_MAP}})
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        *head["ports"],
    ]
    metrics = {"metrics-export-port": str(METRICS_PORT)}
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", "secretName": options.auth_secret},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 300,
            "resources": {
                "limits": {"cpu": "500m", "memory": "1Gi"},
                "requests": {"cpu": "500m", "memory": "1Gi"},
            },
            "securityContext": dict(CONTAINER_SECURITY),
        },
        "headGroupSpec": {
            "serviceType": "ClusterIP",  # the dashboard stays inside: kubectl port-forward
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", **metrics},
            "template": head_pod,
        },
        "workerGroupSpecs": [
            {
                "groupName": name,
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": most,
                "rayStartParams": dict(metrics),
                "template": _pod(
                    options,
                    _container(options, "ray-worker", str(cpus), f"{memory}Gi", "100Gi", gpus=gpus),
                    "16Gi",
                    gpu=bool(gpus),
                ),
            }
            for name, cpus, memory, gpus, most in GROUPS
        ],
    }


def _metadata(options: Options, name: str) -> dict[str, Any]:
    labels = dict(LABELS)
    if options.kueue_queue:
        labels["kueue.x-k8s.io/queue-name"] = options.kueue_queue
    return {"name": name, "labels": labels}


def _job(
    options: Options, name: str, entrypoint: str, deadline_hours: int, output: str
) -> dict[str, Any]:
    submitter = _container(options, "ray-job-submitter", "500m", "1Gi", "1Gi")
    # It submits the job and follows its logs: no storage, no S3 keys, no caches.
    del submitter["ports"], submitter["volumeMounts"], submitter["env"]
    submitter_pod = _pod(options, submitter, "1Gi")
    submitter_pod["spec"] = {
        "restartPolicy": "Never",
        **{k: v for k, v in submitter_pod["spec"].items() if k != "volumes"},
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(options, name),
        "spec": {
            "entrypoint": entrypoint,
            # The submission id follows from the job and its output: Ray refuses a second
            # submission of the same id to a cluster, and the output's lease refuses a
            # second driver on any cluster (docs/reliability.md).
            "jobId": f"{name}-{hashlib.sha256(output.encode()).hexdigest()[:12]}",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "activeDeadlineSeconds": deadline_hours * 3600,
            # A retried job resumes: every stage keeps its shards and training its
            # checkpoints on the shared storage.
            "backoffLimit": 2,
            # Kueue admits the job as a whole and then lets the cluster start.
            "suspend": bool(options.kueue_queue),
            # The pod that submits the job and follows its logs needs little.
            "submitterPodTemplate": submitter_pod,
            "rayClusterSpec": cluster_spec(options),
        },
    }


def network_policy(options: Options) -> dict[str, Any]:
    """Ingress to the Ray pods (see the module docstring); egress stays open (S3, images)."""
    ray_pods = {"podSelector": {"matchLabels": dict(LABELS)}}
    operator = {
        "namespaceSelector": {},  # any namespace: the operator's pods by their chart's label
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
    }
    monitoring = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": options.monitoring_namespace}}}  # fmt: skip
    rules: list[dict[str, Any]] = [
        {"from": [ray_pods]},
        {"from": [operator], "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
        {"from": [monitoring], "ports": [{"protocol": "TCP", "port": METRICS_PORT}]},
    ]
    if options.job_api_namespace:
        api = {"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": options.job_api_namespace}}}  # fmt: skip
        rules.append({"from": [api], "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "u2seg-ray", "labels": dict(LABELS)},
        "spec": {
            "podSelector": {"matchLabels": dict(LABELS)},
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },  # fmt: skip
    }


def job_output(options: Options) -> str:
    """The output the jobs write, as the job's driver will resolve it (U2SEG_DATA = the data
    root); a ConfigError naming the key for an unknown key or a wrong type in the config or
    the overrides."""
    from u2seg.config import load_config

    saved = os.environ.get("U2SEG_DATA")
    os.environ["U2SEG_DATA"] = options.root
    try:
        if options.config is None:
            return load_config(REPO / CONFIG, options.sets).output_dir
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "config.yaml"
            path.write_text(options.config)
            return load_config(path, options.sets).output_dir
    finally:
        if saved is None:
            os.environ.pop("U2SEG_DATA", None)
        else:
            os.environ["U2SEG_DATA"] = saved


def manifests(options: Options = Options()) -> dict[str, dict[str, Any]]:
    output = job_output(options)
    config = f"{CONFIG_DIR}/config.yaml" if options.config is not None else CONFIG
    found: dict[str, dict[str, Any]] = {
        "raycluster.yaml": {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": _metadata(options, "u2seg"),
            "spec": cluster_spec(options),
        },
        **{
            f"rayjob-{name}.yaml": _job(
                options,
                f"u2seg-{name}",
                shlex.join(["python", *entry.split(), "--config", config, *options.sets]),
                hours,
                output,
            )  # fmt: skip
            for name, entry, hours in JOBS
        },
        # Prometheus operator: scrape every Ray pod's metrics port (Ray's Grafana dashboards
        # read these series).
        "podmonitor.yaml": {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": {"name": "u2seg-ray", "labels": dict(LABELS)},
            "spec": {
                "selector": {"matchLabels": dict(LABELS)},
                "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics"}],
            },
        },
        "networkpolicy.yaml": network_policy(options),
    }
    if options.config is not None:
        found["configmap.yaml"] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CONFIG_MAP, "labels": dict(LABELS)},
            "data": {"config.yaml": options.config},
        }
    if not options.s3:
        found["shared-storage.yaml"] = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": SHARED_CLAIM, "labels": dict(LABELS)},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": options.storage_class,
                "resources": {"requests": {"storage": "2Ti"}},
            },
        }
    return found


def render(name: str, manifest: dict[str, Any]) -> str:
    head = f"# Written by cluster/render.py (edit it, not this file): {name}\n"
    return head + yaml.safe_dump(manifest, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument(
        "--check",
        action="store_true",
        help="fail if a committed file differs from the defaults' render",
    )
    parser.add_argument(
        "--out", type=Path, default=HERE, help="folder to write (default: cluster/)"
    )
    parser.add_argument(
        "--image", default=IMAGE, help="image reference; NAME@sha256:DIGEST pins it"
    )
    storage = parser.add_mutually_exclusive_group()
    storage.add_argument(
        "--storage-class",
        default=STORAGE_CLASS,
        help="a ReadWriteMany StorageClass for the shared volume",
    )
    storage.add_argument("--s3", help="s3://bucket/prefix instead of a volume (no PVC)")
    parser.add_argument(
        "--auth-secret",
        default=AUTH_SECRET,
        help="Secret holding Ray's token under the key auth_token",
    )
    parser.add_argument(
        "--gpu-product",
        help="schedule GPU pods only on nodes of this "
        "nvidia.com/gpu.product label, e.g. NVIDIA-H100-80GB-HBM3",
    )
    parser.add_argument("--priority-class", help="priorityClassName of every pod")
    parser.add_argument("--kueue-queue", help="Kueue LocalQueue of the jobs and the cluster")
    parser.add_argument("--prometheus", help="Prometheus URL for the Ray dashboard's charts")
    parser.add_argument("--grafana", help="Grafana URL for the Ray dashboard's charts")
    parser.add_argument(
        "--monitoring-namespace",
        default=MONITORING_NAMESPACE,
        help="namespace of the Prometheus that scrapes the metrics port (NetworkPolicy)",
    )
    parser.add_argument(
        "--job-api-namespace",
        help="let pods of this namespace reach the job API (port 8265); default: none",
    )
    parser.add_argument(
        "--config", type=Path,
        help="your config YAML, carried to every job in a ConfigMap (default: the image's "
        f"{CONFIG})",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="a config override appended to every job's command (repeat it)",
    )  # fmt: skip
    args = parser.parse_args(argv)  # fmt: skip
    if args.s3 is not None and not args.s3.startswith("s3://"):
        parser.error(f"--s3 wants an s3:// URL, got {args.s3!r}")
    if args.config is not None and not args.config.is_file():
        parser.error(f"--config: no such file: {args.config}")
    options = Options(
        image=args.image, storage_class=args.storage_class, s3=args.s3,
        auth_secret=args.auth_secret, gpu_product=args.gpu_product,
        priority_class=args.priority_class, kueue_queue=args.kueue_queue,
        prometheus=args.prometheus, grafana=args.grafana,
        monitoring_namespace=args.monitoring_namespace, job_api_namespace=args.job_api_namespace,
        config=args.config.read_text() if args.config else None, sets=tuple(args.sets),
    )  # fmt: skip
    from u2seg.config import ConfigError

    try:
        rendered = manifests(options)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.check:
        stale = [
            name
            for name, manifest in manifests().items()
            if not (HERE / name).is_file() or (HERE / name).read_text() != render(name, manifest)
        ]
        if stale:
            print(
                f"out of date: {', '.join(stale)} (run python cluster/render.py)", file=sys.stderr
            )
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, manifest in rendered.items():
        (args.out / name).write_text(render(name, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
