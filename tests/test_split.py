"""`u2seg split`: the same file, size and seed give the same two files; they are disjoint,
together the whole file, and keep every category and only their images' annotations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from u2seg.cli import main
from u2seg.data.split import SplitError, split_coco, subset_size


def _coco(images: int = 200, per_image: int = 3) -> dict:
    return {
        "info": {"description": "a test set"},
        "images": [{"id": 1000 + 7 * k, "file_name": f"{k}.jpg"} for k in range(images)],
        "annotations": [
            {"id": a, "image_id": 1000 + 7 * (a // per_image), "category_id": 1 + a % 5}
            for a in range(images * per_image)
        ],
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 6)],
    }


def _ids(part: dict) -> set[int]:
    return {im["id"] for im in part["images"]}


def test_a_split_is_disjoint_complete_and_keeps_its_images_annotations() -> None:
    data = _coco()
    subset, rest = split_coco(data, fraction=0.05, seed=3)
    assert len(subset["images"]) == 10 and len(rest["images"]) == 190
    assert not _ids(subset) & _ids(rest)
    assert _ids(subset) | _ids(rest) == _ids(data)
    for part in (subset, rest):
        assert part["categories"] == data["categories"] and part["info"] == data["info"]
        assert {a["image_id"] for a in part["annotations"]} <= _ids(part)
    assert len(subset["annotations"]) + len(rest["annotations"]) == len(data["annotations"])


def test_the_same_seed_gives_the_same_images_and_another_seed_others() -> None:
    data = _coco()
    first = _ids(split_coco(data, count=20, seed=1)[0])
    # The file's order does not matter: the images are drawn from them sorted by id.
    shuffled = {**data, "images": data["images"][::-1]}
    assert _ids(split_coco(shuffled, count=20, seed=1)[0]) == first
    assert _ids(split_coco(data, count=20, seed=2)[0]) != first


@pytest.mark.parametrize(
    ("fraction", "count", "message"),
    [(None, None, "one of"), (0.0, None, "not in"), (1.5, None, "not in"), (None, 500, "has 200")],
)
def test_sizes_that_cannot_be_drawn_are_refused(
    fraction: float | None, count: int | None, message: str
) -> None:
    with pytest.raises(SplitError, match=message):
        subset_size(200, fraction, count)


def test_one_percent_of_a_small_set_is_still_an_image() -> None:
    assert subset_size(50, 0.01, None) == 1


def test_the_command_writes_the_same_files_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "instances_train.json"
    source.write_text(json.dumps(_coco()))
    for out in ("a", "b"):
        argv = ["split", str(source), "--fraction", "0.01", "--seed", "1", "--out"]
        assert main([*argv, str(tmp_path / out)]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["instances_train.1pct.seed1.json", "instances_train.1pct.seed1.rest.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "2 images, 6 annotations" in capsys.readouterr().out
    assert main(["split", str(source), "--count", "999"]) == 2
    assert "--count 999: the file has 200 images" in capsys.readouterr().err
