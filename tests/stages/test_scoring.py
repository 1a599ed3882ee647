"""Evaluation on hand-made scenes whose scores are known (docs/method.md stage 7)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.evalcases import (
    GT_CATEGORIES,
    IDENTITY,
    PRED_CATEGORIES,
    SWAPPED,
    relabel,
    scene,
    segment_info,
    write_ground_truth,
    write_prediction,
)
from u2seg.config import EvaluateConfig
from u2seg.data.groundtruth import (
    Category,
    GroundTruthError,
    load_cityscapes,
    load_coco,
    load_coco_panoptic,
    load_cocostuff27,
    restrict,
    stuff_supercategories,
    write_coco_panoptic,
)
from u2seg.data.predictions import PredictionError, load_predictions
from u2seg.ops.coco_eval import SUMMARY, evaluate_images
from u2seg.stages._scoring import EvaluationError, Maps, Settings
from u2seg.stages.evaluate import evaluate, load_ground_truth


def _score(tmp: Path, gt_scenes, pred_scenes, maps: Maps | None = None, **kw):
    gt = load_coco_panoptic(str(write_ground_truth(tmp / "gt", gt_scenes)))
    pred = load_predictions("pred", str(write_prediction(tmp / "pred", pred_scenes)))
    return evaluate(gt, pred, Settings(), maps, **kw)


def _all_scores(metrics: dict) -> list[float]:
    return [
        *(metrics[group][t][k] for group in ("class_agnostic", "instance")
          for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75")),
        metrics["semantic"]["hungarian"]["mIoU"],
        metrics["semantic"]["hungarian"]["pixel_accuracy"],
        *(metrics["panoptic"][g][k] for g in ("All", "Things", "Stuff")
          for k in ("PQ", "SQ", "RQ")),
    ]  # fmt: skip


@pytest.mark.parametrize("permutation", [IDENTITY, SWAPPED], ids=["same ids", "permuted ids"])
def test_perfect_prediction_scores_100(tmp_path: Path, permutation: dict[int, int]) -> None:
    scenes = [scene(i, seed=i) for i in range(1, 6)]
    metrics, maps, _ = _score(tmp_path, scenes, relabel(scenes, permutation))
    assert _all_scores(metrics) == pytest.approx([100.0] * len(_all_scores(metrics)))
    inverse = {v: k for k, v in permutation.items()}
    assert maps.instance == {1: inverse[1], 2: inverse[2]}
    assert maps.semantic_hungarian == {p: inverse[p] - 1 for p in (1, 2, 3, 4)}
    assert maps.stuff == {3: inverse[3], 4: inverse[4]}
    assert metrics["images"]["scored"] == 5


def test_panoptic_prediction_without_instances_json(tmp_path: Path) -> None:
    scenes = [scene(i, seed=i) for i in range(1, 4)]
    gt = load_coco_panoptic(str(write_ground_truth(tmp_path / "gt", scenes)))
    folder = write_prediction(tmp_path / "pred", relabel(scenes, SWAPPED))
    (folder / "instances.json").unlink()  # instances come from the thing segments
    pred = load_predictions("pred", str(folder))
    metrics, maps, _ = evaluate(gt, pred, Settings())
    assert maps.instance == {1: 2, 2: 1}
    assert _all_scores(metrics) == pytest.approx([100.0] * len(_all_scores(metrics)))


def test_wrong_prediction_scores_below_100(tmp_path: Path) -> None:
    scenes = [scene(i, seed=i) for i in range(1, 4)]
    # Every thing predicted as the sky's cluster: no instance class survives the vote.
    broken = relabel(scenes, {1: 4, 2: 4, 3: 3, 4: 4})
    metrics, maps, _ = _score(tmp_path, scenes, broken)
    assert maps.instance == {}
    assert metrics["semantic"]["hungarian"]["mIoU"] < 100
    assert metrics["panoptic"]["Things"]["PQ"] == 0.0


def test_split_segment_gives_the_pq_of_the_definition(tmp_path: Path) -> None:
    segments = np.full((40, 40), 1, dtype=np.int64)  # grass
    segments[10:30, 10:30] = 2  # one cat, 20 x 20
    gt_info = [segment_info(segments, 1, 3), segment_info(segments, 2, 1)]
    entry = {"id": 1, "file_name": "a.jpg", "height": 40, "width": 40}
    split = segments.copy()
    split[26:30, 10:30] = 3  # the cat's bottom 4 rows become a second instance
    pred_info = [segment_info(split, 1, 3), segment_info(split, 2, 1), segment_info(split, 3, 1)]
    metrics, maps, _ = _score(tmp_path, [(entry, segments, gt_info)], [(entry, split, pred_info)])
    assert maps.instance == {1: 1}  # the big part votes (box IoU 0.8 > 0.7)
    # The cat: one TP of IoU 0.8 and one FP -> PQ = 0.8 / (1 + 0.5), SQ 0.8, RQ 2/3.
    cat = metrics["panoptic"]["per_class"]["cat"]
    assert (cat["tp"], cat["fp"], cat["fn"]) == (1, 1, 0)
    assert cat["PQ"] == pytest.approx(100 * 0.8 / 1.5)
    assert cat["SQ"] == pytest.approx(80.0) and cat["RQ"] == pytest.approx(100 / 1.5)
    assert metrics["panoptic"]["Stuff"]["PQ"] == pytest.approx(100.0)
    assert metrics["panoptic"]["All"]["PQ"] == pytest.approx((100 * 0.8 / 1.5 + 100) / 2)


def test_mapping_fit_on_one_split_scores_another(tmp_path: Path) -> None:
    split_a = [scene(i, seed=i) for i in range(1, 4)]
    split_b = [scene(i, seed=10 + i) for i in range(1, 4)]
    _, maps_a, _ = _score(tmp_path / "a", split_a, relabel(split_a, SWAPPED))
    saved = Maps.from_json(json.loads(json.dumps(maps_a.to_json())))
    assert saved == maps_a
    same, _, _ = _score(tmp_path / "b", split_b, relabel(split_b, SWAPPED), saved)
    assert same["panoptic"]["All"]["PQ"] == pytest.approx(100.0)
    # Split B's clusters are permuted otherwise: A's map is wrong there, B's own is right.
    other = relabel(split_b, IDENTITY)
    applied, _, _ = _score(tmp_path / "c", split_b, other, saved)
    fitted, _, _ = _score(tmp_path / "d", split_b, other)
    assert applied["panoptic"]["All"]["PQ"] == 0.0
    assert applied["semantic"]["hungarian"]["mIoU"] == 0.0
    assert fitted["panoptic"]["All"]["PQ"] == pytest.approx(100.0)


def test_crowd_regions_and_void_pixels_are_handled_as_coco(tmp_path: Path) -> None:
    segments = np.full((40, 40), 1, dtype=np.int64)  # grass
    segments[:8] = 0  # void strip
    segments[10:20, 5:15] = 2  # a cat
    segments[25:35, 20:38] = 3  # a crowd of cats
    gt_info = [segment_info(segments, 1, 3), segment_info(segments, 2, 1),
               segment_info(segments, 3, 1, crowd=1)]  # fmt: skip
    entry = {"id": 1, "file_name": "a.jpg", "height": 40, "width": 40}
    pred = segments.copy()
    pred[:8] = 1  # grass predicted on the void strip: ignored
    pred[25:35, 20:38] = 4  # one predicted cat over the crowd: neither TP nor FP
    pred_info = [segment_info(pred, 1, 3), segment_info(pred, 2, 1), segment_info(pred, 4, 1)]
    metrics, _, _ = _score(
        tmp_path, [(entry, segments, gt_info)], [(entry, pred, pred_info)],
        Maps(instance={1: 1}, stuff={3: 3}, semantic_hungarian={1: 0, 3: 2}),
    )  # fmt: skip
    cat = metrics["panoptic"]["per_class"]["cat"]
    assert (cat["tp"], cat["fp"], cat["fn"]) == (1, 0, 0)
    assert metrics["panoptic"]["per_class"]["grass"]["PQ"] == pytest.approx(100.0)
    # COCOeval: the detection on the crowd is ignored, so AP stays 100.
    assert metrics["instance"]["segm"]["AP"] == pytest.approx(100.0)
    assert metrics["semantic"]["hungarian"]["pixel_accuracy"] == pytest.approx(100.0)


def test_chunked_cocoeval_equals_one_cocoeval(tmp_path: Path) -> None:
    scenes = [scene(i, seed=i) for i in range(1, 9)]
    rng = np.random.default_rng(0)
    scores = {(e["id"], s["id"]): float(rng.uniform()) for e, _, info in scenes for s in info}
    shifted = []
    for entry, segments, info in scenes:  # move the things a little: IoUs between 0 and 1
        moved = segments.copy()
        moved[segments >= 3] = 2
        for s in info:
            if s["id"] >= 3:
                dy, dx = rng.integers(-4, 5, size=2)
                moved[np.roll(segments == s["id"], (dy, dx), axis=(0, 1))] = s["id"]
        infos = [segment_info(moved, s["id"], s["category_id"]) for s in info
                 if (moved == s["id"]).any()]  # fmt: skip
        shifted.append((entry, moved, infos))
    folder = write_prediction(tmp_path / "pred", shifted, PRED_CATEGORIES, scores)
    gt_folder = write_ground_truth(tmp_path / "gt", scenes)
    gt = load_coco_panoptic(str(gt_folder))
    pred = load_predictions("p", str(folder))
    sizes = [(im.image_id, 64, 64) for im in gt.images]
    truth = [gt.instances(im) for im in gt.images]
    dets = [list(pred.images[im.key].annotations) for im in gt.images]
    whole = COCO()
    whole.dataset = {"images": [{"id": i, "height": 64, "width": 64} for i, _, _ in sizes],
                     "categories": [{"id": 1}, {"id": 2}],
                     "annotations": [{**a, "id": n} for n, a in
                                     enumerate((a for t in truth for a in t), 1)]}  # fmt: skip
    whole.createIndex()
    results = whole.loadRes(copy.deepcopy([d for ds in dets for d in ds]))
    reference = COCOeval(whole, results, "segm")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    merged = evaluate_images(sizes[:3], truth[:3], dets[:3], [1, 2], "segm")
    merged.merge(evaluate_images(sizes[3:], truth[3:], dets[3:], [1, 2], "segm"))
    ours = merged.summary()
    assert 0 < ours["AP"] < 100
    expected = [v * 100 if v >= 0 else math.nan for v in reference.stats[:6]]
    assert [ours[k] for k in SUMMARY] == pytest.approx(expected, nan_ok=True)
    recall = [v * 100 if v >= 0 else math.nan for v in reference.stats[6:9]]
    assert [ours[k] for k in ("AR1", "AR10", "AR100")] == pytest.approx(recall, nan_ok=True)
    # Per category: COCOeval's precision of that category, all areas, maxDets 100.
    precision = reference.eval["precision"][:, :, :, 0, -1]
    for k, cat in enumerate((1, 2)):
        p = precision[:, :, k]
        assert ours["per_category"][cat] == pytest.approx(100 * p[p > -1].mean())


def test_cityscapes_ids_become_panoptic_with_crowd_and_void(tmp_path: Path) -> None:
    ids = np.zeros((8, 16), dtype=np.uint16)  # 0: unlabelled -> void
    ids[:, :4] = 7  # road
    ids[:, 4:8] = 26001  # car instance 1
    ids[:, 8:12] = 26  # a group of cars: crowd
    ids[:, 12:] = 4  # static: not evaluated -> void
    folder = tmp_path / "gtFine" / "val" / "aachen"
    folder.mkdir(parents=True)
    Image.fromarray(ids).save(folder / "aachen_000000_000019_gtFine_instanceIds.png")
    gt = load_cityscapes(str(tmp_path / "gtFine" / "val"))
    (image,) = gt.images
    assert image.key == "aachen_000000_000019"
    segments, info = gt.panoptic(image)
    assert info == {7: (7, False), 26001: (26, False), 26: (26, True)}
    assert (segments[:, 12:] == 0).all()
    semantic = gt.semantic(image)
    assert (semantic[:, :4] == 0).all() and (semantic[:, 4:12] == 13).all()
    assert (semantic[:, 12:] == 255).all()
    assert [a["iscrowd"] for a in gt.instances(image)] == [1, 0]
    assert len(gt.thing_ids) == 8 and len(gt.stuff_ids) == 11


def test_cocostuff_labels_map_to_27_classes(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 91, 181], [255, 105, 156, 43]], dtype=np.uint8)
    tmp_path.joinpath("labels").mkdir()
    Image.fromarray(labels).save(tmp_path / "labels" / "000000000139.png")
    gt = load_cocostuff27(str(tmp_path / "labels"))
    coarse = gt.semantic(gt.images[0])
    names = [gt.semantic_classes[c] if c != 255 else None for c in coarse.ravel()]
    assert names == ["person", "vehicle", "textile", "solid",
                     None, "sky", "sky", "kitchen"]  # fmt: skip
    Image.fromarray(np.array([[200]], dtype=np.uint8)).save(tmp_path / "labels" / "bad.png")
    bad = next(im for im in load_cocostuff27(str(tmp_path / "labels")).images if im.key == "bad")
    with pytest.raises(GroundTruthError, match=r"bad\.png.*\[200\]"):
        gt.semantic(bad)


def test_missing_ground_truth_png_is_named(tmp_path: Path) -> None:
    scenes = [scene(1, seed=1), scene(2, seed=2)]
    gt = load_coco_panoptic(str(write_ground_truth(tmp_path / "gt", scenes)))
    pred = load_predictions("pred", str(write_prediction(tmp_path / "pred", scenes)))
    (tmp_path / "gt" / "panoptic" / "img002.png").unlink()
    with pytest.raises(GroundTruthError, match=r"not found: .*img002\.png"):
        evaluate(gt, pred, Settings())


def test_mismatched_sizes_are_named(tmp_path: Path) -> None:
    entry, segments, info = scene(1, seed=1)
    small = segments[:32, :32]
    infos = [segment_info(small, s["id"], s["category_id"]) for s in info
             if (small == s["id"]).any()]  # fmt: skip
    with pytest.raises(EvaluationError, match=r"img001.*32x32.*64x64"):
        _score(tmp_path, [(entry, segments, info)], [({**entry, "height": 32, "width": 32},
                                                       small, infos)])  # fmt: skip


def test_unknown_category_ids_are_named(tmp_path: Path) -> None:
    entry, segments, info = scene(1, seed=1)
    bad_gt = [(entry, segments, [{**s, "category_id": 99} if s["id"] == 1 else s for s in info])]
    json_path = write_ground_truth(tmp_path / "gt", bad_gt)
    with pytest.raises(GroundTruthError, match=r"panoptic\.json: segment 1 .*category id 99"):
        load_coco_panoptic(str(json_path))
    folder = tmp_path / "pred"
    write_coco_panoptic(folder / "panoptic.json", bad_gt, PRED_CATEGORIES)
    with pytest.raises(PredictionError, match=r"unknown category id 99"):
        load_predictions("p", str(folder))


def test_supercategory_level_groups_classes(tmp_path: Path) -> None:
    json_path = write_ground_truth(tmp_path / "gt", [scene(1, seed=1)])
    gt = load_coco_panoptic(str(json_path), semantic_level="supercategory")
    assert gt.semantic_classes == ("animal", "plant", "sky")
    assert gt.semantic_of == {1: 0, 2: 0, 3: 1, 4: 2}
    assert [c["name"] for c in GT_CATEGORIES] == ["cat", "dog", "grass", "sky"]


def test_image_list_restricts_the_set_and_names_unknown_images(tmp_path: Path) -> None:
    gt = load_coco_panoptic(str(write_ground_truth(tmp_path / "gt", [scene(1, 1), scene(2, 2)])))
    listed = tmp_path / "list.txt"
    listed.write_text("# curated\nimg002.jpg\n")
    assert [im.key for im in restrict(gt, str(listed)).images] == ["img002"]
    listed.write_text("img002\nimg404\n")
    with pytest.raises(GroundTruthError, match=r"list\.txt: 1 images have no ground truth.*img404"):
        restrict(gt, str(listed))


def test_panoptic_json_image_without_annotation_is_named(tmp_path: Path) -> None:
    json_path = write_ground_truth(tmp_path / "gt", [scene(1, 1), scene(2, 2)])
    data = json.loads(json_path.read_text())
    data["annotations"] = data["annotations"][:1]
    json_path.write_text(json.dumps(data))
    with pytest.raises(GroundTruthError, match=r"panoptic\.json: image 2 \(img002\.jpg\) has no"):
        load_coco_panoptic(str(json_path))


def test_stuff_map_is_per_category_whatever_the_semantic_level(tmp_path: Path) -> None:
    scenes = [scene(i, seed=i) for i in range(1, 4)]
    json_path = write_ground_truth(tmp_path / "gt", scenes)
    data = json.loads(json_path.read_text())
    for c in data["categories"]:
        c["supercategory"] = "outdoor" if not c["isthing"] else "animal"
    json_path.write_text(json.dumps(data))
    gt = load_coco_panoptic(str(json_path), semantic_level="supercategory")
    assert gt.semantic_classes == ("animal", "outdoor")
    pred = load_predictions("p", str(write_prediction(tmp_path / "pred", relabel(scenes, SWAPPED))))
    metrics, maps, _ = evaluate(gt, pred, Settings())
    assert maps.stuff == {3: 4, 4: 3}  # grass and sky apart, though one semantic class
    assert metrics["panoptic"]["Stuff"]["PQ"] == pytest.approx(100.0)
    assert metrics["semantic"]["hungarian"]["pixel_accuracy"] < 100  # 4 clusters, 2 classes
    assert metrics["semantic"]["majority"]["pixel_accuracy"] == pytest.approx(100.0)


def test_each_label_map_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scenes = [scene(i, seed=i) for i in range(1, 6)]
    gt = load_coco_panoptic(str(write_ground_truth(tmp_path / "gt", scenes)))
    pred = load_predictions("p", str(write_prediction(tmp_path / "pred", scenes)))
    reads: list[str] = []
    for cls in (type(gt), type(pred)):
        original = cls.panoptic

        def counted(self, image, _original=original, _name=cls.__name__, **kwargs):
            reads.append(f"{_name}:{image.key}")
            return _original(self, image, **kwargs)

        monkeypatch.setattr(cls, "panoptic", counted)
    metrics, _, _ = evaluate(gt, pred, Settings(), chunk_size=2)
    assert metrics["panoptic"]["All"]["PQ"] == pytest.approx(100.0)
    assert sorted(reads) == sorted(f"{k}:img{i:03d}" for i in range(1, 6)
                                   for k in ("GroundTruth", "Predictions"))  # fmt: skip


def test_coco_instances_ground_truth_scores_ap_only(tmp_path: Path) -> None:
    scenes = [scene(i, seed=i) for i in range(1, 4)]
    truth = write_prediction(tmp_path / "gt", scenes, GT_CATEGORIES)  # its instances.json
    data = json.loads((truth / "instances.json").read_text())
    for ann in data["annotations"]:
        del ann["score"]
    (truth / "instances.json").write_text(json.dumps(data))
    gt = load_coco(str(truth / "instances.json"))
    pred = load_predictions("p", str(write_prediction(tmp_path / "pred", relabel(scenes, SWAPPED))))
    metrics, maps, _ = evaluate(gt, pred, Settings())
    assert set(metrics) == {"class_agnostic", "instance", "images"}  # no semantic, no PQ
    assert maps.instance == {1: 2, 2: 1}
    assert metrics["instance"]["segm"]["AP"] == pytest.approx(100.0)
    assert metrics["instance"]["bbox"]["AP50"] == pytest.approx(100.0)
    assert metrics["instance"]["segm"]["per_class"] == pytest.approx({"cat": 100.0, "dog": 100.0})


def test_two_predicted_images_of_one_name_are_refused(tmp_path: Path) -> None:
    folder = write_prediction(tmp_path / "pred", [scene(1, seed=1), scene(2, seed=2)])
    data = json.loads((folder / "instances.json").read_text())
    data["images"][1]["file_name"] = "other/img001.jpg"
    (folder / "panoptic.json").unlink()
    (folder / "instances.json").write_text(json.dumps(data))
    with pytest.raises(PredictionError, match=r"img001\.jpg and other/img001\.jpg have the same"):
        load_predictions("p", str(folder))


@pytest.mark.parametrize("side", ["gt", "pred"])
def test_segment_ids_without_info_are_named(tmp_path: Path, side: str) -> None:
    entry, segments, info = scene(1, seed=1)
    broken = (entry, segments, [s for s in info if s["id"] != 2])  # grass has no entry
    whole = scene(1, seed=1)
    gt_scenes, pred_scenes = ([broken], [whole]) if side == "gt" else ([whole], [broken])
    gt = load_coco_panoptic(str(write_ground_truth(tmp_path / "gt", gt_scenes)))
    pred = load_predictions("p", str(write_prediction(tmp_path / "pred", pred_scenes)))
    folder = "gt" if side == "gt" else "pred"
    with pytest.raises(ValueError, match=rf"{folder}/panoptic/img001\.png: segment ids \[2\]"):
        evaluate(gt, pred, Settings())


WALLS = [
    {"id": 1, "name": "person", "isthing": 1, "supercategory": "person"},
    {"id": 2, "name": "wall-brick", "isthing": 0, "supercategory": "wall"},
    {"id": 3, "name": "wall-stone", "isthing": 0, "supercategory": "wall"},
]
ONE_WALL = [
    {"id": 1, "name": "thing-1", "isthing": 1},
    {"id": 2, "name": "stuff-0", "isthing": 0},
]


def _walls(tmp: Path, walls: list[list[int]], level: str) -> dict:
    """Images of a person on walls (`walls`: the wall category of each half, top then
    bottom, per image) scored against a perfect person and one wall cluster."""
    gt_scenes, pred_scenes = [], []
    for k, (top, bottom) in enumerate(walls, start=1):
        segments = np.full((64, 64), 2, dtype=np.int64)
        segments[:32] = 1
        segments[20:44, 24:40] = 3  # the person
        cats = {1: top, 2: bottom, 3: 1}
        if top == bottom:
            segments[segments == 2] = 1
        info = [segment_info(segments, s, cats[s]) for s in (1, 2, 3) if (segments == s).any()]
        entry = {"id": k, "file_name": f"wall{k}.jpg", "height": 64, "width": 64}
        gt_scenes.append((entry, segments, info))
        pred = np.where(segments == 3, 2, 1)
        pred_scenes.append((entry, pred, [segment_info(pred, 1, 2), segment_info(pred, 2, 1)]))
    (tmp / "gt").mkdir(parents=True)
    write_coco_panoptic(tmp / "gt" / "panoptic.json", gt_scenes, WALLS)
    gt = load_coco_panoptic(str(tmp / "gt" / "panoptic.json"), panoptic_level=level)
    pred = load_predictions("p", str(write_prediction(tmp / "pred", pred_scenes, ONE_WALL)))
    return evaluate(gt, pred, Settings())[0]["panoptic"]


def test_pq_at_the_supercategory_level_scores_stuff_as_u2seg(tmp_path: Path) -> None:
    # wall-brick in one image, wall-stone in the other, both "wall".
    per_category = _walls(tmp_path / "c", [[2, 2], [3, 3]], "category")
    # One wall cluster matches wall-brick: TP there, FP + FN (wall-stone) in image 2.
    assert per_category["Stuff"]["PQ"] == pytest.approx(100 / 1.5 / 2)
    assert per_category["level"] == "category"
    per_super = _walls(tmp_path / "s", [[2, 2], [3, 3]], "supercategory")
    assert per_super["Stuff"]["PQ"] == pytest.approx(100.0)
    assert per_super["Things"]["PQ"] == pytest.approx(100.0)
    assert per_super["level"] == "supercategory"
    assert set(per_super["per_class"]) == {"person", "wall"}


def test_stuff_of_one_supercategory_in_an_image_is_one_segment(tmp_path: Path) -> None:
    # Brick above, stone below, one predicted wall over both: two half-overlaps at the
    # category level (IoU < 0.5 each), one whole match at the supercategory level.
    assert _walls(tmp_path / "c", [[2, 3]], "category")["Stuff"]["PQ"] == 0.0
    assert _walls(tmp_path / "s", [[2, 3]], "supercategory")["Stuff"]["PQ"] == pytest.approx(100)


def test_supercategory_groups_number_after_the_categories() -> None:
    cats = [Category(1, "person", True, "person"), Category(7, "wall-brick", False, "wall"),
            Category(5, "sky", False, ""), Category(9, "wall-stone", False, "wall")]  # fmt: skip
    groups, grouped = stuff_supercategories(cats)
    assert groups == {7: 10, 5: 11, 9: 10}
    assert [(c.id, c.name, c.isthing) for c in grouped] == [(10, "wall", False), (11, "sky", False)]


def test_panoptic_level_needs_supercategories(tmp_path: Path) -> None:
    cfg = EvaluateConfig(gt_format="cityscapes", gt_cityscapes=str(tmp_path),
                         panoptic_level="supercategory")  # fmt: skip
    with pytest.raises(GroundTruthError, match=r"panoptic_level=supercategory needs .*cityscapes"):
        load_ground_truth(cfg)
    with pytest.raises(GroundTruthError, match=r"panoptic_level must be one of"):
        load_coco_panoptic(str(tmp_path / "x.json"), panoptic_level="group")
