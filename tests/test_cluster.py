"""The KubeRay manifests in cluster/: valid against KubeRay's own CRD schemas (types, and no
field the schema does not know, as `kubectl apply --validate=strict` would check), up to
date with cluster/render.py, and consistent with the project (Ray pin, image, entry points,
GPU group scaling from zero)."""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import shlex
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers import REPO

CRDS = REPO / "tests" / "kuberay-crds"  # KubeRay v1 CRDs (see its README)
CLUSTER = REPO / "cluster"


def _render() -> Any:
    spec = importlib.util.spec_from_file_location("render", CLUSTER / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
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


RAY_MANIFESTS = ["raycluster.yaml", "rayjob-labels.yaml", "rayjob-train.yaml",
                 "rayjob-self-train.yaml"]  # fmt: skip


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]
    return spec if manifest["kind"] == "RayCluster" else spec["rayClusterSpec"]


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_manifests_pass_kuberays_schema(name: str) -> None:
    _check(_load(name))


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
    if manifest["kind"] == "RayJob":
        job = manifest["spec"]
        assert job["shutdownAfterJobFinishes"] and job["ttlSecondsAfterFinished"] > 0
        assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 1
        words = shlex.split(job["entrypoint"])
        assert words[0] == "python" and (REPO / words[1]).is_file(), words[1]
        config = words[words.index("--config") + 1]
        assert (REPO / config).is_file()


def test_the_dockerfile_installs_what_the_jobs_need() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    for folder in ("u2seg", "ray_jobs", "configs"):
        assert f"COPY {folder} ./{folder}" in text
    assert _render().IMAGE in text  # the build command the header gives
    assert "faiss-gpu-cu12" in text and "pip uninstall -y faiss-cpu" in text
