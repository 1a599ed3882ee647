"""Stage `train`: the panoptic model (Panoptic FPN + Cascade) on the panoptic pseudo labels.

docs/method.md stage 6. `train.strategy` picks how:

- "deepspeed": a Ray Train `TorchTrainer`; each worker builds the model and hands it to
  `deepspeed.initialize` (ZeRO stage `train.zero_stage`, fp32 with gloo on CPU) with
  torch's SGD;
- "ddp": the same workers with torch `DistributedDataParallel`;
- "local": the same loop in this process, without Ray (debugging).

Samples come from Ray Data (`train.loader=ray-data`: decoding, resizing and flipping run in
Ray Data tasks, which a cluster can place on CPU nodes, and stream into each worker's
`get_dataset_shard`) or from each worker itself (`loader=workers`, exact and repeatable
order: an epoch is a permutation seeded by (seed, epoch), a sample's augmentation by
(seed, epoch, index)).

Faults: every `train.checkpoint_every` steps each rank saves its part (DeepSpeed writes its
ZeRO shard) and all call `ray.train.report(..., checkpoint=...)`; Ray keeps the last
`train.keep`. A dead worker restarts the whole group from the last checkpoint (up to
`train.max_failures` times), and relaunching a stopped run with the same output resumes
it: step, LR schedule, optimizer, RNG and data position come back
(`u2seg.stages._checkpoints`). Outputs under `train/`:

- `model.pt`: the final weights, weights-only (`u2seg.data.weights`), read by `predict`;
- `manifest.json`: strategy, ZeRO stage, world size, the loss curve, throughput, data-wait
  share, the attempts (restarts) and their first steps;
- `progress.log`: the progress lines; `records.parquet`: the images trained on;
- `ray/` (Ray Train's run: its checkpoints) or `checkpoints/` (local strategy).
"""

from __future__ import annotations

import abc
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import torch

from u2seg.artifacts import MANIFEST, StageDir, read_parquet
from u2seg.config import ConfigError, PipelineConfig, check_scale_range, depends_on, sized, to_dict
from u2seg.data.images import list_images
from u2seg.data.training import (
    SAMPLE_KEYS,
    paste_round_robin,
    read_training_set,
    training_sample,
)
from u2seg.data.weights import ModelFileError, check_state_dict, read_model_file, write_model_file
from u2seg.lease import leased
from u2seg.models.pyramid import HUB
from u2seg.models.vit import weights_file_exists
from u2seg.ops.schedule import clip_per_parameter, clipped, learning_rate, parameter_groups
from u2seg.plan import planned
from u2seg.runtime import (
    NoGpu,
    cuda_problem,
    gpus_asked,
    ray_session,
    resolve_device,
)
from u2seg.stages import _checkpoints as ckpt
from u2seg.stages._panoptic_model import RANDOM_INIT, build_from_spec, model_spec

STAGE = "train"
MODEL_FILE = "model.pt"
PROGRESS_LOG = "progress.log"
RECORDS = "records.parquet"
RAY_RUN = "ray"
LOCAL_CHECKPOINTS = "checkpoints"
_SECTIONS = ("data", "backbone", "maskcut", "embed", "cluster", "semantic", "panoptic", "train")
_CHOICES = {
    "strategy": ("deepspeed", "ddp", "local"),
    "loader": ("ray-data", "workers"),
    "backbone": ("resnet50", "vit"),
    "norm": ("bn", "frozen_bn"),
    "resize": ("fixed-batch", "linear"),
}


