"""What each stage asks of the Ray cluster, sized to the cluster it finds.

A setting left unset (None) is decided here from the cluster, before a stage starts:

- an image stage's pool (`features`, `maskcut`, `embed`, `semantic`, `predict`): one actor
  per GPU (`num_gpus` 1 when the cluster has GPUs), else one per CPU core not taken by the
  read tasks (`data.read_num_cpus`), never more actors than fit next to them;
- training (`train.strategy`, `num_workers`, `use_gpu`): DeepSpeed with one worker per GPU;
  on one machine without GPUs a local process, the cheapest there (docs/benchmarks.md); on
  several machines without GPUs, workers as many as fit;
- STEGO's trainer (`semantic.train_workers`): one worker per GPU, the driver without GPUs;
- the local k-means task (`cluster.num_cpus`): every CPU of the largest node.

Explicit settings win. `check` then refuses, before anything runs, a plan the cluster cannot
hold: an actor, worker or task larger than any node, more of them than the cluster has GPUs
or CPUs where no autoscaler can add nodes; the message names the setting to change.
`u2seg plan` prints the same for the cluster it finds or one described by flags.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from u2seg.config import ActorConfig, ConfigError, PipelineConfig

#: Stages with a pool of Ray Data actors holding a model (config section = stage name).
IMAGE_STAGES = ("features", "maskcut", "embed", "semantic", "predict")
STAGES = (
    "features", "maskcut", "embed", "cluster", "semantic", "panoptic", "train", "predict",
    "self-train", "evaluate",
)  # fmt: skip


class PlanError(ConfigError):
    """The cluster cannot hold what the config asks; the message names the settings."""


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float
    memory_gib: float


@dataclass(frozen=True)
class Cluster:
    """The nodes work can run on. `autoscaler`: nodes may join while a stage waits (a
    joined cluster: KubeRay's autoscaler adds GPU nodes on demand). Where the autoscaler's
    node groups are known (Ray's autoscaler v2 publishes them), `nodes` are the ones the
    cluster can grow to (the head and every group at its maximum), so an actor or task no
    group can hold is refused; otherwise a shortfall waits."""

    nodes: tuple[Node, ...]
    autoscaler: bool
    source: str
    groups_known: bool = False

    @property
    def waits(self) -> bool:
        """A shortfall is waited for (nodes may join), not refused."""
        return self.autoscaler and not self.groups_known

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    @property
    def memory_gib(self) -> float:
        return sum(n.memory_gib for n in self.nodes)

    def largest(self, resource: str) -> float:
        return max((getattr(n, resource) for n in self.nodes), default=0.0)

    def describe(self) -> str:
        return (
            f"{self.source}: {len(self.nodes)} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs, "
            f"{self.memory_gib:.0f} GiB" + (" (an autoscaler may add nodes)" if self.waits else "")
        )


def described(
    cpus: float, gpus: float, memory_gib: float, nodes: int = 1, autoscaler: bool = False
) -> Cluster:
    """A cluster of `nodes` equal nodes, as `u2seg plan --cpus --gpus --memory` gives it."""
    node = Node(cpus, gpus, memory_gib)
    return Cluster((node,) * nodes, autoscaler, "described")


def _this_machine(num_cpus: int | None) -> Cluster:
    """The machine a local Ray would start on, without starting it: `ray.num_cpus` or the
    CPUs this process may use, the GPUs torch sees, the memory."""
    import psutil
    import torch

    cpus = num_cpus or len(os.sched_getaffinity(0))
    memory = psutil.virtual_memory().total / 2**30
    node = Node(float(cpus), float(torch.cuda.device_count()), memory)
    return Cluster((node,), False, "this machine (a local Ray)")


def _node(resources: Any) -> Node:
    return Node(
        float(resources.get("CPU", 0)),
        float(resources.get("GPU", 0)),
        float(resources.get("memory", 0)) / 2**30,
    )


#: The worker groups an autoscaler may add, as JSON: [{"name": "gpu", "cpus": 8, "gpus": 1,
#: "memory_gib": 64, "max": 16}, ...]; cluster/render.py sets it in every pod from the
#: manifest's groups.
NODE_GROUPS_ENV = "U2SEG_NODE_GROUPS"


def _autoscaler_groups() -> list[tuple[Node, int]] | None:
    """The node groups (shape, most nodes) an autoscaler may add: U2SEG_NODE_GROUPS, else
    those Ray's autoscaler publishes in the GCS where it does (Ray Data and Train read them
    too); None when neither says."""
    described = os.environ.get(NODE_GROUPS_ENV)
    if described:
        try:
            return [(Node(float(g["cpus"]), float(g["gpus"]), float(g["memory_gib"])),
                     int(g["max"])) for g in json.loads(described)]  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise PlanError(
                f"{NODE_GROUPS_ENV}={described!r} is not a list of groups: {exc}"
            ) from None
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # an older GCS, or none of the autoscaler's keys
        return None
    if config is None or not config.node_group_configs:
        return None
    return [(_node(g.resources), int(g.max_count)) for g in config.node_group_configs]


def _running_ray(source: str, local: bool = False) -> Cluster:
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    groups = None if local else _autoscaler_groups()
    if groups is None:
        return Cluster(tuple(_node(n["Resources"]) for n in alive), not local, source)
    heads = [_node(n["Resources"]) for n in alive if "node:__internal_head__" in n["Resources"]]
    grown = [shape for shape, most in groups for _ in range(max(0, most))]
    return Cluster(
        tuple(heads + grown), True, f"{source} (grown to its autoscaler's maximum)", True
    )


def find_cluster(cfg: PipelineConfig) -> Cluster:
    """The cluster the stages will run on: the Ray this process is connected to, the one
    at `ray.address` / RAY_ADDRESS (joined now: a stage would join it anyway), or this
    machine for a local Ray (not started: a stage starts its own)."""
    from u2seg.runtime import local_ray_address, local_ray_running

    address = local_ray_address(cfg.ray)
    import ray

    if ray.is_initialized():
        local = local_ray_running()
        return _running_ray("this machine's running Ray" if local else "the running Ray", local)
    if address:
        ray.init(address=address)
        return _running_ray(f"the Ray cluster at {address}")
    return _this_machine(cfg.ray.num_cpus)


# -- sizing -----------------------------------------------------------------------------


def _cpu_pool(cluster: Cluster, per_actor: float, reads: float) -> int:
    """Actors of `per_actor` CPUs on a cluster without GPUs: one per core the read tasks
    leave, no more than Ray can place beside them."""
    free = max(cluster.cpus - reads, per_actor)
    by_cores = math.ceil(free)
    return max(1, min(by_cores, math.floor(free / per_actor)) if per_actor > 0 else by_cores)


def _size_pool(actors: Any, cluster: Cluster, reads: float) -> Any:
    num_gpus = actors.num_gpus if actors.num_gpus is not None else float(cluster.gpus > 0)
    concurrency = actors.concurrency
    if concurrency is None:
        if num_gpus > 0:
            concurrency = max(1, math.floor(cluster.gpus / num_gpus))
        else:
            concurrency = _cpu_pool(cluster, actors.num_cpus, reads)
    return dataclasses.replace(actors, num_gpus=num_gpus, concurrency=concurrency)


def _size_train(cfg: PipelineConfig, cluster: Cluster) -> Any:
    t = cfg.train
    gpus = cluster.gpus
    use_gpu = t.use_gpu if t.use_gpu is not None else gpus > 0
    strategy = t.strategy
    if strategy is None:
        one_cpu_machine = not use_gpu and len(cluster.nodes) == 1
        strategy = "local" if one_cpu_machine else "deepspeed"
    workers = t.num_workers
    if workers is None:
        if strategy == "local":
            workers = 1
        elif use_gpu:
            workers = max(1, math.floor(gpus))
        else:
            reads = t.data_num_cpus if t.loader == "ray-data" else 0.0
            workers = _cpu_pool(cluster, t.cpus_per_worker, reads)
    return dataclasses.replace(t, strategy=strategy, num_workers=workers, use_gpu=use_gpu)


def size(cfg: PipelineConfig, cluster: Cluster) -> PipelineConfig:
    """`cfg` with every sizing setting left unset decided for `cluster` (module docstring);
    idempotent, and explicit settings are kept as they are."""
    reads = cfg.data.read_num_cpus
    pools = {name: _size_pool(getattr(cfg, name), cluster, reads) for name in IMAGE_STAGES}
    semantic = pools["semantic"]
    if semantic.train_workers is None:
        semantic = dataclasses.replace(semantic, train_workers=math.floor(cluster.gpus))
    clustering = cfg.cluster
    if clustering.num_cpus is None:
        clustering = dataclasses.replace(clustering, num_cpus=max(1.0, cluster.largest("cpus")))
    return dataclasses.replace(
        cfg, **{**pools, "semantic": semantic}, cluster=clustering, train=_size_train(cfg, cluster)
    )


# -- what the stages ask ----------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """`count` units (actors, workers, tasks) of `cpus` CPUs and `gpus` GPUs each, for
    `stage`; `key` is the setting that gives the count, `unit_keys` (cpus, gpus) the ones
    that size a unit."""

    stage: str
    what: str
    count: int
    cpus: float
    gpus: float
    key: str
    unit_keys: tuple[str, str]
    grows_to: int | None = None
    memory_gib: float = 0.0  # what it asks Ray for (the k-means task, once the vectors exist)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "unit_keys"}


def _pool_ask(stage: str, section: str, actors: ActorConfig) -> Ask:
    return Ask(
        stage, "actors", int(actors.concurrency or 1), actors.num_cpus, actors.num_gpus or 0.0,
        f"{section}.concurrency", (f"{section}.num_cpus", f"{section}.num_gpus"),
        actors.max_concurrency,
    )  # fmt: skip


def _train_asks(stage: str, cfg: PipelineConfig) -> list[Ask]:
    t = cfg.train
    gpus = float(bool(t.use_gpu))
    if t.strategy == "local":
        keys = ("train.strategy", "train.use_gpu")
        return [Ask(stage, "local process (the driver)", 1, 0.0, gpus, "train.strategy", keys)]
    elastic = t.min_workers is not None
    count = int(t.min_workers or t.num_workers or 1)
    key = "train.min_workers" if elastic else "train.num_workers"
    keys = ("train.cpus_per_worker", "train.use_gpu")
    grows = t.num_workers if elastic else None
    return [Ask(stage, f"{t.strategy} workers", count, t.cpus_per_worker, gpus, key, keys, grows)]


def _stage_asks(stage: str, cfg: PipelineConfig) -> list[Ask]:
    if stage == "maskcut" and cfg.maskcut.source:
        keys = ("data.read_num_cpus", "data.read_num_cpus")
        what = "import tasks (up to 64)"
        return [Ask(stage, what, 1, cfg.data.read_num_cpus, 0.0, keys[0], keys)]
    if stage in ("features", "maskcut", "embed", "predict"):
        return [_pool_ask(stage, stage, getattr(cfg, stage))]
    if stage == "semantic":
        s = cfg.semantic
        out = [_pool_ask(stage, stage, s)]
        if s.method == "stego" and s.train_workers:
            keys = ("semantic.train_workers", "semantic.num_gpus")
            gpus = float(bool(s.num_gpus))
            out.append(Ask(stage, "STEGO workers", s.train_workers, 1.0, gpus, keys[0], keys))
        return out
    if stage == "cluster":
        c = cfg.cluster
        gpus = float(c.gpu)
        from u2seg.stages.cluster import resolve_mode

        vectors = _embedded(cfg)
        if (resolve_mode(c, vectors) if vectors is not None else c.mode) == "sharded":
            keys = ("cluster.shard_num_cpus", "cluster.gpu")
            what = "k-means shard actors"
            return [
                Ask(stage, what, c.num_shards, c.shard_num_cpus, gpus, "cluster.num_shards", keys)
            ]
        keys = ("cluster.num_cpus", "cluster.gpu")
        task = Ask(stage, "k-means task", 1, float(c.num_cpus or 1), gpus, "cluster.mode", keys)
        memory = _kmeans_memory_gib(cfg, vectors) if vectors is not None else 0.0
        return [dataclasses.replace(task, memory_gib=memory)]
    if stage == "train":
        return _train_asks(stage, cfg)
    if stage == "self-train":
        return [_pool_ask(stage, "predict", cfg.predict), *_train_asks(stage, cfg)]
    if stage == "evaluate":
        e = cfg.evaluate
        what = f"scoring actors (from {e.ray_min_images} images)"
        keys = ("evaluate.num_cpus", "evaluate.num_cpus")
        count = e.concurrency
        return [
            Ask(
                stage, what, count, e.num_cpus, 0.0, "evaluate.concurrency", keys, e.max_concurrency
            )
        ]
    if stage == "panoptic":
        keys = ("data.read_num_cpus", "data.read_num_cpus")
        return [Ask(stage, "merge tasks", 1, cfg.data.read_num_cpus, 0.0, keys[0], keys)]
    raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")


def _embedded(cfg: PipelineConfig) -> int | None:
    """How many vectors `embed/` made (None before it has run)."""
    from u2seg.artifacts import ArtifactError, StageDir

    try:
        return int(StageDir(cfg.output_dir, "embed").manifest()["counts"]["embedded"])
    except (ArtifactError, KeyError):
        return None


def _kmeans_memory_gib(cfg: PipelineConfig, vectors: int) -> float:
    """What the local k-means task asks Ray for (the cluster stage's rule)."""
    from u2seg.models.vit import BACKBONES
    from u2seg.stages.cluster import task_memory

    spec = BACKBONES.get(cfg.backbone.name)
    return task_memory(vectors, spec.embed_dim if spec else 768) / 2**30


def asks(cfg: PipelineConfig, stages: Iterable[str]) -> list[Ask]:
    """What each of `stages` asks of the cluster, for a sized `cfg`."""
    return [ask for stage in stages for ask in _stage_asks(stage, cfg)]


def shortfalls(ask: Ask, cluster: Cluster) -> list[str]:
    """Where the cluster's nodes now cannot hold `ask`, each naming the setting to change:
    refusals on a fixed cluster, waits for the autoscaler on one that can grow."""
    out = []
    cpu_key, gpu_key = ask.unit_keys
    where = f"{ask.stage}: {ask.what}"
    most_cpus, most_gpus = cluster.largest("cpus"), cluster.largest("gpus")
    if ask.cpus > most_cpus:
        out.append(
            f"{where} of {ask.cpus:g} CPUs each, but no node has more than {most_cpus:g}: "
            f"lower {cpu_key}"
        )
    if ask.gpus and cluster.gpus == 0:
        off = "false" if gpu_key.endswith(("use_gpu", ".gpu")) else "0"
        out.append(f"{where} asks for GPUs, but the cluster has none: set {gpu_key}={off}")
    elif ask.gpus > most_gpus:
        out.append(
            f"{where} of {ask.gpus:g} GPUs each, but no node has more than {most_gpus:g}: "
            f"lower {gpu_key}"
        )
    elif ask.gpus and ask.count * ask.gpus > cluster.gpus:
        fits = math.floor(cluster.gpus / ask.gpus)
        out.append(
            f"{where}: {ask.key}={ask.count} asks for {ask.count * ask.gpus:g} GPUs, but the "
            f"cluster has {cluster.gpus:g}: set {ask.key}={fits} (or leave it unset: one per GPU)"
        )
    most_memory = cluster.largest("memory_gib")
    if ask.memory_gib > most_memory:
        out.append(
            f"{where} asks for {ask.memory_gib:.1f} GiB, but no node has more than "
            f"{most_memory:.0f} GiB: set cluster.mode=sharded (the vectors spread over actors)"
        )
    if ask.count * ask.cpus > cluster.cpus:
        out.append(
            f"{where}: {ask.key}={ask.count} of {ask.cpus:g} CPUs each asks for "
            f"{ask.count * ask.cpus:g} CPUs, but the cluster has {cluster.cpus:g}: lower "
            f"{ask.key} or {cpu_key}"
        )
    return out


def check(cfg: PipelineConfig, stages: Sequence[str], cluster: Cluster) -> PipelineConfig:
    """`cfg` sized for `cluster`; a PlanError naming every setting the cluster cannot hold
    (on a cluster with an autoscaler the stage waits for nodes instead, up to
    `ray.gpu_wait_s` for GPUs)."""
    sized = size(cfg, cluster)
    found = [p for ask in asks(sized, stages) for p in shortfalls(ask, cluster)]
    if found and not cluster.waits:
        raise PlanError(f"the plan does not fit {cluster.describe()}:\n  " + "\n  ".join(found))
    return sized


F = TypeVar("F", bound=Callable[..., Any])


def planned(stage: str) -> Callable[[F], F]:
    """Decorator of a stage's `run(cfg, ...)`: it runs with `cfg` sized for the cluster it
    finds, after the plan is checked (a PlanError before anything starts)."""

    def wrap(run: F) -> F:
        @functools.wraps(run)
        def wrapper(cfg: PipelineConfig, *args: Any, **kwargs: Any) -> Any:
            return run(check(cfg, [stage], find_cluster(cfg)), *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return wrap


def report(cfg: PipelineConfig, stages: Sequence[str], cluster: Cluster) -> dict[str, Any]:
    """The plan as data (`u2seg plan --json`): the cluster, each ask, the problems."""
    sized = size(cfg, cluster)
    rows = []
    for ask in asks(sized, stages):
        short = shortfalls(ask, cluster)
        waits, refused = (short, []) if cluster.waits else ([], short)
        rows.append({**ask.row(), "problems": refused, "waits": waits})
    return {
        "cluster": {
            "source": cluster.source,
            "autoscaler": cluster.autoscaler,
            "groups_known": cluster.groups_known,
            "nodes": [dataclasses.asdict(n) for n in cluster.nodes],
        },
        "asks": rows,
        "fits": not any(r["problems"] for r in rows),
        "sized": {
            "train.strategy": sized.train.strategy,
            "train.num_workers": sized.train.num_workers,
            "train.use_gpu": sized.train.use_gpu,
            "semantic.train_workers": sized.semantic.train_workers,
            "cluster.num_cpus": sized.cluster.num_cpus,
            **{f"{s}.concurrency": getattr(sized, s).concurrency for s in IMAGE_STAGES},
            **{f"{s}.num_gpus": getattr(sized, s).num_gpus for s in IMAGE_STAGES},
        },
    }


def report_text(plan: dict[str, Any], cluster: Cluster) -> str:
    """The plan as a table for people (`u2seg plan`)."""
    lines = [cluster.describe(), "", "stage       asks"]
    for row in plan["asks"]:
        grows = f" (grows to {row['grows_to']})" if row["grows_to"] else ""
        gpus = f" + {row['gpus']:g} GPU" if row["gpus"] else ""
        gpus += f" + {row['memory_gib']:.1f} GiB" if row["memory_gib"] else ""
        each = f"{row['cpus']:g} CPU{gpus} each" if row["cpus"] else (gpus[3:] or "its CPUs")
        lines.append(
            f"{row['stage']:<11} {row['count']} x {row['what']}{grows}: {each}  [{row['key']}]"
        )
        lines += [f"{'':<11}   NO: {p}" for p in row["problems"]]
        lines += [f"{'':<11}   waits for the autoscaler: {p}" for p in row["waits"]]
    lines += ["", "fits" if plan["fits"] else "does not fit: change the settings named above"]
    return "\n".join(lines)
