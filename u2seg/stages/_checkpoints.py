"""Training checkpoints: everything a `u2seg train` run resumes from.

One checkpoint is one directory:

- `progress.json` (rank 0, written last): strategy, world size, step, data position
  (epoch, batches into it), DeepSpeed tag, the loss curve so far and the attempts;
- the weights and optimizer state: DeepSpeed's own files under `<tag>/` (ZeRO shards
  `zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, one per rank, and the module in
  `mp_rank_00_model_states.pt`), or `state.pt` (model + optimizer) for DDP and the local
  strategy;
- `rng-<rank>.pt`: each rank's torch RNG state (proposal sampling draws from it; a rank
  without one, after a change of world size under DDP, starts from its seed).

Nothing is unpickled unsafely: before anything is loaded, every `.pt` file is read with
`torch.load(weights_only=True)`, which allows tensors, plain containers and, for DeepSpeed,
three of its plain record classes; a file that needs anything else, is cut short, lacks
a ZeRO shard of the workers that wrote it or holds another architecture is a
`CheckpointFileError` naming the file and what differs (a checkpoint of another world size
is elastic training's: its weights are loaded, the optimizer starts anew). DeepSpeed's
own loader (which calls `torch.load` without `weights_only`) only ever sees files that
passed that check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from u2seg.data.weights import ModelFileError, check_state_dict

PROGRESS = "progress.json"
STATE = "state.pt"
DEEPSPEED_MODULE = "mp_rank_00_model_states.pt"
_ZERO_SHARD = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class CheckpointFileError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


def rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


def _deepspeed_records() -> list[Any]:
    """DeepSpeed's plain record classes its ZeRO optimizer files hold (no code of theirs
    runs when they are rebuilt: the weights-only unpickler only sets their fields)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: Path, deepspeed: bool = False) -> Any:
    """`torch.load(weights_only=True)` of one checkpoint file (DeepSpeed's record classes
    allowed when `deepspeed`); a `CheckpointFileError` naming the file otherwise."""
    allowed = _deepspeed_records() if deepspeed else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for cut or foreign files
        text = str(exc)
        found = re.search(r"GLOBAL (\S+) was not an allowed global", text)
        reason = (
            f"holds a pickled {found.group(1)}, which is not loaded"
            if found
            else f"truncated or not a torch file ({text.splitlines()[0] if text else exc!r})"
        )
        raise CheckpointFileError(f"checkpoint file {path}: {reason}") from None


def read_progress(directory: Path) -> dict[str, Any]:
    path = directory / PROGRESS
    try:
        progress: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointFileError(f"{directory}: incomplete checkpoint, no {PROGRESS}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointFileError(f"checkpoint file {path}: not valid JSON ({exc})") from None
    for key in ("strategy", "world_size", "step", "epoch", "batches", "curve", "attempts"):
        if key not in progress:
            raise CheckpointFileError(f"checkpoint file {path}: no '{key}'")
    return progress


def verify(
    directory: Path, strategy: str, world_size: int, model_state: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Check a checkpoint directory against the run that wants to resume from it (see the
    module docstring); returns its progress record."""
    progress = read_progress(directory)
    if progress["strategy"] != strategy:
        raise CheckpointFileError(
            f"{directory / PROGRESS}: written by train.strategy={progress['strategy']}, "
            f"this run has {strategy}"
        )
    deepspeed = strategy == "deepspeed"
    loaded = {p: safe_load(p, deepspeed) for p in sorted(directory.rglob("*.pt"))}
    if deepspeed:
        folder = directory / str(progress["tag"])
        module_file = folder / DEEPSPEED_MODULE
        shards = sorted(p.name for p in folder.glob("*.pt") if _ZERO_SHARD.match(p.name))
        if len(shards) != progress["world_size"]:  # one per worker that wrote it
            raise CheckpointFileError(
                f"{folder}: {len(shards)} ZeRO optimizer shards, expected {progress['world_size']}"
            )
        weights = loaded.get(module_file, {}).get("module") if module_file in loaded else None
    else:
        module_file = directory / STATE
        weights = loaded[module_file].get("model") if module_file in loaded else None
    if not isinstance(weights, Mapping):
        raise CheckpointFileError(f"checkpoint file {module_file}: missing or holds no weights")
    try:
        check_state_dict(weights, model_state, str(module_file))
    except ModelFileError as exc:
        raise CheckpointFileError(str(exc)) from None
    return progress
