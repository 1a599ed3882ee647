from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from u2seg.data.demo import DemoDataset, demo_image_names, write_demo_dataset

EXPECTED_ANNOTATIONS = {"voc.jpg": 19, "arc2017.jpg": 8, "quokka.jpg": 1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def coco(dataset: DemoDataset) -> COCO:
    return COCO(str(dataset.instances_json))


def test_names_start_with_labelled_photos() -> None:
    names = demo_image_names()
    assert names[:3] == ["voc", "arc2017", "quokka"]
    assert len(names) == len(set(names))


def test_layout_and_counts(dataset: DemoDataset, coco: COCO) -> None:
    assert dataset.root == dataset.instances_json.parent.parent / "images"
    assert dataset.num_images == len(coco.imgs) == len(demo_image_names())
    assert dataset.num_annotations == len(coco.anns) == sum(EXPECTED_ANNOTATIONS.values())
    assert [im["file_name"] for im in coco.dataset["images"]] == [
        f"{n}.jpg" for n in demo_image_names()
    ]
    license_ids = {lic["id"] for lic in coco.dataset["licenses"]}
    assert all(im["license"] in license_ids for im in coco.imgs.values())
    assert all("flickr_url" not in im and "coco_url" not in im for im in coco.imgs.values())


def test_image_files_match_json_sizes(dataset: DemoDataset, coco: COCO) -> None:
    for im in coco.imgs.values():
        with Image.open(dataset.root / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"])
            assert f.mode == "RGB"
    sizes = {im["file_name"]: (im["height"], im["width"]) for im in coco.imgs.values()}
    assert sizes["voc.jpg"] == (375, 500)
    assert sizes["arc2017.jpg"] == (480, 640)


def test_annotation_counts_per_image(coco: COCO) -> None:
    for im in coco.imgs.values():
        expected = EXPECTED_ANNOTATIONS.get(im["file_name"], 0)
        assert len(coco.getAnnIds(imgIds=[im["id"]])) == expected, im["file_name"]
    quokka = next(im for im in coco.imgs.values() if im["file_name"] == "quokka.jpg")
    (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=[quokka["id"]]))
    assert coco.cats[ann["category_id"]]["name"] == "quokka"


def test_annotations_are_consistent_with_masks(coco: COCO) -> None:
    for ann in coco.anns.values():
        im = coco.imgs[ann["image_id"]]
        assert ann["iscrowd"] == 0
        assert ann["category_id"] in coco.cats
        assert isinstance(ann["segmentation"]["counts"], str)
        mask = coco.annToMask(ann)
        assert mask.shape == (im["height"], im["width"])
        assert mask.any()
        assert ann["area"] == int(mask.sum())
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert [x, y, x + w - 1, y + h - 1] == [xs.min(), ys.min(), xs.max(), ys.max()]


def test_voc_categories(coco: COCO) -> None:
    voc = next(im for im in coco.imgs.values() if im["file_name"] == "voc.jpg")
    names = {coco.cats[a["category_id"]]["name"] for a in coco.imgToAnns[voc["id"]]}
    assert names <= {c["name"] for c in coco.cats.values() if c["supercategory"] == "voc"}
    assert "person" in names


def test_deterministic_and_idempotent(tmp_path: Path, dataset: DemoDataset) -> None:
    first = write_demo_dataset(tmp_path)
    json_bytes = first.instances_json.read_bytes()
    assert json_bytes == dataset.instances_json.read_bytes()
    for name in demo_image_names():
        file_name = f"{name}.jpg"
        assert (first.root / file_name).read_bytes() == (dataset.root / file_name).read_bytes()
    mtime = first.instances_json.stat().st_mtime_ns
    again = write_demo_dataset(tmp_path)
    assert again == first
    assert first.instances_json.stat().st_mtime_ns == mtime
    assert first.instances_json.read_bytes() == json_bytes
    assert not list(tmp_path.rglob("*.tmp"))


def test_incomplete_dataset_is_rewritten(tmp_path: Path) -> None:
    first = write_demo_dataset(tmp_path)
    json_bytes = first.instances_json.read_bytes()
    (first.root / "voc.jpg").unlink()
    again = write_demo_dataset(str(tmp_path))
    assert again == first
    assert (first.root / "voc.jpg").is_file()
    assert first.instances_json.read_bytes() == json_bytes


def test_missing_sample_photo_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"astronaut": "skimage/data/not_shipped.png", "chelsea": "skimage/data/chelsea.png"}
    monkeypatch.setattr("u2seg.data.demo._SKIMAGE_FILES", files)
    assert "astronaut" not in demo_image_names()
    assert "chelsea" in demo_image_names()
