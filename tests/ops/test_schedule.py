"""The schedule's rules on hand-picked iterations."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.convnext import LayerNorm2d

from u2seg.ops.schedule import clip_per_parameter, learning_rate, parameter_groups

PAPER = {"base": 0.01, "warmup_iters": 1000, "warmup_factor": 0.001,
         "milestones": [210_000, 250_000], "gamma": 0.02}  # fmt: skip


@pytest.mark.parametrize(
    ("step", "lr"),
    [
        (0, 1e-5),
        (500, 0.01 * (0.001 * 0.5 + 0.5)),
        (1000, 0.01),
        (209_999, 0.01),
        (210_000, 2e-4),
        (250_000, 4e-6),
    ],  # fmt: skip
)
def test_warm_up_then_steps(step: int, lr: float) -> None:
    assert learning_rate(step, **PAPER) == pytest.approx(lr)


def test_milestones_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing"):
        learning_rate(0, 0.01, 0, 1.0, [5, 3], 0.1)


def test_clipping_is_per_parameter_tensor() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    clip_per_parameter([a, b], 1.0)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8]))  # norm 5 -> 1
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # norm 0.5: untouched


def test_norm_layers_get_their_own_weight_decay() -> None:
    conv = torch.nn.Conv2d(3, 8, 3)
    frozen = torch.nn.Linear(8, 8).requires_grad_(False)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(8), torch.nn.GroupNorm(4, 8),
                                LayerNorm2d(8), frozen, torch.nn.Linear(8, 2))  # fmt: skip
    other, norm = parameter_groups(model, 5e-5)
    assert (other["weight_decay"], norm["weight_decay"]) == (5e-5, 0.0)
    assert len(norm["params"]) == 6  # weight and bias of BatchNorm, GroupNorm, LayerNorm2d
    assert [tuple(p.shape) for p in other["params"]] == [(8, 3, 3, 3), (8,), (2, 8), (2,)]
    everything = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in (other, norm) for p in g["params"]} == everything