def _check(cfg: PipelineConfig) -> int:
    """The world size; a ConfigError naming the key for a bad train setting."""
    train = cfg.train
    for key, allowed in _CHOICES.items():
        if getattr(train, key) not in allowed:
            raise ConfigError(f"bad value train.{key}={getattr(train, key)!r}: one of {allowed}")
    if list(train.steps) != sorted(train.steps):
        raise ConfigError(f"bad value train.steps={list(train.steps)}: must be increasing")
    if not train.short_sides or min(train.short_sides) < 1:
        raise ConfigError(f"bad value train.short_sides={list(train.short_sides)}")
    check_scale_range("train.copy_paste_scale", train.copy_paste_scale)
    if train.weights not in ("", HUB) and train.backbone != "resnet50":
        raise ConfigError("train.weights is a ResNet-50 checkpoint: set train.backbone=resnet50")
    if train.backbone == "resnet50" and not (train.weights or train.init):
        raise ConfigError(
            "train.weights is empty: train.backbone=resnet50 would start from random weights "
            f"(U2Seg starts from DINO ResNet-50): train.weights={HUB} fetches DINO's, or give a "
            f"checkpoint file, or train.weights={RANDOM_INIT} to train from scratch"
        )
    if train.weights not in ("", RANDOM_INIT, HUB) and not weights_file_exists(train.weights):
        raise ConfigError(f"train.weights: checkpoint not found: {train.weights}")
    if train.init:
        if train.weights not in ("", HUB):
            raise ConfigError("train.init replaces every weight: leave train.weights empty")
        try:
            read_model_file(train.init)
        except ModelFileError as exc:
            raise ConfigError(f"train.init: {exc}") from None
    world = 1 if train.strategy == "local" else sized(train.num_workers, "train.num_workers")
    if train.min_workers is not None:
        if train.strategy == "local":
            raise ConfigError("train.min_workers (elastic training) needs Ray Train workers")
        if train.min_workers > world:
            raise ConfigError(
                f"bad value train.min_workers={train.min_workers}: above train.num_workers={world}"
            )
    sizes = (
        range(train.min_workers or world, world + 1) if train.resize == "fixed-batch" else [world]
    )
    for size in sizes:
        if train.ims_per_batch % size:
            raise ConfigError(
                f"bad value train.ims_per_batch={train.ims_per_batch}: not a multiple of the "
                f"{size} workers"
            )
    return world


def batch_rule(train: dict[str, Any], world: int) -> tuple[int, float]:
    """(images per worker, LR factor) at `world` workers under `train.resize`."""
    if train["resize"] == "linear":
        per_worker = train["ims_per_batch"] // train["num_workers"]
        return per_worker, world / train["num_workers"]
    return train["ims_per_batch"] // world, 1.0


def _has_checkpoint(stage: StageDir) -> bool:
    for folder, pattern in ((RAY_RUN, "checkpoint_*"), (LOCAL_CHECKPOINTS, "step-*")):
        if stage.fs.glob(f"{stage.path}/{folder}/{pattern}"):
            return True
    return False


