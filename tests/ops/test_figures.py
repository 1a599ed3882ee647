"""Report pictures: PNG charts decoded back with PIL, per-image colour maps checked by pixel."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from u2seg.ops.figures import (
    blend,
    color_segments,
    confusion_figure,
    confusion_rows,
    iou_bars,
    side_by_side,
)


def _decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def _red(picture: np.ndarray) -> int:
    """Pixels of the red match outlines (viridis has no red)."""
    r, g, b = (picture[..., i].astype(int) for i in range(3))
    return int(((r > 200) & (g < 80) & (b < 80)).sum())


# ---------------------------------------------------------------------------- confusion


def test_confusion_rows_mapped_in_class_order_then_largest_unmapped() -> None:
    counts = np.zeros((6, 3), dtype=np.int64)
    counts[:, 0] = [5, 50, 7, 0, 30, 9]
    rows = confusion_rows(counts, {2: 1, 5: 0, 0: 2}, max_rows=10)
    assert rows == [5, 2, 0, 1, 4]  # empty row 3 is never shown
    assert confusion_rows(counts, {}, max_rows=2) == [1, 4]


def test_confusion_rows_keeps_largest_mapped_rows_when_too_many() -> None:
    counts = np.arange(10, dtype=np.int64)[:, None] + 1
    rows = confusion_rows(counts, {k: 0 for k in range(10)}, max_rows=3)
    assert rows == [7, 8, 9]


def test_confusion_rows_rejects_mapping_outside_matrix() -> None:
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        confusion_rows(np.ones((4, 2), dtype=np.int64), {1: 2})


def test_confusion_figure_800_clusters_shows_40_rows_and_outlines_matches() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 100, size=(800, 27), dtype=np.int64)
    counts[:, 26] = 0  # a GT class without pixels stays an all-zero column
    mapping = {k * 7: k for k in range(26)}
    rows = confusion_rows(counts, mapping)
    assert len(rows) == 40 and rows[:26] == [k * 7 for k in range(26)]
    names = [f"cluster {k}" for k in range(800)]
    classes = [f"a very long class name number {c}" for c in range(27)]
    picture = _decode(confusion_figure(counts, names, classes, mapping, "semantic"))
    assert 300 < picture.shape[0] <= 1200 and 300 < picture.shape[1] <= 1400
    assert _red(picture) > 26 * 4
    plain = _decode(confusion_figure(counts, names, classes, {}, "no mapping"))
    assert _red(plain) == 0


def test_confusion_figure_validates_names() -> None:
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        confusion_figure(np.ones((3, 2), dtype=np.int64), ["a", "b"], ["x", "y"], {}, "t")


# -------------------------------------------------------------------------------- bars


def test_iou_bars_skips_nan_and_grows_with_bars() -> None:
    few = _decode(iou_bars(["a", "b", "c", "d"], [10.0, float("nan"), 80.0, 55.5], "iou"))
    many = _decode(iou_bars([str(k) for k in range(60)], list(np.linspace(0, 100, 60)), "iou"))
    assert few.shape[1] == many.shape[1] == 700
    assert many.shape[0] > few.shape[0] > 100


def test_iou_bars_all_nan_draws_an_empty_chart() -> None:
    assert _decode(iou_bars(["a", "b"], [float("nan")] * 2, "empty")).shape[0] > 100


@pytest.mark.parametrize("values", [[10.0], [10.0, 120.0], [10.0, -1.0]])
def test_iou_bars_rejects_bad_values(values: list[float]) -> None:
    with pytest.raises(ValueError):
        iou_bars(["a", "b"], values, "t")


# ------------------------------------------------------------------------- per image


def test_side_by_side_scales_panels_and_leaves_white_gaps() -> None:
    tall = np.full((100, 50, 3), 10, dtype=np.uint8)
    wide = np.full((50, 100, 3), 200, dtype=np.uint8)
    out = side_by_side([tall, wide], ["tall", "a wide panel with a long title"], height=64)
    strip = out.shape[0] - 64
    assert out.dtype == np.uint8 and strip > 0
    assert out.shape[1] == 32 + 4 + 128
    assert (out[strip:, :32] == 10).all() and (out[strip:, 36:] == 200).all()
    assert (out[:, 32:36] == 255).all()
    with pytest.raises(ValueError):
        side_by_side([tall], ["a", "b"])


def test_color_segments_by_category_with_white_boundaries() -> None:
    segments = np.zeros((8, 8), dtype=np.int64)
    segments[2:, :4], segments[2:, 4:] = 1, 2
    out = color_segments(segments, np.array([-1, 3, 3]))
    assert (out[:2] == 0).all()
    assert (out[5, 1] == out[5, 6]).all() and not (out[5, 1] == 255).all()
    assert (out[5, 3] == 255).all() and (out[5, 4] == 255).all()
    assert (out[2] == 255).all()  # the edge next to void is a boundary too
    own = color_segments(segments)
    assert not (own[5, 1] == own[5, 6]).all() and not (own[5, 3] == 255).all()
    grey = color_segments(segments, np.array([-1, -1, 0]))
    assert (grey[5, 1] == 128).all()


def test_color_segments_validates_categories() -> None:
    with pytest.raises(ValueError, match="length 2"):
        color_segments(np.array([[0, 2]]), np.array([-1, 0]))


def test_blend_leaves_void_as_dimmed_photo() -> None:
    photo = np.full((4, 4, 3), 100, dtype=np.uint8)
    colors = np.zeros((4, 4, 3), dtype=np.uint8)
    colors[:2] = (255, 0, 0)
    out = blend(photo, colors, alpha=0.5)
    assert (out[2:] == 50).all()
    assert (out[0, 0] == (178, 50, 50)).all()
    with pytest.raises(ValueError, match=r"\(4, 3, 3\)"):
        blend(photo, colors[:, :3])
