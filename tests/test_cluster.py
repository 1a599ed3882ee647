"""The KubeRay manifests in cluster/: valid against KubeRay's own CRD schemas (types, and no
field the schema does not know, as `kubectl apply --validate=strict` would check) and their
pods against the core Kubernetes schemas (kubernetes-validate, strict), up to date with
cluster/render.py, consistent with the project (Ray pin, image, entry points, GPU group
scaling from zero), locked down (token auth, non-root), and rendered as a deployment asks
(storage class or S3 without a volume, GPU type, priority class, Kueue queue, image digest)."""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import shlex
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.helpers import REPO
from u2seg.config import load_config

CRDS = REPO / "tests" / "kuberay-crds"  # KubeRay v1 CRDs (see its README)
CLUSTER = REPO / "cluster"


def _render() -> Any:
    spec = importlib.util.spec_from_file_location("render", CLUSTER / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


@functools.cache
def _schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _unknown_fields(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Keys of `value` that `schema` does not declare (Kubernetes would prune them
    silently: a typo such as `minReplica` is lost without an error)."""
    if isinstance(value, dict) and "properties" in schema:
        found = []
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{where}.{key}")
            else:
                found += _unknown_fields(item, schema["properties"][key], f"{where}.{key}")
        return found
    if isinstance(value, list) and "items" in schema:
        return [p for k, item in enumerate(value)
                for p in _unknown_fields(item, schema["items"], f"{where}[{k}]")]  # fmt: skip
    return []


def _check(manifest: dict[str, Any]) -> None:
    schema = _schema(manifest["kind"])
    jsonschema.validate(manifest, schema)
    unknown = _unknown_fields(manifest, schema)
    assert not unknown, f"fields the CRD does not have: {unknown}"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CLUSTER / name).read_text())
    return data


RAY_MANIFESTS = [
    "raycluster.yaml", "rayjob-labels.yaml", "rayjob-train.yaml", "rayjob-self-train.yaml",
    "rayjob-predict.yaml", "rayjob-evaluate.yaml",
]  # fmt: skip
K8S_VERSIONS = ["1.30", "1.33", "1.37"]


def _pods(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod template of a RayCluster or RayJob, as the Pod the operator would create."""
    spec = _cluster_spec(manifest)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    templates = [g["template"] for g in groups]
    if manifest["kind"] == "RayJob":
        templates.append(manifest["spec"]["submitterPodTemplate"])
    return [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "pod", **t.get("metadata", {})}, "spec": t["spec"]}
            for t in templates]  # fmt: skip


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]
    return spec if manifest["kind"] == "RayCluster" else spec["rayClusterSpec"]


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_manifests_pass_kuberays_schema(name: str) -> None:
    _check(_load(name))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_pods_and_the_volume_pass_the_core_kubernetes_schemas(version: str) -> None:
    for name in RAY_MANIFESTS:
        for pod in _pods(_load(name)):
            kubernetes_validate.validate(pod, version, strict=True)
    kubernetes_validate.validate(_load("shared-storage.yaml"), version, strict=True)
    bad = _pods(_load("raycluster.yaml"))[0]
    bad["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True  # a typo
    with pytest.raises(kubernetes_validate.ValidationError, match="runAsNonroot"):
        kubernetes_validate.validate(bad, version, strict=True)


def test_a_typo_or_a_wrong_type_is_caught() -> None:
    manifest = _load("raycluster.yaml")
    typo = copy.deepcopy(manifest)
    typo["spec"]["workerGroupSpecs"][1]["minReplica"] = 0
    with pytest.raises(AssertionError, match=r"workerGroupSpecs\[1\]\.minReplica"):
        _check(typo)
    wrong = copy.deepcopy(manifest)
    wrong["spec"]["workerGroupSpecs"][1]["maxReplicas"] = "many"
    with pytest.raises(jsonschema.ValidationError, match="'many' is not of type 'integer'"):
        _check(wrong)


def test_committed_manifests_are_what_render_writes() -> None:
    render = _render()
    assert render.main(["--check"]) == 0
    assert sorted(render.MANIFESTS) == sorted(p.name for p in CLUSTER.glob("*.yaml"))


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_manifests_agree_with_the_project(name: str) -> None:
    manifest = _load(name)
    spec = _cluster_spec(manifest)
    assert spec["rayVersion"] == importlib.metadata.version("ray")  # the pinned Ray
    assert spec["enableInTreeAutoscaling"] and spec["autoscalerOptions"]["version"] == "v2"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["serviceType"] == "ClusterIP"
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    pod = gpu["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    images = set()
    for group in [head, *spec["workerGroupSpecs"]]:
        template = group["template"]["spec"]
        images |= {c["image"] for c in template["containers"]}
        shm = [v for v in template["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
    assert images == {_render().IMAGE}
    assert spec["authOptions"] == {"mode": "token", "secretName": _render().AUTH_SECRET}
    for pod in _pods(manifest):
        context = pod["spec"]["securityContext"]
        assert context["runAsNonRoot"] and context["runAsUser"] == 1000
        for container in pod["spec"]["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["imagePullPolicy"] == "Always"  # a tag, not a digest
            assert "ephemeral-storage" in container["resources"]["requests"]
    if manifest["kind"] == "RayJob":
        job = manifest["spec"]
        assert job["shutdownAfterJobFinishes"] and job["ttlSecondsAfterFinished"] > 0
        assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 1
        words = shlex.split(job["entrypoint"])
        assert words[0] == "python" and (REPO / words[1]).is_file(), words[1]
        config = words[words.index("--config") + 1]
        assert (REPO / config).is_file()


def test_a_deployment_renders_its_storage_gpu_type_priority_queue_and_image(
    tmp_path: Path,
) -> None:
    render = _render()
    digest = "ghcr.io/u2seg/u2seg@sha256:" + "ab" * 32
    assert render.main(["--out", str(tmp_path), "--storage-class", "efs-sc", "--image", digest,
                        "--gpu-product", "NVIDIA-H100-80GB-HBM3", "--priority-class", "research",
                        "--kueue-queue", "gpu-queue", "--grafana", "http://grafana:3000",
                        "--prometheus", "http://prometheus:9090"]) == 0  # fmt: skip
    volume = yaml.safe_load((tmp_path / "shared-storage.yaml").read_text())
    assert volume["spec"]["storageClassName"] == "efs-sc"
    assert volume["spec"]["accessModes"] == ["ReadWriteMany"]
    job = yaml.safe_load((tmp_path / "rayjob-train.yaml").read_text())
    _check(job)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True  # Kueue admits it
    for pod in _pods(job):
        kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)
        assert pod["spec"]["priorityClassName"] == "research"
        assert {c["image"] for c in pod["spec"]["containers"]} == {digest}
        assert {c["imagePullPolicy"] for c in pod["spec"]["containers"]} == {"IfNotPresent"}
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in head["env"]}
    assert env["RAY_GRAFANA_HOST"] == "http://grafana:3000"
    assert env["RAY_PROMETHEUS_HOST"] == "http://prometheus:9090"
    (gpu,) = [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
              if g["groupName"] == "gpu"]  # fmt: skip
    terms = gpu["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]  # fmt: skip
    assert terms == [{"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In",
                                            "values": ["NVIDIA-H100-80GB-HBM3"]}]}]  # fmt: skip


def test_the_s3_variant_has_no_volume_and_reads_its_credentials_from_a_secret(
    tmp_path: Path,
) -> None:
    render = _render()
    assert render.main(["--out", str(tmp_path), "--s3", "s3://bucket/u2seg"]) == 0
    assert not (tmp_path / "shared-storage.yaml").exists()
    for name in RAY_MANIFESTS:
        manifest = yaml.safe_load((tmp_path / name).read_text())
        _check(manifest)
        assert "u2seg-shared" not in (tmp_path / name).read_text()
        for pod in _pods(manifest):
            kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)
            assert all(v["name"] != "shared" for v in pod["spec"].get("volumes", []))
            for container in pod["spec"]["containers"]:
                if container["name"] == "ray-job-submitter":  # submits, reads no data
                    assert "env" not in container
                    continue
                secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
                           for e in container["env"] if "valueFrom" in e}  # fmt: skip
                assert (
                    secrets["AWS_ACCESS_KEY_ID"] == secrets["AWS_SECRET_ACCESS_KEY"] == "u2seg-s3"
                )
        head = _cluster_spec(manifest)["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert {"name": "U2SEG_DATA", "value": "s3://bucket/u2seg"} in head["env"]
    with pytest.raises(SystemExit):
        render.main(["--out", str(tmp_path), "--s3", "/data"])


def test_the_podmonitor_scrapes_every_ray_pod() -> None:
    monitor = _load("podmonitor.yaml")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    spec = _cluster_spec(_load("raycluster.yaml"))
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        labels = group["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        (container,) = group["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert str(ports[endpoint["port"]]) == group["rayStartParams"]["metrics-export-port"]


def test_the_dockerfile_installs_what_the_jobs_need() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    for folder in ("u2seg", "ray_jobs", "configs"):
        assert f"COPY {folder} ./{folder}" in text
    assert _render().IMAGE in text  # the build command the header gives
    # Python as tested, faiss as tested (no faiss-gpu build for torch's CUDA 13), S3 support,
    # the non-root user the manifests run as, no compiler in the final image.
    assert "FROM python:3.11" in text and "pip install faiss-gpu" not in text
    assert ".[crf,s3]" in text and "useradd" in text and "--uid 1000" in text
    final = text[text.rindex("FROM ") :]
    assert "build-essential" not in final and "USER 1000" in final
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".cache", ".git"} <= set(ignored)


def _restricted(pod_spec: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """What keeps a container from Pod Security "restricted" (its pod's settings count)."""
    pod, own = pod_spec.get("securityContext", {}), container.get("securityContext", {})
    found = []
    if not own.get("runAsNonRoot", pod.get("runAsNonRoot")):
        found.append("runAsNonRoot")
    seccomp = own.get("seccompProfile", pod.get("seccompProfile", {}))
    if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        found.append("seccompProfile")
    if own.get("allowPrivilegeEscalation") is not False:
        found.append("allowPrivilegeEscalation")
    if own.get("capabilities", {}).get("drop") != ["ALL"]:
        found.append("capabilities.drop")
    if own.get("privileged") or any("hostPath" in v for v in pod_spec.get("volumes", [])):
        found.append("privileged or hostPath")
    return found


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_every_container_passes_pod_security_restricted(name: str) -> None:
    manifest = _load(name)
    for pod in _pods(manifest):
        for container in pod["spec"]["containers"]:
            assert _restricted(pod["spec"], container) == [], container["name"]
    # KubeRay adds the autoscaler to the head pod with autoscalerOptions' securityContext.
    spec = _cluster_spec(manifest)
    head = spec["headGroupSpec"]["template"]["spec"]
    autoscaler = {"name": "autoscaler", **spec["autoscalerOptions"]}
    assert _restricted(head, autoscaler) == []
    assert _restricted(head, {"name": "bare"}) == ["allowPrivilegeEscalation", "capabilities.drop"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_network_policy_admits_the_ray_pods_the_operator_and_prometheus(
    version: str, tmp_path: Path
) -> None:
    policy = _load("networkpolicy.yaml")
    kubernetes_validate.validate(policy, version, strict=True)
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for name in RAY_MANIFESTS:  # it covers every Ray pod, and they (the submitter too) talk
        for pod in _pods(_load(name)):
            assert selector.items() <= pod["metadata"]["labels"].items()
    rules = policy["spec"]["ingress"]
    assert rules[0] == {"from": [{"podSelector": {"matchLabels": selector}}]}
    opened = {r["ports"][0]["port"]: r["from"][0] for r in rules[1:]}
    assert opened[8265]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "kuberay-operator"
    }
    assert opened[8080] == {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}  # fmt: skip
    assert len(rules) == 3  # nothing else: GCS, client port and job API stay inside
    render = _render()
    assert render.main(["--out", str(tmp_path), "--job-api-namespace", "ml-platform",
                        "--monitoring-namespace", "prom"]) == 0  # fmt: skip
    policy = yaml.safe_load((tmp_path / "networkpolicy.yaml").read_text())
    kubernetes_validate.validate(policy, version, strict=True)
    froms = [r["from"][0].get("namespaceSelector", {}).get("matchLabels") for r in
             policy["spec"]["ingress"]]  # fmt: skip
    assert {"kubernetes.io/metadata.name": "ml-platform"} in froms
    assert {"kubernetes.io/metadata.name": "prom"} in froms


def test_a_resubmitted_job_has_the_same_submission_id() -> None:
    ids = {name: _load(name)["spec"]["jobId"] for name in RAY_MANIFESTS[1:]}
    assert len(set(ids.values())) == len(ids)  # one id per job and output
    render = _render()
    again = render.manifests(render.Options())
    assert {n: again[n]["spec"]["jobId"] for n in ids} == ids  # rendered again: the same
    other = render.manifests(render.Options(s3="s3://bucket/u2seg"))
    assert all(other[n]["spec"]["jobId"] != ids[n] for n in ids)  # another output: another


def test_a_deployment_carries_its_config_and_overrides_into_every_job(tmp_path: Path) -> None:
    """--config FILE becomes the ConfigMap the head pod mounts and every job reads; each
    --set is on every job's command line; a wrong key is refused when rendering."""
    render = _render()
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: photos\noutput: ${oc.env:U2SEG_DATA}/runs/photos\ncluster:\n  k: 120\n")
    out = tmp_path / "out"
    assert render.main(["--out", str(out), "--config", str(mine), "--set", "cluster.k=300",
                        "--set", "train.max_iter=90000"]) == 0  # fmt: skip
    config_map = yaml.safe_load((out / "configmap.yaml").read_text())
    assert config_map["kind"] == "ConfigMap"
    assert config_map["data"]["config.yaml"] == mine.read_text()
    kubernetes_validate.validate(config_map, K8S_VERSIONS[-1], strict=True)
    ids = set()
    for name in RAY_MANIFESTS:
        manifest = yaml.safe_load((out / name).read_text())
        _check(manifest)
        for pod in _pods(manifest):
            kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)
        head = _cluster_spec(manifest)["headGroupSpec"]["template"]["spec"]
        (volume,) = [v for v in head["volumes"] if v["name"] == "config"]
        assert volume["configMap"]["name"] == config_map["metadata"]["name"]
        (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == "config"]
        if manifest["kind"] != "RayJob":
            continue
        words = shlex.split(manifest["spec"]["entrypoint"])
        config = words[words.index("--config") + 1]
        assert config == f"{mount['mountPath']}/config.yaml"
        assert words[-2:] == ["cluster.k=300", "train.max_iter=90000"]
        ids.add(manifest["spec"]["jobId"])
    assert len(ids) == 5
    default_ids = {_load(n)["spec"]["jobId"] for n in RAY_MANIFESTS[1:]}
    assert not ids & default_ids  # another output (runs/photos): other submission ids
    with pytest.raises(SystemExit):
        render.main(["--out", str(out), "--config", str(mine), "--set", "cluster.kk=3"])


def test_the_labelling_job_imports_masks_named_under_the_data_root(tmp_path: Path) -> None:
    """`--set maskcut.source=...` with the pods' data root reaches the labelling job's
    command line whole (quoted, so no shell expands it) and loads as a config there."""
    render = _render()
    source = "maskcut.source=${oc.env:U2SEG_DATA,/data}/masks/imagenet_train.json"
    assert render.main(["--out", str(tmp_path), "--set", source]) == 0
    labels = yaml.safe_load((tmp_path / "rayjob-labels.yaml").read_text())
    words = shlex.split(labels["spec"]["entrypoint"])
    assert words[:3] == ["python", "ray_jobs/run.py", "--until"] and words[-1] == source
    cfg = load_config(REPO / "configs" / "coco.yaml", [source])
    assert cfg.maskcut.source.endswith("/masks/imagenet_train.json")
    assert "${" not in cfg.maskcut.source