@planned("train")
@leased
def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Train on `<output>/panoptic/`; returns the stage manifest (see the module docstring).
    A run that was stopped or killed resumes from its last checkpoint."""
    world = _check(cfg)
    panoptic = StageDir(cfg.output_dir, "panoptic")
    panoptic.manifest()
    refs = list_images(cfg.data.source, cfg.data.root)
    photos = dict(zip(refs.column("file_name").to_pylist(), refs.column("path").to_pylist(),
                      strict=True))  # fmt: skip
    training = read_training_set(panoptic.fs.unstrip_protocol(panoptic.path), photos)
    if len(training.records) < world:
        raise ConfigError(
            f"{len(training.records)} training images for {world} workers: lower train.num_workers"
        )
    stage = StageDir(cfg.output_dir, STAGE)
    stage.start(to_dict(cfg), depends_on(cfg, _SECTIONS), has_results=_has_checkpoint(stage))
    if stage.exists(MANIFEST) and stage.exists(MODEL_FILE):
        return stage.manifest()
    stage.write_table(RECORDS, pa.Table.from_pylist(training.records))
    spec = model_spec(cfg, training.num_things, training.num_stuff)
    loop = _loop_config(cfg, stage, spec, world)
    start = time.perf_counter()
    if cfg.train.strategy == "local":
        progress = train_loop(loop, _LocalSession(stage, cfg.train.keep))
    else:
        progress = _fit_on_ray(cfg, loop, stage)
    counts = {
        "images": len(training.records),
        "steps": progress["step"],
        "world_size": progress["world_size"],  # at the end (elastic runs may have resized)
        "restarts": len(progress["attempts"]) - 1,
    }
    extra = {
        "training": {
            "strategy": cfg.train.strategy,
            "deepspeed": cfg.train.strategy == "deepspeed",
            "zero_stage": cfg.train.zero_stage if cfg.train.strategy == "deepspeed" else None,
            "world_size": world,
            "loader": "workers" if cfg.train.strategy == "local" else cfg.train.loader,
            "precision": progress["precision"],
            "ims_per_batch": cfg.train.ims_per_batch,
            "num_things": training.num_things,
            "num_stuff": training.num_stuff,
            "model": MODEL_FILE,
            "ranks_agree": progress.get("ranks_agree"),
        },
        "curve": progress["curve"],
        "attempts": progress["attempts"],
        "timing": {**_throughput(progress), "seconds": time.perf_counter() - start},
    }
    empty = pa.table({k: pa.array([], pa.string()) for k in ("file_name", "reason")})
    return stage.finish(counts, empty, extra)


def _throughput(progress: dict[str, Any]) -> dict[str, float]:
    """Images/s and the share of step time spent waiting for data, over all steps and over
    the steps after the first progress line (the first waits for the pipeline to start);
    rank 0's peak memory."""
    curve = progress["curve"]
    out: dict[str, float] = {
        "data_wait_s": sum(e["data_wait_s"] for e in curve),
        "step_s": sum(e["step_s"] for e in curve),
        "images": sum(e["images"] for e in curve),
    }
    for name, entries in (("", curve), ("steady_", curve[1:])):
        seconds = sum(e["step_s"] for e in entries)
        if seconds:
            out[f"{name}images_per_s"] = sum(e["images"] for e in entries) / seconds
            out[f"{name}data_wait_share"] = sum(e["data_wait_s"] for e in entries) / seconds
    for key in ("peak_rss_mib", "peak_gpu_mib"):  # rank 0's, as it logs the curve
        if any(key in e for e in curve):
            out[key] = max(e.get(key, 0.0) for e in curve)
    return out


def _loop_config(
    cfg: PipelineConfig, stage: StageDir, spec: dict[str, Any], world: int
) -> dict[str, Any]:
    """Everything a worker needs, as plain values."""
    return {
        "train": to_dict(cfg.train),
        "spec": spec,
        "world_size": world,
        "use_gpu": False,  # Ray workers: set once Ray is up (`_fit_on_ray`)
        "stage_url": stage.fs.unstrip_protocol(stage.path),
        "max_pixels": cfg.data.max_pixels,
        "records": stage.fs.unstrip_protocol(stage.file(RECORDS)),
    }


# -- sessions: where checkpoints go and who the worker is ----------------------------------


@dataclass
class _Session(abc.ABC):
    """Who this worker is and where its checkpoints go."""

    rank: int
    world: int
    ray: bool

    @abc.abstractmethod
    def latest(self) -> Any:
        """A context manager yielding the last checkpoint's directory, or None."""

    @abc.abstractmethod
    def save(self, directory: Path, step: int, metrics: dict[str, Any]) -> None:
        """Keep the checkpoint this rank wrote into `directory`."""


class _RaySession(_Session):
    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        super().__init__(context.get_world_rank(), context.get_world_size(), True)

    @contextmanager
    def latest(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def save(self, directory: Path, step: int, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))


class _LocalSession(_Session):
    """One process: checkpoints in `train/checkpoints/step-<N>/`, the last `keep` kept."""

    def __init__(self, stage: StageDir, keep: int) -> None:
        super().__init__(0, 1, False)
        self.fs = stage.fs
        self.root = stage.file(LOCAL_CHECKPOINTS)
        self.keep = keep

    def _complete(self) -> list[str]:
        found = self.fs.glob(f"{self.root}/step-*/{ckpt.PROGRESS}")
        return sorted(p.rsplit("/", 1)[0] for p in found)

    @contextmanager
    def latest(self) -> Iterator[Path | None]:
        done = self._complete()
        if not done:
            yield None
            return
        with tempfile.TemporaryDirectory() as tmp:
            self.fs.get(f"{done[-1]}/", f"{tmp}/", recursive=True)
            yield Path(tmp)

    def save(self, directory: Path, step: int, metrics: dict[str, Any]) -> None:
        """Upload the checkpoint into `step-<N>/`, its completion marker last: a folder
        counts only once the marker is there (`_complete`), also on object stores, where a
        folder cannot be renamed at once and a moved marker could land before the weights."""
        final = f"{self.root}/step-{step:08d}"
        if self.fs.exists(final):
            self.fs.rm(final, recursive=True)
        files = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ckpt.PROGRESS]
        for path in [*files, directory / ckpt.PROGRESS]:
            target = f"{final}/{path.relative_to(directory).as_posix()}"
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(path), target)
        for old in self._complete()[: -self.keep]:
            self.fs.rm(old, recursive=True)


