"""Foreign annotations are checked before pycocotools decodes them: every malformed row is
rejected with its reason, a good one comes out as the mask the other tool encoded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from u2seg.cli import main
from u2seg.data.mask_import import MaskRejected, pseudo_masks, rle_runs, to_mask_rle


def _runs_of(mask: np.ndarray) -> list[int]:
    """Column-major run lengths, background first (COCO's uncompressed RLE)."""
    flat = mask.flatten(order="F").astype(np.int8)
    cuts = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], [0] * int(flat[0]), cuts, [flat.size]])
    return np.diff(bounds).tolist()


def _compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (60, 41), (1200, 1700)])
def test_runs_of_pycocotools_strings_are_read_back(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.02, 0.5, 1.0):
        mask = rng.random(shape) < density
        if shape[0] > 100:  # long runs: several 5-bit groups and differences below zero
            mask = np.zeros(shape, bool)
            mask[300:900, 200:1500] = density > 0.3
            mask[1000:1010, 5:9] = True
        assert rle_runs(_compressed(mask)["counts"]).tolist() == _runs_of(mask)


@pytest.mark.parametrize(
    ("counts", "reason"),
    [
        ("ab~", "outside COCO's alphabet"),
        ("0P", "ends inside a run"),  # 'P' (32) sets "more groups follow"
    ],
)
def test_unreadable_strings_are_rejected(counts: str, reason: str) -> None:
    with pytest.raises(MaskRejected, match=reason):
        rle_runs(counts)


def test_an_rle_string_that_pycocotools_would_overrun_is_rejected_not_decoded() -> None:
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:7] = True
    good = _compressed(mask)["counts"]
    for counts in (good + "PPPPPP0", good[:3]):
        with pytest.raises(MaskRejected, match="bad RLE"):
            to_mask_rle({"segmentation": {"size": [10, 12], "counts": counts}}, 10, 12)
    # What the check spares: pycocotools decoding the long string corrupts its heap.
    probe = (
        "from pycocotools import mask as m\n"
        f"m.decode({{'size': [10, 12], 'counts': {(good + 'PPPPPP0').encode()!r}}})\n"
    )
    crashed = subprocess.run([sys.executable, "-c", probe], capture_output=True)
    assert crashed.returncode != 0


def test_the_three_segmentation_forms_give_the_same_mask() -> None:
    mask = np.zeros((40, 50), bool)
    mask[10:30, 5:25] = True
    polygon = [[5.0, 10.0, 25.0, 10.0, 25.0, 30.0, 5.0, 30.0]]
    forms = [
        _compressed(mask),
        {"size": [40, 50], "counts": _runs_of(mask)},
        polygon,
    ]
    decoded = [
        mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()})
        for r in (to_mask_rle({"segmentation": f}, 40, 50) for f in forms)
    ]
    assert np.array_equal(decoded[0], mask) and np.array_equal(decoded[1], mask)
    # The polygon covers the square's pixels (pycocotools rasterises its edges in).
    assert np.logical_and(decoded[2], mask).sum() >= 0.9 * mask.sum()


@pytest.mark.parametrize(
    ("ann", "reason"),
    [
        ({"segmentation": [[1, 1, 5, 5]]}, "2 points"),
        ({"segmentation": [[1, 1, 5, 5, 9]]}, "5 coordinates"),
        ({"segmentation": [[1, 1, 90, 1, 5, 5]]}, "polygon outside the 50x40"),
        ({"segmentation": []}, "empty polygon list"),
        ({"segmentation": [["a", 1, 2, 3, 4, 5]]}, "not a list of numbers"),
        ({"segmentation": {"size": [40, 60], "counts": "0"}}, "RLE of 60x40 for a 50x40"),
        ({"segmentation": {"size": [40, 50], "counts": [10, -2, 2000]}}, "negative run"),
        ({"segmentation": {"size": [40, 50], "counts": [10, 20]}}, "cover 30 pixels"),
        ({"segmentation": {"size": [40, 50], "counts": [1.5, 1998.5]}}, "whole numbers"),
        ({"segmentation": {"size": "40x50", "counts": "0"}}, "not \\[height, width\\]"),
        ({"segmentation": [[1, 1, 5, 1, 5, 5]], "bbox": [40, 30, 20, 5]}, "bbox .* outside"),
        ({"segmentation": [[1, 1, 5, 1, 5, 5]], "bbox": [1, 1]}, "not \\[x, y, width"),
        ({"segmentation": [[1, 1, 5, 1, 5, 5]], "score": "high"}, "score 'high'"),
        ({"segmentation": [[1, 1, 5, 1, 5, 5]], "iscrowd": 1}, "crowd"),
        ({"bbox": [1, 1, 4, 4]}, "no segmentation"),
        ([1, 2], "not an object"),
    ],
)
def test_malformed_annotations_are_rejected_with_their_reason(ann: object, reason: str) -> None:
    with pytest.raises(MaskRejected, match=reason):
        to_mask_rle(ann, 40, 50)


def test_masks_rank_by_score_and_the_unscored_take_their_rank_s_score() -> None:
    def square(x: int) -> list[list[float]]:
        return [[x, 0, x + 4, 0, x + 4, 4, x, 4]]

    anns = [
        {"id": 1, "segmentation": square(0)},
        {"id": 2, "segmentation": square(10), "score": 0.2},
        {"id": 3, "segmentation": [[0, 0, 1, 1]]},
        {"id": 4, "segmentation": square(20), "score": 0.9},
        {"id": 5, "segmentation": [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]},  # no pixel
    ]
    masks, rejected = pseudo_masks(anns, 10, 30)
    assert [m["score"] for m in masks] == [0.9, 0.2, pytest.approx(1 / 3)]
    assert [m["bbox"][0] for m in masks] == [20, 10, 0]
    assert all(m["category_id"] == 1 and m["iscrowd"] == 0 for m in masks)
    assert rejected == [(3, "a polygon of 2 points (3 at least)"), (5, "an empty mask")]


@pytest.mark.parametrize(
    ("images", "reason"),
    [
        ([{"id": "a", "file_name": "p.png"}], "non-integer id"),
        ([{"id": 1, "file_name": "p.png"}, {"id": 1, "file_name": "q.png"}], "id 1 is used twice"),
        ([{"id": 1}], "needs an 'id' and a 'file_name'"),
        ([{"id": 1, "file_name": "train/p.png"}], "none of its 1 images is among"),
        ([], "lists no images"),
    ],
)
def test_a_mask_file_that_names_no_photo_is_refused_before_anything_runs(
    tmp_path: Path, images: list, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 6)).save(photos / "p.png")
    source = tmp_path / "masks.json"
    source.write_text(json.dumps({"images": images, "annotations": []}))
    out = tmp_path / "run"
    argv = ["import-masks", str(source), f"data.source={photos}", f"output={out}"]
    assert main(argv) == 2
    assert reason in capsys.readouterr().err
    assert not (out / "maskcut").exists()  # refused before the stage wrote anything
