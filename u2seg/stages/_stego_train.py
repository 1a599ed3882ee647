"""The training loop of the STEGO head (`semantic.method=stego`): Ray Train or one process.

`train_loop_per_worker(config)` runs under `ray.train.torch.TorchTrainer` (DDP over the
workers, metrics and the final head reported to Ray Train) and, unchanged, in a plain
process for tests and small runs (the head's weights returned).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from u2seg.models.stego import SegmentationHead
from u2seg.ops.stuff import (
    ArrayLike,
    CorrespondenceLossConfig,
    as_numpy32,
    correspondence_loss,
    nearest_neighbours,
)
from u2seg.runtime import resolve_device


@dataclass(frozen=True)
class StegoTrainConfig:
    """Training of the STEGO head on precomputed frozen patch tokens.

    STEGO: Adam lr 5e-4, batch 16 (x 5 crops), 5000+ steps, code dim 70. Here a "step"
    draws `batch_size` images and one kNN partner each.
    """

    code_dim: int = 70
    steps: int = 5000
    batch_size: int = 16
    lr: float = 5e-4
    dropout: float = 0.1
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    loss: CorrespondenceLossConfig = field(default_factory=CorrespondenceLossConfig)


def _train_config(config: dict[str, Any]) -> StegoTrainConfig:
    """The `StegoTrainConfig` of a Ray Train config dict (keys as the dataclass fields)."""
    known = {f for f in StegoTrainConfig.__dataclass_fields__ if f != "loss"}
    fields = {k: v for k, v in config.items() if k in known}
    loss = config.get("loss", {})
    if not isinstance(loss, CorrespondenceLossConfig):
        loss = CorrespondenceLossConfig(**loss)
    return StegoTrainConfig(**fields, loss=loss)


def _load_tokens(tokens: ArrayLike | str | Path) -> np.ndarray | torch.Tensor:
    """The (N, h, w, D) token array: given, or a `.npy` path memory-mapped (each Ray worker
    maps the same file instead of receiving a copy)."""
    if isinstance(tokens, str | Path):
        return np.load(tokens, mmap_mode="r")
    return tokens


def _ray_train_context() -> Any | None:
    """Ray Train's context inside `trainer.fit()`, else None (plain single process).

    A Ray Train worker has imported `ray.train` before it calls the loop, so a process
    that has not is a plain one (and does not pay the second or so that import costs).
    """
    ray_train = sys.modules.get("ray.train")
    if ray_train is None:
        return None
    try:
        return ray_train.get_context()
    except RuntimeError:
        return None


def _batch(
    tokens: np.ndarray | torch.Tensor, idx: np.ndarray, device: torch.device
) -> torch.Tensor:
    """Rows `idx` of (N, h, w, D) tokens as float32 (B, D, h, w) on `device`."""
    rows = tokens[torch.as_tensor(idx)] if isinstance(tokens, torch.Tensor) else tokens[idx]
    x = torch.as_tensor(np.asarray(rows)) if isinstance(rows, np.ndarray) else rows
    return x.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Train a `SegmentationHead` with `correspondence_loss`: Ray Train or one process.

    `config` keys: "tokens", (N, h, w, D) frozen patch tokens (array, tensor or `.npy`
    path); "knn", (N, k) neighbour table (default: `nearest_neighbours` of the mean-pooled
    tokens, k = 7); plus any `StegoTrainConfig` field ("loss" a dict of
    `CorrespondenceLossConfig` fields). Under Ray Train the head is wrapped for DDP, each
    worker draws its own batches (seed + rank) and metrics are reported every `log_every`
    steps, with the head's state dict as a checkpoint at the end (rank 0).

    Returns, in a plain process, {"state_dict": head weights (CPU tensors), "losses":
    per-step loss floats, "config": the resolved training config as a dict}; under Ray
    Train None (Ray refuses tensors in return values: the result is the checkpoint
    `head.pt` and the reported metrics).
    """
    cfg = _train_config(config)
    tokens = _load_tokens(config["tokens"])
    if len(tokens.shape) != 4 or tokens.shape[0] < 2:
        raise ValueError(f"tokens must be (N >= 2, h, w, D), got shape {tuple(tokens.shape)}")
    knn = config.get("knn")
    if knn is None:
        pooled = np.stack([as_numpy32(tokens[i]).mean(axis=(0, 1)) for i in range(len(tokens))])
        knn = nearest_neighbours(pooled, min(7, len(tokens) - 1))
    knn = np.asarray(knn, dtype=np.int64)

    ctx = _ray_train_context()
    rank = ctx.get_world_rank() if ctx is not None else 0
    torch.manual_seed(cfg.seed)  # same initial head on every worker
    head: nn.Module = SegmentationHead(tokens.shape[-1], cfg.code_dim, cfg.dropout)
    if ctx is not None:
        import ray.train.torch

        device = ray.train.torch.get_device()
        head = ray.train.torch.prepare_model(head)
    else:
        device = resolve_device(cfg.device)
        head = head.to(device)
    optimiser = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    rng = np.random.default_rng((cfg.seed, rank))
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    batch = min(cfg.batch_size, len(tokens))

    losses: list[float] = []
    head.train()
    for step in range(cfg.steps):
        idx = rng.choice(len(tokens), size=batch, replace=False)
        pos = knn[idx, rng.integers(0, knn.shape[1], size=batch)]
        feats, feats_pos = _batch(tokens, idx, device), _batch(tokens, pos, device)
        # STEGO's target correlations use the dropped-out features too (its `dropout`).
        signal = F.dropout2d(feats, cfg.dropout, training=True)
        signal_pos = F.dropout2d(feats_pos, cfg.dropout, training=True)
        loss, parts = correspondence_loss(
            signal, signal_pos, head(feats), head(feats_pos), cfg.loss, gen
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        last = step == cfg.steps - 1
        if ctx is not None and (last or (step + 1) % cfg.log_every == 0):
            _report({"step": step + 1, "loss": losses[-1], **parts}, head, rank, last)

    if ctx is not None:
        return None
    state = {k: v.detach().cpu() for k, v in _unwrap(head).state_dict().items()}
    return {"state_dict": state, "losses": losses, "config": asdict(cfg)}


def _unwrap(head: nn.Module) -> nn.Module:
    """The head itself, also when wrapped by DistributedDataParallel."""
    inner = getattr(head, "module", head)
    return inner if isinstance(inner, nn.Module) else head


def _report(metrics: dict[str, float], head: nn.Module, rank: int, final: bool) -> None:
    """`ray.train.report` from every worker; rank 0 attaches the head at the final step."""
    import ray.train

    if not (final and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(_unwrap(head).state_dict(), Path(tmp) / "head.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