# -- the training loop (every worker) -------------------------------------------------------


def train_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    train_loop(config, _RaySession())


def _deepspeed_config(train: dict[str, Any], per_worker: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": per_worker,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": train["zero_stage"]},
        # torch's SGD (DeepSpeed tests its own optimizers with ZeRO, not this one)
        "zero_allow_untested_optimizer": True,
        # DeepSpeed would clip one global norm (1424 on a fresh model: every gradient x 7e-4);
        # the paper clips each tensor on its own, done in `_clip_gradients` instead.
        "gradient_clipping": 0.0,
        # bf16 on GPU comes from torch.autocast around the forward, not from DeepSpeed's
        # bf16 mode: torchvision's RoIAlign and NMS have no bf16 kernels, and autocast
        # runs them in fp32 while the convolutions and matmuls run in bf16.
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _fresh_progress(strategy: str, world: int) -> dict[str, Any]:
    return {"strategy": strategy, "world_size": world, "step": 0, "epoch": 0, "batches": 0,
            "tag": None, "curve": [], "attempts": []}  # fmt: skip


def train_loop(config: dict[str, Any], session: _Session) -> dict[str, Any]:
    """The loop every worker runs (and the local strategy in-process); returns the final
    progress record."""
    train = config["train"]
    strategy = train["strategy"]
    rank, world = session.rank, session.world
    device = _device(config, session)
    if train["torch_threads"]:
        torch.set_num_threads(train["torch_threads"])
    torch.manual_seed(train["seed"])  # the same initial weights on every rank
    model = build_from_spec(config["spec"], device, train["weights"])
    if train["init"]:  # an earlier run's or round's weights (a checkpoint still wins below)
        state, _ = read_model_file(train["init"])
        check_state_dict(state, model.state_dict(), train["init"])
        model.load_state_dict(state)
    if device.type == "cuda" and world > 1 and train["norm"] == "bn":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    groups = parameter_groups(model, train["weight_decay"], train["norm_weight_decay"])
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.SGD(groups, lr=train["base_lr"], momentum=train["momentum"])
    per_worker, lr_factor = batch_rule(train, world)
    bf16 = device.type == "cuda"
    engine: Any = None
    if strategy == "deepspeed":
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=_deepspeed_config(train, per_worker)
        )
        forward: Any = engine
    elif strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # A batch without foreground proposals leaves the mask head out of the graph.
        forward = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    else:
        forward = model
    progress = _fresh_progress(strategy, world)
    with session.latest() as directory:
        if directory is not None:
            progress = _restore(directory, strategy, world, rank, model, optimizer, engine)
            progress = _moved_position(progress, world, per_worker)
        else:
            torch.manual_seed(train["seed"] + 1 + rank)
    progress["precision"] = "bf16 autocast" if bf16 else "fp32"
    progress["attempts"].append({"start_step": progress["step"], "world_size": world,
                                 "images_per_worker": per_worker})  # fmt: skip
    log = _ProgressLog(config, rank, echo=not session.ray)
    log.line(
        f"[train] {strategy}"
        + (f" ZeRO-{train['zero_stage']}" if strategy == "deepspeed" else "")
        + f", {world} worker(s) on {device.type}, {per_worker} image(s) per worker, "
        f"{'resuming at' if progress['step'] else 'from'} step {progress['step']}"
    )
    batches = _batches(config, session, progress["epoch"], progress["batches"], per_worker)
    model.train()
    window = _Window()
    while progress["step"] < train["max_iter"]:
        step = progress["step"]
        started = time.perf_counter()
        epoch, position, samples = next(batches)
        waited = time.perf_counter() - started
        lr = lr_factor * learning_rate(
            step, train["base_lr"], train["warmup_iters"], train["warmup_factor"],
            train["steps"], train["gamma"],
        )  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = _tensors(samples)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            losses = forward(images, targets)
        loss = sum(losses.values())
        if engine is not None:
            engine.backward(loss)
            _clip_gradients(model, engine, train["clip_norm"])
            engine.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _clip_gradients(model, None, train["clip_norm"])
            optimizer.step()
        progress.update(step=step + 1, epoch=epoch, batches=position)
        window.add({k: float(v.detach()) for k, v in losses.items()}, waited,
                   time.perf_counter() - started)  # fmt: skip
        done = progress["step"] == train["max_iter"]
        if progress["step"] % train["log_every"] == 0 or done:
            entry = window.flush(progress["step"], lr, per_worker * world)
            progress["curve"].append(entry)
            log.step(entry, train["max_iter"])
        if done:
            progress["ranks_agree"] = _ranks_agree(model)
        if progress["step"] % train["checkpoint_every"] == 0 or done:
            _save(session, progress, model, optimizer, engine)
    if rank == 0:
        meta = {"spec": config["spec"], "step": progress["step"], "strategy": strategy}
        stage = StageDir(*config["stage_url"].rstrip("/").rsplit("/", 1))
        write_model_file(stage, MODEL_FILE, model.state_dict(), meta)
    return progress


