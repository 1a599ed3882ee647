"""Several Ray nodes on one machine (`ray.cluster_utils.Cluster`: a head that schedules
nothing and two worker nodes): MaskCut spreads over both, and losing a node in the middle
of the stage still labels every image exactly once."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import demo_config, fault_when, save_photo
from u2seg.stages import maskcut

pytestmark = [pytest.mark.slow, pytest.mark.ray]
IMAGES = 16


@pytest.fixture()
def cluster() -> Iterator[object]:
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        nodes.add_node(num_cpus=2)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address)
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def _photos(folder: Path) -> Path:
    folder.mkdir()
    for k in range(IMAGES):
        save_photo(folder / f"p{k:02d}.jpg", (96, 80), seed=k)
    return folder


def _config(folder: Path, out: Path, cache: Path, actor_cpus: float = 0.5):
    return demo_config(
        folder, out, cache, "maskcut.image_size=112", "maskcut.batch_size=1",
        "maskcut.concurrency=2", f"maskcut.num_cpus={actor_cpus}", "data.read_num_cpus=0.25",
        "maskcut.crf=guided",
    )  # fmt: skip


def _labelled_once(out: Path) -> list[int]:
    """The image ids of maskcut's instances.json, checked to be each input once."""
    data = json.loads((out / "maskcut" / "instances.json").read_text())
    ids = [im["id"] for im in data["images"]]
    assert sorted(ids) == list(range(1, IMAGES + 1)), ids  # no gap, no duplicate
    return ids


def test_maskcut_spreads_over_two_nodes(cluster, tmp_path: Path, weights_cache: Path) -> None:
    import ray
    from ray.util.state import list_actors

    out = tmp_path / "run"
    # 1.5 CPUs per actor on 2-CPU nodes: two actors never fit on one node (the scheduler
    # packs when it may), and 0.5 CPU is left on each for the read tasks.
    cfg = _config(_photos(tmp_path / "photos"), out, weights_cache, actor_cpus=1.5)
    manifest = maskcut.run(cfg)
    assert manifest["counts"]["ok"] == IMAGES
    _labelled_once(out)
    head = ray.get_runtime_context().get_node_id()
    workers = [a for a in list_actors(detail=True, limit=1000) if "MaskCutWorker" in a.class_name]
    nodes = {a.node_id for a in workers}
    assert len(nodes) == 2 and head not in nodes  # both worker nodes, never the head


def test_losing_a_node_mid_stage_still_labels_every_image_once(
    cluster, tmp_path: Path, weights_cache: Path
) -> None:
    out = tmp_path / "run"
    cfg = _config(_photos(tmp_path / "photos"), out, weights_cache)
    removed: dict[str, int] = {}

    def remove_a_node_after_two_shards() -> bool:
        shards = list((out / "maskcut").glob("part-*.parquet"))
        if len(shards) < 2:
            return False
        removed["after_shards"] = len(shards)
        cluster.remove_node(cluster.list_all_nodes()[-1])  # type: ignore[attr-defined]
        return True

    with fault_when(remove_a_node_after_two_shards, poll=0.05):
        manifest = maskcut.run(cfg)
    assert removed and removed["after_shards"] < IMAGES // 2  # removed mid-stage
    assert manifest["counts"]["ok"] == IMAGES and manifest["counts"]["errors"] == 0
    _labelled_once(out)


def _train_losing_a_node(tmp_path: Path, *overrides: str) -> tuple[dict, int]:
    """2 DeepSpeed workers for 8 steps on a 2-node cluster (1 CPU each: a worker a node);
    the node of one of them is removed after the first registered checkpoint. The manifest and the
    step of that checkpoint."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    import u2seg
    from tests.stages.test_train import DEEPSPEED_2, _registered_step
    from tests.trainset import train_config, write_trainset

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [nodes.add_node(num_cpus=1) for _ in range(2)]
    nodes.wait_for_nodes()
    ray.init(address=nodes.address)
    photos, run = write_trainset(tmp_path)
    cfg = train_config(photos, run, *DEEPSPEED_2, "train.max_iter=8", "train.checkpoint_every=2",
                       "train.max_failures=2", "train.loader=workers", *overrides)  # fmt: skip
    removed: dict[str, int] = {}

    def remove_a_training_node() -> bool:
        step = _registered_step(run)
        if not step:
            return False
        alive = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
        used = {a.node_id for a in alive if "RayTrainWorker" in a.class_name}
        removed["after_step"] = step
        nodes.remove_node(next(n for n in workers if n.node_id in used))
        return True

    try:
        with fault_when(remove_a_training_node):
            manifest = u2seg.run_train(cfg)
    finally:
        ray.shutdown()
        nodes.shutdown()
    assert removed, "no node was removed"
    return manifest, removed["after_step"]


def test_elastic_training_goes_on_with_fewer_workers_after_losing_a_node(tmp_path: Path) -> None:
    """`train.min_workers=1` on two nodes that hold one worker each: the run finishes with
    one worker, from the last registered checkpoint, at the same global batch."""
    manifest, after_step = _train_losing_a_node(
        tmp_path, "train.min_workers=1", "train.cpus_per_worker=1"
    )
    first, *later = manifest["attempts"]
    assert first["world_size"] == 2 and later and later[-1]["world_size"] == 1
    assert later[-1]["images_per_worker"] == 2  # the global batch of 2 kept
    assert later[0]["start_step"] >= after_step > 0
    assert manifest["counts"]["steps"] == 8 and manifest["counts"]["world_size"] == 1
    assert [e["step"] for e in manifest["curve"]] == list(range(1, 9))
    assert all(e["images"] == 2 for e in manifest["curve"])


def test_local_kmeans_runs_on_a_worker_node_not_the_head(cluster, tmp_path: Path) -> None:
    """The local mode's k-means is a Ray task asking for CPUs and memory: on a cluster whose
    head schedules nothing it runs on a worker node (the head only drives the job)."""
    import numpy as np
    import pyarrow as pa
    import ray

    from tests.helpers import DEMO_CONFIG
    from u2seg.artifacts import StageDir
    from u2seg.config import load_config
    from u2seg.stages import cluster as cluster_stage

    out = tmp_path / "run"
    embed = StageDir(str(out), "embed")
    embed.start({}, {})
    rng = np.random.default_rng(0)
    for shard in range(2):
        vectors = rng.normal(size=(40, 16)).astype(np.float32)
        vectors[:20] += 5.0  # two blobs
        ids = np.arange(40) + 40 * shard + 1
        embed.write_table(embed.shard_name(shard), pa.table({
            "annotation_id": ids, "image_id": ids,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 16),
            "error": pa.array([None] * 40, pa.string()),
        }))  # fmt: skip
    embed.finish({}, pa.table({"annotation_id": pa.array([], pa.int64())}))
    cfg = load_config(DEMO_CONFIG, [f"output={out}", "cluster.k=2", "cluster.mode=local"])
    manifest = cluster_stage.run(cfg)
    head = ray.get_runtime_context().get_node_id()
    workers = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - {head}
    assert manifest["mode"] == "local" and manifest["node"] in workers
    assert sorted(manifest["sizes"]) == [40, 40]
