"""Bilinear resizing of model outputs to a photo's own size, a window at a time.

A model predicts at its test size (~800 pixels); its masks and semantic logits are brought
back to the photo's size. Resized whole, a 40-megapixel photo's 100 masks and 28 logit maps
are ~30 GB of float32; here each mask is resized only inside the window where it can be
non-zero, and the logits a band of rows at a time, with the same values as
`F.interpolate(..., mode="bilinear", align_corners=False)` of the whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F

#: Rows of output resized at once (the logits: classes x BAND x width floats).
BAND = 256


def resize_window(
    maps: torch.Tensor, size: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]
) -> torch.Tensor:
    """Rows [r0, r1) and columns [c0, c1) of `maps` (C, h, w) resized bilinearly to `size`
    (align_corners=False, as F.interpolate), float32 (C, r1 - r0, c1 - c0), computed alone."""
    height, width = size
    device = maps.device
    ys = (torch.arange(*rows, device=device, dtype=torch.float32) + 0.5) * (2 / height) - 1
    xs = (torch.arange(*cols, device=device, dtype=torch.float32) + 0.5) * (2 / width) - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
    # Border padding clamps the sample points to the edge pixels, as F.interpolate does.
    return F.grid_sample(
        maps[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )[0]


def resized_argmax(logits: torch.Tensor, size: tuple[int, int], band: int = BAND) -> np.ndarray:
    """argmax over classes of `logits` (C, h, w) resized to `size`: uint8 (H, W), a band of
    `band` rows at a time."""
    height, width = size
    out = np.empty((height, width), dtype=np.uint8)
    for top in range(0, height, band):
        rows = (top, min(height, top + band))
        window = resize_window(logits, size, rows, (0, width))
        out[rows[0] : rows[1]] = window.argmax(0).to(torch.uint8).cpu().numpy()
    return out


@dataclass(frozen=True)
class MaskWindow:
    """A bool mask of a photo, kept as the window where it can be true."""

    crop: np.ndarray  # bool (r1 - r0, c1 - c0)
    top: int
    left: int
    size: tuple[int, int]  # the photo's (H, W)

    def any(self) -> bool:
        return bool(self.crop.any())

    def full(self) -> np.ndarray:
        """The bool (H, W) mask."""
        mask = np.zeros(self.size, dtype=bool)
        rows, cols = self.crop.shape
        mask[self.top : self.top + rows, self.left : self.left + cols] = self.crop
        return mask


def _span(first: int, last: int, src: int, dst: int) -> tuple[int, int]:
    """Output indices [a, b) whose bilinear samples can touch source indices first..last
    (output i samples source (i + 0.5) * src / dst - 0.5 and the index after it)."""
    scale = dst / src
    a = math.floor((first - 0.5) * scale - 0.5) - 1
    b = math.ceil((last + 1.5) * scale - 0.5) + 1
    return max(0, a), min(dst, b)


def mask_windows(
    probs: torch.Tensor, size: tuple[int, int], threshold: float = 0.5
) -> list[MaskWindow]:
    """Masks (N, h, w) of probabilities resized to `size` and thresholded (> `threshold`),
    each computed only inside the window its non-zero pixels can reach (a mask resized
    whole is zero elsewhere), a band of rows at a time."""
    height, width = size
    found = []
    for prob in probs:
        nonzero = torch.nonzero(prob > 0)
        if not len(nonzero):
            found.append(MaskWindow(np.zeros((0, 0), dtype=bool), 0, 0, size))
            continue
        (r0, c0), (r1, c1) = nonzero.min(0).values.tolist(), nonzero.max(0).values.tolist()
        rows = _span(r0, r1, prob.shape[0], height)
        cols = _span(c0, c1, prob.shape[1], width)
        crop = np.empty((rows[1] - rows[0], cols[1] - cols[0]), dtype=bool)
        for top in range(rows[0], rows[1], BAND):
            band = (top, min(rows[1], top + BAND))
            window = resize_window(prob[None], size, band, cols)[0] > threshold
            crop[band[0] - rows[0] : band[1] - rows[0]] = window.cpu().numpy()
        found.append(MaskWindow(crop, rows[0], cols[0], size))
    return found


class FullMasks(Sequence[np.ndarray]):
    """The windows as a sequence of full-size masks, each made when it is read."""

    def __init__(self, windows: Sequence[MaskWindow]) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[np.ndarray]: ...
    def __getitem__(self, index: int | slice) -> np.ndarray | Sequence[np.ndarray]:
        if isinstance(index, slice):
            return FullMasks(self.windows[index])
        return self.windows[index].full()

    def __iter__(self) -> Iterator[np.ndarray]:
        return (w.full() for w in self.windows)