def _clip_gradients(model: torch.nn.Module, engine: Any, max_norm: float) -> None:
    """detectron2's clipping, each parameter tensor to L2 norm `max_norm` (0: off), on the
    reduced gradients, under every strategy (`_clip_partitions` under DeepSpeed ZeRO)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if max_norm <= 0 or not trainable:
        return
    if engine is None:
        clip_per_parameter(trainable, max_norm)
    elif all(p.grad is None and hasattr(p, "_hp_mapping") for p in trainable):
        _clip_partitions(trainable, max_norm)
    else:  # DeepSpeed's general path: one all-reduce of each whole gradient
        from deepspeed.utils import safe_update_full_grad_vectorized

        safe_update_full_grad_vectorized(trainable, lambda grad, _: clipped(grad, max_norm))


def _clip_partitions(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Per-tensor clipping of ZeRO-1/2 gradients, which sit in partitions (each rank holds a
    fragment of some tensors): every rank's squared norms of its fragments, summed over the
    ranks in one all-reduce of one value per tensor, give each tensor's norm; each rank then
    scales its own fragments. The fragments are what DeepSpeed's `safe_get_full_grad`
    assembles (one all-reduce of each whole gradient: 4 s a step for this model on 2 CPU
    workers)."""
    fragments: list[torch.Tensor | None] = []
    for p in params:
        mapping = p._hp_mapping  # type: ignore[attr-defined]
        if mapping is None:  # no part of this tensor on this rank
            fragments.append(None)
            continue
        fragment = mapping.get_lp_grad_fragment(p._index_in_param_group)  # type: ignore[attr-defined]
        address = mapping.lp_fragment_address
        if fragment.numel() == p.numel() != address.numel:  # a whole buffer: this rank's part
            fragment = fragment.view(-1).narrow(0, address.start, address.numel)
        fragments.append(fragment)
    device = params[0].device
    squares = torch.stack([
        f.float().pow(2).sum() if f is not None else torch.zeros((), device=device)
        for f in fragments
    ])  # fmt: skip
    torch.distributed.all_reduce(squares, group=params[0]._dp_group)  # type: ignore[attr-defined]
    scales = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for fragment, scale in zip(fragments, scales, strict=True):
        if fragment is not None:
            fragment.mul_(scale.to(fragment.dtype))


