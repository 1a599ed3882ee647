"""The maskcut stage end to end on the real demo photos: COCO output, quality, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from tests.helpers import demo_config, write_bad_files
from u2seg.artifacts import StageDir
from u2seg.config import MaskCutConfig, to_dict
from u2seg.data.coco import rle_to_mask
from u2seg.data.demo import write_demo_dataset
from u2seg.data.images import SquareImages, list_images
from u2seg.ops import maskcut as maskcut_ops
from u2seg.ops.coco_eval import best_iou
from u2seg.stages._image_loop import plan_shards
from u2seg.stages.maskcut import check_options, run, shard_tallies, to_shard_rows
from u2seg.workers.maskcut import MaskCutWorker, cut_options, refine_masks


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The VOC photo and the quokka with their ground truth, plus two broken files."""
    demo = write_demo_dataset(tmp_path_factory.mktemp("demo"))
    folder = tmp_path_factory.mktemp("photos")
    for name in ("voc.jpg", "quokka.jpg"):
        shutil.copyfile(demo.root / name, folder / name)
    bad = write_bad_files(folder / "bad")
    for name in ("big.png", "empty.jpg"):
        (folder / "bad" / name).unlink()
    gt = json.loads(demo.instances_json.read_text())
    return folder, {"gt": gt, "bad": bad}


@pytest.mark.slow
@pytest.mark.ray
def test_stage_writes_coco_finds_the_quokka_and_resumes_identically(
    local_ray: None, photos: tuple[Path, dict], tmp_path: Path, weights_cache: Path
) -> None:
    folder, info = photos
    out = tmp_path / "run"
    manifest = run(demo_config(folder, out, weights_cache))
    assert manifest["counts"]["images"] == 4
    assert manifest["counts"]["errors"] == 2
    # The refinement that really ran ("auto" resolved: the torch dense CRF).
    assert manifest["refinement"] == {"torch": 2}
    # Every cut's eigensolver converged on the real photos; the count is in the manifest.
    assert manifest["counts"]["unconverged_masks"] == 0
    assert {e["file_name"] for e in manifest["errors"]["first"]} == {
        "bad/text.png",
        "bad/truncated.jpg",
    }
    path = out / "maskcut" / "instances.json"
    coco = COCO(str(path))
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "fg", "supercategory": "fg"}]
    images = {im["file_name"]: im for im in coco.dataset["images"]}
    assert set(images) == {"quokka.jpg", "voc.jpg"}
    assert (images["quokka.jpg"]["width"], images["quokka.jpg"]["height"]) == (960, 643)
    assert (images["voc.jpg"]["width"], images["voc.jpg"]["height"]) == (500, 375)
    anns = coco.dataset["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    # The demo's candidate pool: each image's masks best first, by their (positive) scores.
    for image_id in coco.imgs:
        scores = [a["score"] for a in anns if a["image_id"] == image_id]
        assert scores and scores == sorted(scores, reverse=True) and scores[-1] > 0
    for ann in anns:
        assert isinstance(ann["segmentation"]["counts"], str)
        image = coco.imgs[ann["image_id"]]
        mask = coco.annToMask(ann)
        assert mask.shape == (image["height"], image["width"])
        assert mask.sum() == ann["area"] > 0
    # The quokka: the best pseudo mask covers its polygon.
    gt_quokka = next(a for a in info["gt"]["annotations"] if a["image_id"] == 3)
    quokka_id = images["quokka.jpg"]["id"]
    masks = [coco.annToMask(a).astype(bool) for a in anns if a["image_id"] == quokka_id]
    assert best_iou(rle_to_mask(gt_quokka["segmentation"]), masks) > 0.8

    # Killed half way: manifest, merged JSON and one shard gone; the re-run redoes only it.
    clean = path.read_bytes()
    for name in ("manifest.json", "instances.json", "part-00001.parquet"):
        (out / "maskcut" / name).unlink()
    manifest = run(demo_config(folder, out, weights_cache))
    assert manifest["counts"]["resumed_shards"] == 1
    assert path.read_bytes() == clean


def test_every_maskcut_option_comes_from_thedemo_config() -> None:
    cfg = MaskCutConfig(center=True, tau_quantile=0.3, drop_covered=True, max_ncut=0.7)
    options = cut_options(cfg)
    assert options == {
        "center": True,
        "tau_quantile": 0.3,
        "foreground": "corners",
        "max_ncut": 0.7,
        "mask_rejected": False,
        "drop_covered": True,
    }


def test_options_are_checked_before_work() -> None:
    with pytest.raises(ValueError, match="maskcut.feature"):
        check_options(MaskCutConfig(feature="values"))
    with pytest.raises(ValueError, match="n_masks"):
        check_options(MaskCutConfig(n_masks=0))
    with pytest.raises(ValueError, match="backend"):
        check_options(MaskCutConfig(crf="magic"))


def test_refine_masks_returns_original_size() -> None:
    image = np.zeros((56, 56, 3), dtype=np.uint8)
    image[14:42, 14:42] = 255
    patch = np.zeros((4, 4), dtype=bool)
    patch[1:3, 1:3] = True
    empty = np.zeros((4, 4), dtype=bool)
    full, index = refine_masks(image, [patch, empty], (30, 60), MaskCutConfig(crf="none"))
    assert index == [0]  # the empty one dropped
    assert full.shape == (1, 30, 60) and full.dtype == torch.bool
    assert full[0, 15, 30] and not full[0, 0, 0]


def test_cuts_whose_eigensolver_did_not_converge_are_recorded_and_counted(
    photos: tuple[Path, dict], tmp_path: Path, weights_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker in this process running robust MaskCut rounds, with a tolerance no residual
    # can meet: every cut is the best Ritz vector after the last restart. Each mask says so;
    # the stage counts them.
    folder, _ = photos
    rounds = ["discovery=rounds", "n_masks=3", "center=true", "tau_quantile=0.5"]
    cfg = demo_config(folder, tmp_path / "run", weights_cache, *(f"maskcut.{o}" for o in rounds))
    monkeypatch.setattr(maskcut_ops, "FIEDLER_TOL", -1.0)
    refs = plan_shards(list_images(str(folder)), 8)
    batch = {name: refs.column(name).to_numpy(zero_copy_only=False) for name in refs.column_names}
    batch = SquareImages(cfg.maskcut.image_size, cfg.data.max_pixels)(batch)
    worker = MaskCutWorker(to_dict(cfg.backbone), to_dict(cfg.maskcut))
    table = to_shard_rows(worker(batch))
    flags = table.column("converged").to_pylist()
    assert [len(f) for f in flags] == table.column("num_masks").to_pylist()
    assert sum(table.column("num_masks").to_pylist()) >= 2
    assert not any(flag for f in flags for flag in f)
    # Rounds rank each image's masks in discovery order: 1, 1/2, 1/3, ...
    for row in table.column("annotations").to_pylist():
        scores = [a["score"] for a in json.loads(row)]
        assert scores == [1 / (1 + k) for k in range(len(scores))]
    stage = StageDir(str(tmp_path / "run"), "maskcut")
    stage.write_table(StageDir.shard_name(0), table.drop_columns(["shard", "order"]), "x")
    assert shard_tallies(stage)[1] == sum(table.column("num_masks").to_pylist())
