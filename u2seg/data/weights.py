"""The trained model's weights file (`train/model.pt`) that `predict` and later rounds read.

A weights-only file: `torch.save` of a dict with `format` (FORMAT), `meta` (plain JSON
types: the architecture's options, classes, step) and `state_dict` (tensors on CPU).
Reading it uses `torch.load(weights_only=True)`, so no pickled object is ever run; a file
that is truncated, not a torch file, of another format or of another architecture is a
`ModelFileError` that names the file and what differs.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import fsspec
import torch

from u2seg.artifacts import StageDir
from u2seg.ops.state_dicts import state_dict_differences

FORMAT = "u2seg-panoptic-fpn/1"


class ModelFileError(ValueError):
    """A weights file that cannot be used; the message names it."""


def write_model_file(
    stage: StageDir, name: str, state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> None:
    """`stage`/`name`, written whole (temporary name, then renamed)."""
    buffer = io.BytesIO()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    torch.save({"format": FORMAT, "meta": dict(meta), "state_dict": tensors}, buffer)
    stage.write_bytes(name, buffer.getvalue())


def read_model_file(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) of a file `write_model_file` wrote."""
    try:
        with fsspec.open(url, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {url} (run `u2seg train`)") from None
    try:
        content = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a cut or foreign file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(
            f"{url}: not a complete weights-only model file (truncated, or written by "
            f"something else): {first}"
        ) from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise ModelFileError(f"{url}: format {found!r}, expected {FORMAT!r}")
    return dict(content["state_dict"]), dict(content["meta"])


def check_state_dict(
    found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str
) -> None:
    """Refuse weights of another architecture, naming the keys and shapes that differ."""
    differences = state_dict_differences(found, expected)
    if differences:
        raise ModelFileError(f"{source} holds another architecture: {differences}")