def _ranks_agree(model: torch.nn.Module) -> bool:
    """Whether every rank holds the same weights (a checksum per tensor, compared across
    ranks): data-parallel training must keep them equal."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    low, high = sums.clone(), sums.clone()
    torch.distributed.all_reduce(low, torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def _device(config: dict[str, Any], session: _Session) -> torch.device:
    if session.ray:
        import ray.train.torch

        if not config["use_gpu"]:
            return torch.device("cpu")
        if not torch.cuda.is_available():  # the worker holds a GPU that torch cannot use
            raise NoGpu(f"train.use_gpu=true, but torch cannot use CUDA: {cuda_problem()}")
        return ray.train.torch.get_device()
    return resolve_device("auto")


def _tensors(samples: list[dict[str, Any]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Sample arrays -> the model's image list and targets (moved to its device there)."""
    images, targets = [], []
    for s in samples:
        images.append(torch.from_numpy(np.array(s["image"])).permute(2, 0, 1).float())
        targets.append(
            {
                "boxes": torch.from_numpy(np.array(s["boxes"], dtype=np.float32)).reshape(-1, 4),
                "labels": torch.from_numpy(np.array(s["labels"], dtype=np.int64)),
                "masks": torch.from_numpy(np.array(s["masks"], dtype=np.uint8)),
                "semantic": torch.from_numpy(np.asarray(s["semantic"]).astype(np.int64)),
            }
        )
    return images, targets


class _Window:
    """Loss parts and timings since the last progress line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: dict[str, float] = {}
        self.count = 0
        self.waited = 0.0
        self.seconds = 0.0

    def add(self, losses: dict[str, float], waited: float, seconds: float) -> None:
        for k, v in losses.items():
            self.losses[k] = self.losses.get(k, 0.0) + v
        self.count += 1
        self.waited += waited
        self.seconds += seconds

    def flush(self, step: int, lr: float, batch: int) -> dict[str, Any]:
        parts = {k: v / self.count for k, v in sorted(self.losses.items())}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            values = torch.tensor(list(parts.values()), dtype=torch.float64)
            torch.distributed.all_reduce(values)  # every rank's mean, averaged
            parts = dict(zip(parts, (values / torch.distributed.get_world_size()).tolist(),
                             strict=True))  # fmt: skip
        entry = {
            "step": step,
            "lr": lr,
            "loss": sum(parts.values()),
            **parts,
            "images_per_s": batch * self.count / max(self.seconds, 1e-9),
            "data_wait": self.waited / max(self.seconds, 1e-9),
            "data_wait_s": self.waited,
            "step_s": self.seconds,
            "images": batch * self.count,
            **_peak_memory(),
        }
        self.reset()
        return entry


def _peak_memory() -> dict[str, float]:
    """This process's peak resident memory (MiB, Linux counts ru_maxrss in KiB), and its
    GPU's peak allocation when it has one."""
    import resource

    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


class _ProgressLog:
    """Rank 0's progress lines: printed, and kept in `train/progress.log` (which the
    driver of a Ray run echoes, since workers' output does not reach it)."""

    def __init__(self, config: dict[str, Any], rank: int, echo: bool) -> None:
        self.active = rank == 0
        self.url = f"{config['stage_url'].rstrip('/')}/{PROGRESS_LOG}"
        self.echo = echo
        self.lines: list[str] = []
        self.started = time.perf_counter()
        self.first_step: int | None = None
        if self.active:
            try:
                with fsspec.open(self.url, "r") as fh:
                    self.lines = fh.read().splitlines()
            except FileNotFoundError:
                pass

    def line(self, text: str) -> None:
        if not self.active:
            return
        self.lines.append(text)
        if self.echo:
            print(text, flush=True)
        with fsspec.open(self.url, "w") as fh:
            fh.write("\n".join(self.lines) + "\n")

    def step(self, entry: dict[str, Any], max_iter: int) -> None:
        if self.first_step is None:
            self.first_step, self.started = entry["step"], time.perf_counter()
            eta = ""
        else:
            rate = (entry["step"] - self.first_step) / (time.perf_counter() - self.started)
            eta = f"  eta {_duration((max_iter - entry['step']) / max(rate, 1e-9))}"
        parts = " ".join(
            f"{k.removeprefix('loss_')} {v:.3f}" for k, v in entry.items() if k.startswith("loss_")
        )
        self.line(
            f"[train] step {entry['step']}/{max_iter}  loss {entry['loss']:.3f} ({parts})  "
            f"lr {entry['lr']:.2e}  {entry['images_per_s']:.2f} img/s  "
            f"data-wait {entry['data_wait']:.0%}{eta}"
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# -- data -----------------------------------------------------------------------------------


class TrainingSamples:
    """Ray Data batch function: a group of training records -> their samples (fresh
    augmentation randomness per group), each with instances of the next one pasted when
    `paste_scale` is set (copy-paste)."""

    def __init__(self, train: dict[str, Any], max_pixels: int):
        self.args = (train["short_sides"], train["max_side"], train["flip"])
        self.paste_scale = train["copy_paste_scale"] if train["copy_paste"] else None
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
        rng = np.random.default_rng()
        rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["path"]))]
        samples = [training_sample(r, *self.args, rng, self.max_pixels) for r in rows]
        if self.paste_scale is not None:
            samples = paste_round_robin(samples, rng, self.paste_scale)
        return {key: [s[key] for s in samples] for key in SAMPLE_KEYS}


