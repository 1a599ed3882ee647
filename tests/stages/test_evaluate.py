"""The `evaluate` stage: metrics.json, report, maps, pictures, Ray Data, the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tests.evalcases import SWAPPED, relabel, scene, write_ground_truth, write_prediction
from u2seg.artifacts import ArtifactError, png_bytes
from u2seg.cli import main
from u2seg.config import PipelineConfig, load_config
from u2seg.data import coco as coco_format
from u2seg.data.groundtruth import GroundTruthError, load_coco
from u2seg.data.predictions import PredictionError, load_predictions
from u2seg.stages import evaluate


def _run_dir(tmp: Path, seeds: range, permutation: dict[int, int]) -> tuple[Path, Path]:
    """A run with a `panoptic` stage of predictions, photos, and its ground truth."""
    scenes = [scene(i, seed=s) for i, s in enumerate(seeds, start=1)]
    gt_json = write_ground_truth(tmp / "gt", scenes)
    run = tmp / "run"
    write_prediction(run / "panoptic", relabel(scenes, permutation))
    (run / "panoptic" / "manifest.json").write_text("{}")
    photos = tmp / "photos"
    photos.mkdir()
    for entry, segments, _ in scenes:
        grey = (segments * 40 % 256).astype(np.uint8)
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(photos / entry["file_name"])
    return run, gt_json


def _config(run: Path, gt_json: Path, *extra: str) -> PipelineConfig:
    return load_config(
        None,
        [
            f"output={run}",
            f"data.source={run.parent / 'photos'}",
            "evaluate.predictions=[panoptic]",
            f"evaluate.gt_panoptic_json={gt_json}",
            *extra,
        ],
    )


def test_stage_writes_metrics_report_maps_and_pictures(tmp_path: Path) -> None:
    run, gt_json = _run_dir(tmp_path, range(1, 5), SWAPPED)
    manifest = evaluate.run(_config(run, gt_json))
    out = run / "evaluate"

    def strict(name: str) -> None:
        raise ValueError(f"metrics.json holds {name}, which is not JSON")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=strict)
    scores = metrics["predictions"]["panoptic"]
    assert scores["class_agnostic"]["segm"]["APl"] is None  # no large object: null, not NaN
    assert scores["panoptic"]["All"]["PQ"] == pytest.approx(100.0)
    assert scores["semantic"]["hungarian"]["mIoU"] == pytest.approx(100.0)
    assert scores["instance"]["segm"]["AP"] == pytest.approx(100.0)
    assert metrics["ground_truth"]["images"] == 4
    assert "score >= 0.6" in metrics["protocol"]["instance_map"]
    maps = json.loads((out / "panoptic" / "mapping.json").read_text())
    assert maps["instance"] == {"1": 2, "2": 1} and maps["stuff"] == {"3": 4, "4": 3}
    for picture in ("confusion.png", "iou.png", "overlays.png"):
        with Image.open(out / "panoptic" / picture) as im:
            assert im.width > 100 and im.height > 50
    text = (out / "report.md").read_text()
    assert "| panoptic | 100.0 | 100.0 | 100.0 |" in text
    assert "![panoptic confusion](panoptic/confusion.png)" in text
    assert "| cat | 100.0 | 100.0 | 100.0 | 100.0 | 4 | 0 | 0 | 100.0 |" in text
    assert any(line.startswith("| predictions | PQ |") for line in manifest["table"])
    assert manifest["counts"] == {"images": 4, "prediction_sets": 1, "on_ray": 0}


def test_maps_of_one_split_apply_to_another(tmp_path: Path) -> None:
    run_a, gt_a = _run_dir(tmp_path / "a", range(1, 4), SWAPPED)
    evaluate.run(_config(run_a, gt_a))
    run_b, gt_b = _run_dir(tmp_path / "b", range(20, 23), SWAPPED)
    evaluate.run(_config(run_b, gt_b, f"evaluate.mapping_from={run_a / 'evaluate'}"))
    metrics = json.loads((run_b / "evaluate" / "metrics.json").read_text())
    assert metrics["protocol"]["maps"].startswith("applied from")
    assert metrics["predictions"]["panoptic"]["panoptic"]["All"]["PQ"] == pytest.approx(100.0)
    with pytest.raises(FileNotFoundError, match=r"no saved maps for 'panoptic'"):
        evaluate.run(_config(run_b, gt_b, f"evaluate.mapping_from={tmp_path}"))


def test_semantic_stage_is_scored_by_the_semantic_protocol(tmp_path: Path) -> None:
    scenes = [scene(i, seed=i) for i in range(1, 4)]
    gt_json = write_ground_truth(tmp_path / "gt", scenes)
    run = tmp_path / "run"
    (run / "semantic").mkdir(parents=True)
    rows = []
    for entry, segments, info in scenes:  # stuff cluster = a permutation of the category
        lut = np.zeros(segments.max() + 1, dtype=np.uint8)
        for s in info:
            lut[s["id"]] = (s["category_id"] + 1) % 4
        labels = lut[segments]
        rows.append(
            {
                **{k: entry[k] for k in ("file_name", "width", "height")},
                "image_id": entry["id"],
                "error": None,
                "labels_png": png_bytes(labels),
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), run / "semantic" / "part-00000.parquet")
    manifest = {"stage": "semantic", "counts": {"classes": 4}}
    (run / "semantic" / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(None, [f"output={run}", "evaluate.predictions=[semantic]",
                             f"evaluate.gt_panoptic_json={gt_json}"])  # fmt: skip
    evaluate.run(cfg)
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())["predictions"]
    assert set(metrics["semantic"]) == {"semantic", "images", "pictures"}
    assert metrics["semantic"]["semantic"]["hungarian"]["mIoU"] == pytest.approx(100.0)
    maps = json.loads((run / "evaluate" / "semantic" / "mapping.json").read_text())
    assert maps["semantic_hungarian"] == {"1": 2, "2": 3, "3": 0, "4": 1}


def test_missing_prediction_stage_is_named(tmp_path: Path) -> None:
    run, gt_json = _run_dir(tmp_path, range(1, 3), SWAPPED)
    cfg = _config(run, gt_json, "evaluate.predictions=[maskcut]")
    with pytest.raises(ArtifactError, match=r"'maskcut' stage has not completed"):
        evaluate.run(cfg)
    cfg = _config(run, gt_json, f"evaluate.predictions=[{tmp_path / 'nowhere'}]")
    with pytest.raises(ValueError, match=r"prediction directory not found: .*nowhere"):
        evaluate.run(cfg)


def test_a_directory_of_predictions_is_scored_under_its_name(tmp_path: Path) -> None:
    run, gt_json = _run_dir(tmp_path, range(1, 3), SWAPPED)
    model = tmp_path / "model_predictions"
    (run / "panoptic").rename(model)  # e.g. a trained model's output, outside the run
    evaluate.run(_config(run, gt_json, f"evaluate.predictions=[{model}]"))
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())["predictions"]
    assert metrics["model_predictions"]["panoptic"]["All"]["PQ"] == pytest.approx(100.0)
    assert (run / "evaluate" / "model_predictions" / "mapping.json").is_file()


@pytest.mark.slow
@pytest.mark.ray
def test_ray_data_gives_the_in_process_numbers(tmp_path: Path, local_ray: None) -> None:
    run, gt_json = _run_dir(tmp_path, range(1, 8), SWAPPED)
    local = evaluate.run(_config(run, gt_json, "evaluate.chunk_size=2"))
    in_process = json.loads((run / "evaluate" / "metrics.json").read_text())
    ray = evaluate.run(_config(run, gt_json, "evaluate.chunk_size=2",
                                     "evaluate.ray_min_images=1"))  # fmt: skip
    on_ray = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert (local["counts"]["on_ray"], ray["counts"]["on_ray"]) == (0, 1)
    for entry in (in_process, on_ray):
        entry["predictions"]["panoptic"]["images"].pop("seconds")
    assert on_ray == in_process


def test_command_prints_the_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, gt_json = _run_dir(tmp_path, range(1, 3), SWAPPED)
    args = ["evaluate", f"output={run}", "evaluate.predictions=[panoptic]",
            f"evaluate.gt_panoptic_json={gt_json}"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Panoptic segmentation" in printed and "| panoptic |" in printed
    assert main(["evaluate", "evaluate.gt_fromat=coco"]) == 2
    assert "gt_fromat" in capsys.readouterr().err
    assert main(["evaluate", f"output={run}", "evaluate.gt_format=coco"]) == 2
    assert "needs evaluate.gt_instances" in capsys.readouterr().err


def _labelme_export(root: Path) -> Path:
    """A COCO instances export laid out and written the way labelme's labelme2coco.py
    writes it: image and annotation ids from 0, polygon segmentations, float areas, null
    supercategories and metadata, and category 0 "_background_" that no annotation uses."""
    (root / "images").mkdir(parents=True)
    shapes = {  # file -> (label, polygon [x0, y0, x1, y1, ...])
        "2011_000003.jpg": [
            ("cat", [8, 6, 40, 6, 40, 30, 8, 30]),
            ("dog", [44, 20, 60, 44, 30, 44]),
        ],
        "2011_000025.jpg": [
            ("dog", [4, 4, 28, 4, 28, 40, 4, 40]),
            ("cat", [34, 10, 58, 10, 46, 36]),
        ],
    }
    names = ["_background_", "cat", "dog"]
    images, annotations = [], []
    for image_id, (file_name, labelled) in enumerate(shapes.items()):
        photo = np.full((48, 64, 3), 30, dtype=np.uint8)
        for label, polygon in labelled:
            mask = coco_format.segmentation_to_mask([polygon], 48, 64)
            photo[mask] = (200, 120, 60) if label == "cat" else (60, 160, 220)
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations), "image_id": image_id,
                "category_id": names.index(label), "segmentation": [polygon],
                "area": float(mask_utils.area(rle)),
                "bbox": mask_utils.toBbox(rle).flatten().tolist(), "iscrowd": 0,
            })  # fmt: skip
        Image.fromarray(photo).save(root / "images" / file_name)
        images.append({
            "license": 0, "url": None, "file_name": file_name, "height": 48, "width": 64,
            "date_captured": None, "id": image_id,
        })  # fmt: skip
    data = {
        "info": {"description": None, "url": None, "version": None, "year": 2026,
                 "contributor": None, "date_created": "2026-12-01 10:00:00.000000"},
        "licenses": [{"url": None, "id": 0, "name": None}],
        "images": images,
        "type": "instances",
        "annotations": annotations,
        "categories": [{"supercategory": None, "id": i, "name": n} for i, n in enumerate(names)],
    }  # fmt: skip
    path = root / "annotations" / "instances_train.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    return path


def test_a_labelme_coco_export_is_scored_and_drawn(tmp_path: Path) -> None:
    gt_json = _labelme_export(tmp_path / "export")
    gt = json.loads(gt_json.read_text())
    # Predictions: the same shapes as RLE masks, under cluster ids 7 (cat) and 9 (dog).
    cluster = {1: 7, 2: 9}
    pred_dir = tmp_path / "clusters"
    pred_dir.mkdir()
    detections = [
        coco_format.mask_to_annotation(
            coco_format.segmentation_to_mask(a["segmentation"], 48, 64),
            a["image_id"], a["id"] + 1, cluster[a["category_id"]], score=0.9,
        )
        for a in gt["annotations"]
    ]  # fmt: skip
    (pred_dir / "instances.json").write_text(json.dumps({
        "images": gt["images"], "annotations": detections,
        "categories": [{"id": 7, "name": "c7"}, {"id": 9, "name": "c9"}],
    }))  # fmt: skip
    cfg = load_config(None, [
        f"output={tmp_path / 'run'}", f"data.source={tmp_path / 'export' / 'images'}",
        f"evaluate.predictions=[{pred_dir}]", "evaluate.gt_format=coco",
        f"evaluate.gt_instances={gt_json}",
    ])  # fmt: skip
    with pytest.warns(UserWarning, match="category 0 \\('_background_'\\) is used by no"):
        evaluate.run(cfg)
    out = tmp_path / "run" / "evaluate"
    scores = json.loads((out / "metrics.json").read_text())["predictions"]["clusters"]
    assert scores["class_agnostic"]["segm"]["AP"] == pytest.approx(100.0)
    assert scores["instance"]["segm"]["AP"] == pytest.approx(100.0)
    assert scores["instance"]["matched_classes"] == 2
    assert set(scores["instance"]["segm"]["per_class"]) == {"cat", "dog"}
    # The overlays draw the ground-truth instances: photo | ground truth | prediction.
    sheet = np.asarray(Image.open(out / "clusters" / "overlays.png"))
    assert sheet.shape[1] > 3 * 64 and sheet.shape[0] >= 2 * 48


def test_a_used_category_0_is_refused_by_name(tmp_path: Path) -> None:
    gt_json = _labelme_export(tmp_path / "export")
    data = json.loads(gt_json.read_text())
    data["annotations"][0]["category_id"] = 0
    gt_json.write_text(json.dumps(data))
    with pytest.raises(GroundTruthError, match="category 0 \\('_background_'\\) is used"):
        load_coco(str(gt_json))


def test_ground_truth_with_repeated_image_ids_is_refused(tmp_path: Path) -> None:
    gt_json = _labelme_export(tmp_path / "export")
    data = json.loads(gt_json.read_text())
    data["images"][1]["id"] = data["images"][0]["id"]  # two photos, one id
    gt_json.write_text(json.dumps(data))
    with pytest.raises(GroundTruthError, match=r"image ids \[0\] are used by more than one"):
        load_coco(str(gt_json))


@pytest.mark.parametrize("form", ["polygons", "boxes"])
def test_polygon_and_box_only_predictions_are_scored(tmp_path: Path, form: str) -> None:
    gt_json = _labelme_export(tmp_path / "export")
    gt = json.loads(gt_json.read_text())
    detections = []
    for a in gt["annotations"]:
        det = {"id": a["id"] + 1, "image_id": a["image_id"], "category_id": 5 + a["category_id"],
               "bbox": a["bbox"], "score": 0.9}  # fmt: skip
        if form == "polygons":
            det["segmentation"] = a["segmentation"]
        detections.append(det)
    pred_dir = tmp_path / "detector"
    pred_dir.mkdir()
    (pred_dir / "instances.json").write_text(json.dumps({
        "images": gt["images"], "annotations": detections,
        "categories": [{"id": 6, "name": "c6"}, {"id": 7, "name": "c7"}],
    }))  # fmt: skip
    cfg = load_config(None, [
        f"output={tmp_path / 'run'}", f"evaluate.predictions=[{pred_dir}]",
        "evaluate.gt_format=coco", f"evaluate.gt_instances={gt_json}",
    ])  # fmt: skip
    with pytest.warns(UserWarning, match="_background_"):
        evaluate.run(cfg)
    metrics = json.loads((tmp_path / "run" / "evaluate" / "metrics.json").read_text())
    scores = metrics["predictions"]["detector"]
    assert scores["instance"]["bbox"]["AP"] == pytest.approx(100.0)
    assert scores["class_agnostic"]["bbox"]["AP"] == pytest.approx(100.0)
    if form == "polygons":
        assert scores["instance"]["segm"]["AP"] == pytest.approx(100.0)
    else:  # box-only detections: box AP alone, the mask columns of the report say "-"
        assert "segm" not in scores["instance"] and "segm" not in scores["class_agnostic"]
        report = (tmp_path / "run" / "evaluate" / "report.md").read_text()
        assert "| detector | 100.0 | 100.0 | 100.0 | - | - | - |" in report


def test_detections_with_and_without_masks_in_one_set_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    masked = coco_format.mask_to_annotation(np.ones((4, 4), dtype=bool), 1, 1, 1, score=0.5)
    boxed = {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.4}
    (folder / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}],
        "annotations": [masked, boxed], "categories": [{"id": 1, "name": "fg"}],
    }))  # fmt: skip
    with pytest.raises(PredictionError, match="1 of 2 detections have no 'segmentation'"):
        load_predictions("mixed", str(folder))


def test_ground_truth_images_without_a_size_are_named(tmp_path: Path) -> None:
    gt_json = _labelme_export(tmp_path / "export")
    data = json.loads(gt_json.read_text())
    for image in data["images"]:
        del image["width"], image["height"]
    gt_json.write_text(json.dumps(data))
    cfg = load_config(None, [
        f"output={tmp_path / 'run'}", f"evaluate.predictions=[{tmp_path / 'export'}]",
        "evaluate.gt_format=coco", f"evaluate.gt_instances={gt_json}",
    ])  # fmt: skip
    (tmp_path / "export" / "instances.json").write_text(gt_json.read_text())  # as predictions
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            GroundTruthError, match="image 2011_000003.jpg \\(id 0\\) has no width and height"
        ),
    ):
        evaluate.run(cfg)


def test_sets_of_one_name_are_reported_apart() -> None:
    from u2seg.stages.evaluate import set_names

    named = set_names([
        ("predict", "runs/a/predict"), ("predict", "runs/b/predict"),
        ("predict-2", "x/predict-2"), ("..", "runs/.."), ("a b", "c/a b"),
    ])  # fmt: skip
    assert [n for n, _ in named] == ["predict", "predict-2", "predict-2-2", "set..", "a_b"]
    assert [p for _, p in named][:2] == ["runs/a/predict", "runs/b/predict"]
