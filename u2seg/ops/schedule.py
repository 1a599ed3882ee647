"""The training schedule's numeric rules (docs/method.md stage 6, detectron2's conventions).

- `learning_rate`: linear warm-up from `warmup_factor` x base over `warmup_iters`, then the
  base rate times `gamma` for every milestone passed (WarmupMultiStepLR);
- `parameter_groups`: the trainable parameters in two SGD groups, those of normalisation
  layers with `norm_weight_decay` (0 in the paper), all others (biases too) with
  `weight_decay` (detectron2's `get_default_optimizer_params`);
- `clip_per_parameter`: gradient clipping to L2 norm `max_norm` for each parameter tensor
  on its own (detectron2's CLIP_TYPE "norm", which clips per parameter, not one global
  norm over the model).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def learning_rate(
    step: int,
    base: float,
    warmup_iters: int,
    warmup_factor: float,
    milestones: Sequence[int],
    gamma: float,
) -> float:
    """The learning rate at iteration `step` (0-based)."""
    if list(milestones) != sorted(milestones):
        raise ValueError(f"milestones must be increasing, got {list(milestones)}")
    decay = gamma ** bisect_right(list(milestones), step)
    if step >= warmup_iters:
        return base * decay
    alpha = step / warmup_iters
    return base * decay * (warmup_factor * (1 - alpha) + alpha)


def clip_per_parameter(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> None:
    """Scale each parameter's gradient down to L2 norm `max_norm` where it is larger."""
    for p in parameters:
        if p.grad is not None:
            torch.nn.utils.clip_grad_norm_([p], max_norm)


def clipped(gradient: torch.Tensor, max_norm: float) -> torch.Tensor:
    """One parameter's whole gradient scaled down to L2 norm `max_norm` where it is larger
    (`clip_per_parameter`'s rule, for gradients held outside `param.grad`)."""
    norm = torch.linalg.vector_norm(gradient.float())
    return gradient * (max_norm / (norm + 1e-6)).clamp(max=1.0)


def parameter_groups(
    module: nn.Module, weight_decay: float, norm_weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """SGD parameter groups of `module`'s trainable parameters: normalisation layers'
    weights and biases at `norm_weight_decay`, every other one at `weight_decay`; each
    parameter once, in module order."""
    seen: set[int] = set()
    norm: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for layer in module.modules():
        for p in layer.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (norm if isinstance(layer, _NORMS) else other).append(p)
    return [
        {"params": other, "weight_decay": weight_decay},
        {"params": norm, "weight_decay": norm_weight_decay},
    ]
