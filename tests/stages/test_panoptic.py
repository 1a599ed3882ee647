"""The panoptic stage on hand-made earlier artifacts: label PNGs are unique per photo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from u2seg.artifacts import StageDir, png_bytes
from u2seg.config import ConfigError, load_config
from u2seg.data.coco import mask_to_annotation, panoptic_file_names, rgb_to_id
from u2seg.stages import panoptic

H, W = 24, 32


def _finished(run: Path, name: str, table: pa.Table | None) -> StageDir:
    stage = StageDir(str(run), name)
    stage.start({}, {})
    if table is not None:
        stage.write_table(stage.shard_name(0), table)
    stage.finish({}, pa.table({"image_id": pa.array([], pa.int64())}))
    return stage


def _earlier_stages(run: Path, names: list[str]) -> None:
    """maskcut: one box mask per photo, each elsewhere; semantic: all stuff class 0;
    cluster: every mask in class 1."""
    rows, anns = [], []
    for k, name in enumerate(names):
        mask = np.zeros((H, W), dtype=bool)
        mask[2 + 4 * k : 8 + 4 * k, 3 + 5 * k : 12 + 5 * k] = True
        ann = mask_to_annotation(mask, k + 1, k + 1, score=1.0)
        anns.append(ann)
        rows.append({"image_id": k + 1, "file_name": name, "width": W, "height": H,
                     "error": None, "num_masks": 1, "annotations": json.dumps([ann])})  # fmt: skip
    _finished(run, "maskcut", pa.Table.from_pylist(rows))
    labels = png_bytes(np.zeros((H, W), dtype=np.uint8))
    stuff = [{"image_id": k + 1, "error": None, "labels_png": labels} for k in range(len(names))]
    _finished(run, "semantic", pa.Table.from_pylist(stuff))
    cluster = _finished(run, "cluster", None)
    ids = list(range(1, len(names) + 1))
    assigned = pa.table({"annotation_id": ids, "category_id": [1] * len(ids)})
    cluster.write_table("assignments.parquet", assigned)


@pytest.mark.ray
def test_photos_sharing_a_stem_get_their_own_label_pngs(local_ray: None, tmp_path: Path) -> None:
    run = tmp_path / "run"
    names = ["x.jpg", "x.png", "y.jpg"]
    _earlier_stages(run, names)
    panoptic.run(load_config(None, [f"output={run}", "cluster.k=1", "semantic.num_classes=1"]))
    dataset = json.loads((run / "panoptic" / "panoptic.json").read_text())
    files = {im["id"]: im["file_name"] for im in dataset["images"]}
    pngs = [a["file_name"] for a in dataset["annotations"]]
    assert pngs == ["x.jpg.png", "x.png.png", "y.png"]  # y keeps detectron2's stem name
    for ann in dataset["annotations"]:
        ids = rgb_to_id(np.asarray(Image.open(run / "panoptic" / "panoptic" / ann["file_name"])))
        thing = next(s for s in ann["segments_info"] if s["isthing"])
        # Each PNG holds its own photo's mask (the box of image k starts at row 2 + 4k).
        k = ann["image_id"] - 1
        assert files[ann["image_id"]] == names[k]
        assert ids[2 + 4 * k, 3 + 5 * k] == thing["id"] and (ids == thing["id"]).sum() == 54


def test_label_png_names_are_unique_and_stem_based_otherwise() -> None:
    assert panoptic_file_names(["a/x.jpg", "a/x.png", "b/x.jpg", "y.jpeg"]) == {
        "a/x.jpg": "a/x.jpg.png",
        "a/x.png": "a/x.png.png",
        "b/x.jpg": "b/x.png",
        "y.jpeg": "y.png",
    }


def test_paint_score_puts_the_first_listed_mask_on_top(tmp_path: Path) -> None:
    """Maskcut lists masks best first: with paint=score a large best mask keeps its pixels
    over a small later one, which min_visible then drops as mostly hidden."""
    big, small = np.zeros((H, W), dtype=bool), np.zeros((H, W), dtype=bool)
    big[2:20, 2:28] = True
    small[4:10, 4:10] = True
    stuff = np.zeros((H, W), dtype=np.uint8)
    image = {"image_id": 1, "file_name": "a.jpg", "width": W, "height": H, "png": "a.png"}

    def segments(**options: object) -> list[dict[str, object]]:
        cfg = panoptic.merge_options(
            load_config(None, [f"{k}={v}" for k, v in options.items()]), 2, 1
        )
        row = panoptic.label_row(image, [big, small], [1, 2], stuff, cfg, str(tmp_path))
        return [s for s in json.loads(row["segments_info"]) if s["isthing"]]

    area = segments()  # docs/method.md: the smaller box on top
    assert [(s["category_id"], s["area"]) for s in area] == [(1, 18 * 26 - 36), (2, 36)]
    score = segments(**{"panoptic.paint": "score"})  # the best on top: the small one hidden
    assert [(s["category_id"], s["area"]) for s in score] == [(1, 18 * 26)]
    half = np.zeros((H, W), dtype=bool)
    half[18:24, 4:10] = True  # 24 of its 36 px outside the big mask: kept at min_visible 0.5
    cfg = panoptic.merge_options(load_config(None, ["panoptic.paint=score",
                                                    "panoptic.min_visible=0.5"]), 2, 1)  # fmt: skip
    row = panoptic.label_row(image, [big, small, half], [1, 2, 2], stuff, cfg, str(tmp_path))
    kept = [s for s in json.loads(row["segments_info"]) if s["isthing"]]
    assert sorted((s["category_id"], s["area"]) for s in kept) == [(1, 18 * 26), (2, 24)]
    with pytest.raises(ConfigError, match=r"panoptic\.paint='biggest'"):
        panoptic.merge_options(load_config(None, ["panoptic.paint=biggest"]), 2, 1)
