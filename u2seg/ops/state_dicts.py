"""Comparing a loaded state dict with the one a model expects (checkpoints of the right
architecture only)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def state_dict_differences(
    found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> str | None:
    """None when `found` has exactly the keys and shapes of `expected`; else one line
    naming the missing, unexpected and reshaped keys (a few of each)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k} {tuple(found[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(found) & set(expected)
        if found[k].shape != expected[k].shape
    )
    if not (missing or unexpected or shapes):
        return None
    return (
        f"{len(missing)} keys missing {missing[:3]}, {len(unexpected)} unexpected "
        f"{unexpected[:3]}, {len(shapes)} of another shape {shapes[:3]}"
    )
