"""Copy-paste augmentation of training samples (CutLER's, docs/method.md stage 6).

`copy_paste(target, source, rng, scale)` pastes 1..n-1 of the source's n instances (1 when
it has one) onto the target: the whole source image is resized by r ~ U(scale), placed at a
random offset where it fits inside the target (r is lowered until it does), and the chosen
instances' pixels replace the target's. A pasted mask is kept only if it covers less than
`max_cover` of every existing mask; later pasted instances occlude earlier ones; existing
masks lose the covered pixels and an emptied one is dropped; boxes are recomputed from the
masks; the semantic target takes the pasted pixels as "thing" (0). The offsets are drawn
in x and y for every target, with or without instances (CutLER swaps the two shifts when
the target has none).

A sample is the dict `u2seg.data.training.training_sample` makes: image uint8 (H, W, 3),
masks uint8 (N, H, W), boxes float32 (N, 4), labels int64 (N,), semantic uint8 (H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

THING = 0  # the semantic target's class of every thing pixel


def boxes_of(masks: np.ndarray) -> np.ndarray:
    """float32 (N, 4) xyxy boxes (exclusive right / bottom edge) of N bool (H, W) masks."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for k, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size:
            boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def _resized(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample))


def copy_paste(
    target: dict[str, Any],
    source: dict[str, Any],
    rng: np.random.Generator,
    scale: Sequence[float] = (0.3, 1.0),
    max_cover: float = 0.5,
) -> dict[str, Any]:
    """`target` with instances of `source` pasted onto it (a new dict; `target` itself is
    left as it is). Returns `target` when nothing could be pasted."""
    n = len(source["masks"])
    if n == 0:
        return target
    height, width = target["image"].shape[:2]
    src_h, src_w = source["image"].shape[:2]
    r = min(float(rng.uniform(scale[0], scale[1])), height / src_h, width / src_w)
    size = (max(1, min(height, round(src_h * r))), max(1, min(width, round(src_w * r))))
    top = int(rng.integers(0, height - size[0] + 1))
    left = int(rng.integers(0, width - size[1] + 1))
    chosen = np.sort(rng.choice(n, int(rng.integers(1, max(1, n - 1) + 1)), replace=False))

    pasted = np.zeros((len(chosen), height, width), dtype=bool)
    for k, index in enumerate(chosen):
        mask = _resized(source["masks"][index].astype(np.uint8), size, Image.Resampling.NEAREST)
        pasted[k, top : top + size[0], left : left + size[1]] = mask > 0
    labels = np.asarray(source["labels"])[chosen]
    existing = np.asarray(target["masks"]).astype(bool)
    if len(existing):
        areas = existing.sum(axis=(1, 2))
        cover = (pasted[:, None] & existing[None]).sum(axis=(2, 3)) / np.maximum(areas, 1)[None]
        keep = (cover < max_cover).all(axis=1)
        pasted, labels = pasted[keep], labels[keep]
    for k in range(1, len(pasted)):  # a later pasted instance lies on top of the earlier
        pasted[:k] &= ~pasted[k]
    keep = pasted.any(axis=(1, 2))
    pasted, labels = pasted[keep], labels[keep]
    if not len(pasted):
        return target

    union = np.any(pasted, axis=0).astype(bool)
    canvas = np.zeros_like(target["image"])
    canvas[top : top + size[0], left : left + size[1]] = _resized(
        np.ascontiguousarray(source["image"]), size, Image.Resampling.BILINEAR
    )
    image = np.where(union[..., None], canvas, target["image"])
    semantic = np.where(union, THING, target["semantic"]).astype(target["semantic"].dtype)
    existing = existing & ~union
    alive = existing.any(axis=(1, 2))
    masks = np.concatenate([existing[alive], pasted]).astype(np.uint8)
    return {
        **target,
        "image": image,
        "masks": masks,
        "boxes": boxes_of(masks.astype(bool)),
        "labels": np.concatenate([np.asarray(target["labels"])[alive], labels]).astype(np.int64),
        "semantic": semantic,
    }