def _batches(
    config: dict[str, Any], session: _Session, epoch: int, done: int, per_worker: int
) -> Iterator[tuple[int, int, list[dict[str, Any]]]]:
    """(epoch, batches of the epoch done, samples) from the data position (epoch, done)."""
    train = config["train"]
    if session.ray and train["loader"] == "ray-data":
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        while True:
            batch: list[dict[str, Any]] = []
            position = 0
            for row in shard.iter_rows():  # one epoch of this worker's rows
                batch.append(row)
                if len(batch) == per_worker:
                    position += 1
                    if position > done:  # a resumed epoch skips the batches it had done
                        yield epoch, position, batch
                    batch = []
            if position == 0:
                raise ValueError(f"a worker's share of the data is below {per_worker} images")
            epoch, done = epoch + 1, 0
    records = read_parquet(config["records"]).to_pylist()
    n, world, rank = len(records), session.world, session.rank
    per_epoch = (n // world) // per_worker
    if per_epoch == 0:
        raise ValueError(f"{n} training images for {world} x {per_worker} images per step")

    def sample(epoch: int, i: int) -> dict[str, Any]:
        rng = np.random.default_rng([train["seed"], epoch, i])
        return training_sample(records[i], train["short_sides"], train["max_side"],
                               train["flip"], rng, config["max_pixels"])  # fmt: skip

    while True:
        order = np.random.default_rng([train["seed"], epoch]).permutation(n)
        mine = order[rank::world][: per_epoch * per_worker]
        for position in range(done, per_epoch):
            index = mine[position * per_worker : (position + 1) * per_worker].tolist()
            samples = [sample(epoch, i) for i in index]
            if train["copy_paste"]:
                rng = np.random.default_rng([train["seed"], epoch, index[0], 1])
                # One image a step: the next record of this worker's order is the source.
                spare = (
                    sample(epoch, int(mine[(position + 1) % per_epoch]))
                    if per_worker == 1
                    else None
                )
                samples = paste_round_robin(samples, rng, train["copy_paste_scale"], spare)
            yield epoch, position + 1, samples
        epoch, done = epoch + 1, 0


# -- checkpoints ----------------------------------------------------------------------------


def _save(
    session: _Session,
    progress: dict[str, Any],
    model: torch.nn.Module,
    optimizer: Any,
    engine: Any,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        tag = f"step{progress['step']:08d}"
        if engine is not None:
            engine.save_checkpoint(tmp, tag=tag)
            for helper in directory.glob("zero_to_*.py"):  # DeepSpeed's scripts: not needed
                helper.unlink()
            progress["tag"] = tag
        elif session.rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                       directory / ckpt.STATE)  # fmt: skip
        torch.save(torch.get_rng_state(), directory / ckpt.rng_file(session.rank))
        if session.rank == 0:
            (directory / ckpt.PROGRESS).write_text(json.dumps(progress))
        last = progress["curve"][-1] if progress["curve"] else {}
        metrics = {"step": progress["step"], "loss": last.get("loss")}
        session.save(directory, progress["step"], metrics)


def _restore(
    directory: Path,
    strategy: str,
    world: int,
    rank: int,
    model: torch.nn.Module,
    optimizer: Any,
    engine: Any,
) -> dict[str, Any]:
    """Load a checkpoint after `ckpt.verify` has checked every file of it. A DeepSpeed
    checkpoint of another world size (elastic training) gives its weights only: the ZeRO
    optimizer state is split per worker, so the optimizer starts anew."""
    progress = ckpt.verify(directory, strategy, world, model.state_dict())
    if engine is not None:
        engine.load_checkpoint(
            str(directory), tag=progress["tag"], load_module_strict=True,
            load_module_only=progress["world_size"] != world,
        )  # fmt: skip
    else:
        state = ckpt.safe_load(directory / ckpt.STATE)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    rng = directory / ckpt.rng_file(rank)
    if rng.exists():
        torch.set_rng_state(ckpt.safe_load(rng))
    return progress


def _moved_position(progress: dict[str, Any], world: int, per_worker: int) -> dict[str, Any]:
    """The progress record at `world` workers of `per_worker` images: the data position
    of a checkpoint written at another world size is the same share of its epoch."""
    before = progress.get("images_per_step", per_worker * progress["world_size"])
    now = per_worker * world
    if progress["world_size"] != world or before != now:
        progress["batches"] = progress["batches"] * before // now
        moved = {"step": progress["step"], "from": progress["world_size"], "to": world}
        progress["resized"] = [*progress.get("resized", []), moved]
    return {**progress, "world_size": world, "images_per_step": now}


# -- Ray Train --------------------------------------------------------------------------


def _fit_on_ray(cfg: PipelineConfig, loop: dict[str, Any], stage: StageDir) -> dict[str, Any]:
    """Run the loop on `train.num_workers` Ray Train workers; the final progress record."""
    with ray_session(cfg.ray):
        import ray.data
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        train = cfg.train
        workers = train.min_workers or sized(train.num_workers, "train.num_workers")
        use_gpu = gpus_asked("train.use_gpu", train.use_gpu, workers, cfg.ray.gpu_wait_s)
        loop = {**loop, "use_gpu": use_gpu}
        datasets: dict[str, Any] = {}
        if train.loader == "ray-data":
            records = stage.read_table(RECORDS)
            # Groups of 2 records: copy-paste pairs them (the step's batch may be 1 image).
            datasets["train"] = ray.data.from_arrow(records).map_batches(
                TrainingSamples(loop["train"], cfg.data.max_pixels),
                batch_size=2, num_cpus=train.data_num_cpus,
            )  # fmt: skip
        storage = stage.fs.unstrip_protocol(stage.path)
        if "://" not in storage or storage.startswith("file://"):
            storage = os.path.abspath(storage.removeprefix("file://"))
        resources = {"CPU": train.cpus_per_worker}
        if loop["use_gpu"]:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_per_worker,
            train_loop_config=loop,
            scaling_config=ScalingConfig(
                # Ray Train V2's elastic range; its type hints predate it.
                num_workers=(train.min_workers, train.num_workers)  # type: ignore[arg-type]
                if train.min_workers else train.num_workers,
                use_gpu=loop["use_gpu"], resources_per_worker=resources,
            ),
            torch_config=TorchConfig(
                backend="nccl" if loop["use_gpu"] else "gloo", timeout_s=train.timeout_s
            ),
            run_config=RunConfig(
                storage_path=storage, name=RAY_RUN,
                checkpoint_config=CheckpointConfig(num_to_keep=train.keep),
                failure_config=FailureConfig(max_failures=train.max_failures),
            ),
            datasets=datasets or None,
        )  # fmt: skip
        with _echo(stage.file(PROGRESS_LOG), stage.fs):
            result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as directory:
        return ckpt.read_progress(Path(directory))


@contextmanager
def _echo(path: str, fs: Any) -> Iterator[None]:
    """Print the lines rank 0 adds to `path` while the block runs."""
    stop = threading.Event()
    seen = len(fs.cat_file(path).decode().splitlines()) if fs.exists(path) else 0

    def follow() -> None:
        nonlocal seen
        while True:
            finished = stop.wait(1.0)
            if fs.exists(path):
                lines = fs.cat_file(path).decode().splitlines()
                for text in lines[seen:]:
                    print(text, flush=True)
                seen = max(seen, len(lines))
            if finished:
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
