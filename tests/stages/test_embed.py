"""Mask embeddings: the crop rules and the stage's input checks (the stage itself runs in
tests/test_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import DEMO_CONFIG as DEMO
from u2seg.artifacts import ArtifactError
from u2seg.config import load_config
from u2seg.stages import embed


def _image_and_mask() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((40, 60, 3), 10, dtype=np.uint8)
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:30, 20:30] = True  # a 20 x 10 box...
    mask[18:23, 20:25] = False  # ...with a notch outside the mask, inside the box, mid-left
    image[mask] = 200
    return image, mask


@pytest.mark.parametrize(
    ("rule", "fill"), [("mean", embed.MEAN_RGB), ("white", (255,) * 3), ("box", (10,) * 3)]
)
def test_crop_rules(rule: str, fill: tuple[int, ...]) -> None:
    image, mask = _image_and_mask()
    # Short side 10 is already 10: no resize; the centre 10 rows (box rows 5..14) are kept,
    # so the notch (box rows 8..12, cols 0..4) sits at crop rows 3..7, cols 0..4.
    crop = embed.instance_crop(image, mask, 10, rule)
    assert crop.shape == (10, 10, 3) and crop.dtype == np.uint8
    assert tuple(crop[5, 1]) == fill
    assert tuple(crop[0, 9]) == (200, 200, 200)
    assert embed.instance_crop(image, mask, 32, rule).shape == (32, 32, 3)


def test_bad_rule_and_empty_mask_are_errors() -> None:
    image, mask = _image_and_mask()
    with pytest.raises(ValueError, match="embed.crop"):
        embed.instance_crop(image, mask, 20, "blur")
    with pytest.raises(ValueError, match="empty mask"):
        embed.instance_crop(image, np.zeros_like(mask), 20, "box")


def test_embed_needs_maskcut(tmp_path: Path) -> None:
    cfg = load_config(DEMO, [f"output={tmp_path}", "data.source=/x"])
    with pytest.raises(ArtifactError, match="u2seg maskcut"):
        embed.run(cfg)


def test_a_thin_mask_is_cropped_before_it_is_resized() -> None:
    image = np.zeros((8, 1200, 3), dtype=np.uint8)
    image[4, 100:1100] = (250, 10, 10)
    mask = np.zeros((8, 1200), dtype=bool)
    mask[4, 100:1100] = True  # 1 x 1000 px: resizing the whole box to short side 480 first
    # would make a 480 x 480000 image (~690 MB) for one crop.
    crop = embed.instance_crop(image, mask, 480, "box")
    assert crop.shape == (480, 480, 3)
    assert (crop == (250, 10, 10)).all()  # the centre pixel of the line, scaled up
    # The kept region is the box's centre square, as "resize then centre-crop" keeps.
    image = np.random.default_rng(0).integers(0, 255, (30, 90, 3), dtype=np.uint8)
    box = np.ones((30, 90), dtype=bool)
    expected = Image.fromarray(np.ascontiguousarray(image[:, 30:60])).resize((15, 15), 3)
    np.testing.assert_array_equal(embed.instance_crop(image, box, 15, "box"), np.asarray(expected))
