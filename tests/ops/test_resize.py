"""Windowed resizing equals resizing whole (F.interpolate, bilinear, align_corners=False)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from u2seg.ops import resize
from u2seg.ops.resize import FullMasks, mask_windows, resize_window, resized_argmax


def _whole(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("size", [(97, 131), (23, 17), (40, 64)])
def test_a_window_has_the_values_of_the_whole(size: tuple[int, int]) -> None:
    maps = torch.randn(3, 20, 32, generator=torch.Generator().manual_seed(0))
    whole = _whole(maps, size)
    rows, cols = (size[0] // 3, size[0] - 2), (1, size[1] // 2)
    window = resize_window(maps, size, rows, cols)
    torch.testing.assert_close(window, whole[:, rows[0] : rows[1], cols[0] : cols[1]],
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_masks_and_argmax_match_the_whole_in_bands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resize, "BAND", 7)  # several bands on a small photo
    gen = torch.Generator().manual_seed(1)
    probs = torch.zeros(4, 24, 30)
    probs[0, 3:9, 4:20] = torch.rand(6, 16, generator=gen)  # a box-pasted mask
    probs[1, 0:24, 25:30] = 0.9  # along the border
    probs[2, 12, 12] = 0.99  # one pixel
    size = (101, 77)
    expected = (_whole(probs, size) > 0.5).numpy()
    windows = mask_windows(probs, size)
    for k, window in enumerate(windows):
        np.testing.assert_array_equal(window.full(), expected[k])
        assert window.any() == bool(expected[k].any())
    assert windows[3].crop.size == 0 and not windows[3].any()  # an empty mask holds nothing
    assert windows[0].crop.size < 0.2 * size[0] * size[1]  # only its window is computed
    assert [m.shape for m in FullMasks(windows)] == [size] * 4
    logits = torch.randn(5, 24, 30, generator=gen)
    argmax = _whole(logits, size).argmax(0).numpy()
    assert (resized_argmax(logits, size, band=7) == argmax).mean() > 0.999
