"""Copy-paste on hand-made samples: masks, boxes and the semantic target stay consistent."""

from __future__ import annotations

import numpy as np
import pytest

from u2seg.ops.copy_paste import THING, boxes_of, copy_paste


def _sample(
    height: int, width: int, boxes: list[tuple[int, int, int, int]], seed: int = 0, stuff: int = 3
) -> dict[str, np.ndarray]:
    """A sample whose instances are the given (x0, y0, x1, y1) rectangles (later ones on top
    of earlier ones, so the masks are disjoint), labels 1, 2, ..."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((len(boxes), height, width), np.uint8)
    taken = np.zeros((height, width), bool)
    for k in reversed(range(len(boxes))):
        x0, y0, x1, y1 = boxes[k]
        masks[k, y0:y1, x0:x1] = 1
        masks[k][taken] = 0
        taken |= masks[k] > 0
    semantic = np.full((height, width), stuff, np.uint8)
    semantic[taken] = THING
    return {
        "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        "masks": masks,
        "boxes": boxes_of(masks > 0),
        "labels": np.arange(1, len(boxes) + 1, dtype=np.int64),
        "semantic": semantic,
    }


def _random_sample(rng: np.random.Generator) -> dict[str, np.ndarray]:
    height, width = (int(v) for v in rng.integers(24, 80, 2))
    boxes = []
    for _ in range(int(rng.integers(0, 5))):
        x0, y0 = int(rng.integers(0, width - 4)), int(rng.integers(0, height - 4))
        boxes.append(
            (x0, y0, int(rng.integers(x0 + 2, width + 1)), int(rng.integers(y0 + 2, height + 1)))
        )
    return _sample(height, width, boxes, seed=int(rng.integers(1 << 30)))


@pytest.mark.parametrize("seed", range(40))
def test_result_is_consistent(seed: int) -> None:
    rng = np.random.default_rng(seed)
    target, source = _random_sample(rng), _random_sample(rng)
    out = copy_paste(target, source, rng)
    height, width = target["image"].shape[:2]
    masks = out["masks"].astype(bool)
    assert out["image"].shape == target["image"].shape and out["semantic"].shape == (height, width)
    assert masks.shape[1:] == (height, width) and len(out["labels"]) == len(masks)
    assert masks.any(axis=(1, 2)).all()  # no empty instance
    assert (masks.sum(axis=0) <= 1).all()  # instances do not overlap
    np.testing.assert_array_equal(out["boxes"], boxes_of(masks))  # boxes from the masks
    assert (out["boxes"][:, [0, 2]] <= width).all() and (out["boxes"][:, [1, 3]] <= height).all()
    assert (out["boxes"] >= 0).all()  # nothing outside the image
    changed = (out["image"] != target["image"]).any(axis=2)
    pasted = masks.any(axis=0) & ~target["masks"].astype(bool).any(axis=0)
    # Pixels change only under instances, and every thing pixel is "thing" in the semantic map.
    assert not (changed & ~masks.any(axis=0)).any()
    assert (out["semantic"][masks.any(axis=0)] == THING).all()
    assert (out["semantic"][~masks.any(axis=0)] == target["semantic"][~masks.any(axis=0)]).all()
    if len(source["masks"]) and pasted.any():
        assert len(out["labels"]) > 0
    # The target is left as it was.
    assert target["masks"].shape[0] == len(target["labels"])


def test_a_paste_covering_half_of_an_existing_mask_is_dropped() -> None:
    target = _sample(40, 40, [(10, 10, 20, 20)])
    source = _sample(40, 40, [(0, 0, 40, 40)])  # one instance, the whole image
    out = copy_paste(target, source, np.random.default_rng(0), scale=(1.0, 1.0))
    assert out is target  # it would cover all of the existing mask: nothing pasted


def test_existing_masks_lose_the_covered_pixels() -> None:
    target = _sample(40, 40, [(0, 0, 40, 40)])  # one instance over the whole image
    source = _sample(10, 10, [(0, 0, 10, 10), (0, 0, 1, 1)])
    out = copy_paste(target, source, np.random.default_rng(0), scale=(1.0, 1.0))
    assert len(out["masks"]) == 2  # 1..n-1 of 2 instances: one pasted
    old, new = out["masks"].astype(bool)
    assert new.sum() in (99, 100) and old.sum() == 1600 - new.sum()
    assert not (old & new).any() and list(out["labels"]) == [1, int(out["labels"][1])]


def test_pastes_one_to_n_minus_one_instances() -> None:
    source = _sample(30, 30, [(0, 0, 5, 5), (10, 0, 15, 5), (0, 10, 5, 15), (10, 10, 15, 15)])
    counts = {
        len(copy_paste(_sample(60, 60, []), source, np.random.default_rng(s))["labels"])
        for s in range(60)
    }
    assert counts == {1, 2, 3}
    single = _sample(30, 30, [(0, 0, 5, 5)])
    assert len(copy_paste(_sample(60, 60, []), single, np.random.default_rng(0))["labels"]) == 1


def test_offsets_cover_both_axes_of_a_target_without_instances() -> None:
    """A 20x20 source instance on a 40 x 100 target: x offsets reach 0..80, y 0..20."""
    source = _sample(20, 20, [(0, 0, 20, 20), (0, 0, 1, 1)])
    lefts, tops = set(), set()
    for s in range(400):
        out = copy_paste(_sample(40, 100, []), source, np.random.default_rng(s), scale=(1.0, 1.0))
        x0, y0 = out["boxes"][0][:2]
        lefts.add(int(x0)), tops.add(int(y0))
    assert max(lefts) > 60 and max(tops) <= 20 and max(tops) > 12


def test_a_source_larger_than_the_target_is_scaled_to_fit() -> None:
    source = _sample(200, 300, [(0, 0, 150, 200), (150, 0, 300, 200)])  # two halves
    out = copy_paste(_sample(40, 50, []), source, np.random.default_rng(1), scale=(1.0, 1.0))
    x0, y0, x1, y1 = out["boxes"][0]
    assert out["masks"].shape == (1, 40, 50)  # the source scaled by 1/6, its width fits
    assert (x1 - x0, y1 - y0) == (25, 33)
