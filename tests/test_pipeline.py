"""The stages after MaskCut on real photos: embed -> cluster -> semantic -> panoptic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from tests.helpers import DEMO_CONFIG, demo_config
from u2seg.artifacts import ArtifactError
from u2seg.cli import main
from u2seg.config import PipelineConfig, load_config
from u2seg.data.coco import rgb_to_id
from u2seg.data.demo import write_demo_dataset
from u2seg.stages import cluster, embed, evaluate, maskcut, panoptic, semantic, visualize
from u2seg.stages import predict as predict_stage
from u2seg.stages import train as train_stage

pytestmark = [pytest.mark.slow, pytest.mark.ray]
K, S = 3, 4


def _config(folder: Path, out: Path, cache: Path, *extra: str) -> PipelineConfig:
    """The demo config, smaller: 224 px MaskCut, 112 px crops and stuff maps, K and S."""
    small = (
        "maskcut.image_size=224",
        "embed.image_size=112",
        "semantic.image_size=112",
        # one actor a stage: 6 photos need no second, whose start costs a torch import
        "maskcut.concurrency=1",
        "embed.concurrency=1",
        "semantic.concurrency=1",
    )
    classes = (f"cluster.k={K}", f"semantic.num_classes={S}")
    pseudo = "evaluate.predictions=[maskcut,semantic,panoptic]"  # this run trains nothing
    return demo_config(folder, out, cache, *small, *classes, pseudo, *extra)


@pytest.fixture(scope="module")
def run_dir(
    local_ray: None, tmp_path_factory: pytest.TempPathFactory, weights_cache: Path
) -> tuple[Path, PipelineConfig]:
    tmp = tmp_path_factory.mktemp("pipeline")
    demo = write_demo_dataset(tmp / "demo")
    folder = tmp / "photos"
    folder.mkdir()
    for name in ("voc.jpg", "quokka.jpg", "coffee.jpg"):
        shutil.copyfile(demo.root / name, folder / name)
    cfg = _config(folder, tmp / "run", weights_cache)
    for stage in (maskcut, embed, cluster, semantic, panoptic):
        stage.run(cfg)
    return tmp / "run", cfg


def _parts(folder: Path) -> list[dict]:
    rows: list[dict] = []
    for part in sorted(folder.glob("part-*.parquet")):
        rows += pq.read_table(part).to_pylist()
    return rows


def test_embeddings_are_keyed_by_instances_ids(run_dir: tuple[Path, PipelineConfig]) -> None:
    out, _ = run_dir
    instances = json.loads((out / "maskcut" / "instances.json").read_text())
    expected = {a["id"]: a["image_id"] for a in instances["annotations"]}
    rows = _parts(out / "embed")
    assert len(expected) >= K
    assert {r["annotation_id"]: r["image_id"] for r in rows} == expected
    vectors = np.array([r["vector"] for r in rows])
    assert vectors.shape == (len(expected), 384) and np.isfinite(vectors).all()
    assert len({tuple(v.round(3)) for v in vectors}) == len(vectors)


def test_every_mask_gets_a_pseudo_class(run_dir: tuple[Path, PipelineConfig]) -> None:
    out, _ = run_dir
    assigned = pq.read_table(out / "cluster" / "assignments.parquet").to_pylist()
    manifest = json.loads((out / "cluster" / "manifest.json").read_text())
    assert len(assigned) == manifest["counts"]["masks"]
    assert {r["category_id"] for r in assigned} <= set(range(1, K + 1))
    assert sum(manifest["sizes"]) == len(assigned)
    assert np.load(out / "cluster" / "centroids.npy").shape == (K, 384)


def test_sharded_clustering_matches_in_process(
    run_dir: tuple[Path, PipelineConfig], tmp_path: Path
) -> None:
    out, cfg = run_dir
    copy = tmp_path / "run"
    for stage in ("maskcut", "embed"):
        shutil.copytree(out / stage, copy / stage)
    sharded_cfg = _config(
        Path(cfg.data.source), copy, Path(str(cfg.backbone.cache_dir)),
        "cluster.mode=sharded", "cluster.shard_num_cpus=0.5",
    )  # fmt: skip
    sharded = cluster.run(sharded_cfg)
    local = json.loads((out / "cluster" / "manifest.json").read_text())
    assert sharded["mode"] == "sharded" and local["mode"] == "local"
    assert sharded["objective"] == pytest.approx(local["objective"], rel=0.01)


def test_a_changed_k_is_refused_not_mixed_with_the_old_clusters(
    run_dir: tuple[Path, PipelineConfig], tmp_path: Path
) -> None:
    out, cfg = run_dir
    copy = tmp_path / "run"
    for stage in ("maskcut", "embed", "cluster"):
        shutil.copytree(out / stage, copy / stage)
    source, cache = Path(cfg.data.source), Path(str(cfg.backbone.cache_dir))
    with pytest.raises(ArtifactError, match=rf"cluster\.k: {K} -> {K - 1}"):
        cluster.run(_config(source, copy, cache, f"cluster.k={K - 1}"))
    config = json.loads((copy / "cluster" / "config.json").read_text())
    manifest = json.loads((copy / "cluster" / "manifest.json").read_text())
    assert config["depends_on"]["cluster"]["k"] == manifest["counts"]["k"] == K
    # With the old clusters removed, the new k is run whole.
    shutil.rmtree(copy / "cluster")
    redone = cluster.run(_config(source, copy, cache, f"cluster.k={K - 1}"))
    assert redone["counts"]["k"] == len(redone["sizes"]) == K - 1


def test_stuff_maps_cover_every_pixel(run_dir: tuple[Path, PipelineConfig]) -> None:
    out, _ = run_dir
    for row in _parts(out / "semantic"):
        labels = semantic.decode_labels(row["labels_png"])
        assert labels.shape == (row["height"], row["width"])
        assert labels.max() < S


def test_panoptic_outputs_agree(run_dir: tuple[Path, PipelineConfig]) -> None:
    out, _ = run_dir
    root = out / "panoptic"
    dataset = json.loads((root / "panoptic.json").read_text())
    categories = {c["id"]: c for c in dataset["categories"]}
    assert sorted(categories) == list(range(1, K + S + 1))
    assert all(categories[c]["isthing"] == (c <= K) for c in categories)
    images = {im["id"]: im for im in dataset["images"]}
    assert dataset["annotations"]
    for ann in dataset["annotations"]:
        ids = rgb_to_id(np.asarray(Image.open(root / "panoptic" / ann["file_name"])))
        image = images[ann["image_id"]]
        assert ids.shape == (image["height"], image["width"])
        assert sorted(np.unique(ids[ids > 0]).tolist()) == sorted(
            s["id"] for s in ann["segments_info"]
        )
        for segment in ann["segments_info"]:
            assert (ids == segment["id"]).sum() == segment["area"]
        sem = np.asarray(Image.open(root / "semantic" / ann["file_name"]))
        things = [s["id"] for s in ann["segments_info"] if s["isthing"]]
        assert (sem[np.isin(ids, things)] == 0).all()
        assert (sem[ids == 0] == 255).all()
        assert set(np.unique(sem).tolist()) <= {0, 255, *range(1, S + 1)}
    coco = COCO(str(root / "instances.json"))
    assert coco.getCatIds() == list(range(1, K + 1))
    for ann in coco.dataset["annotations"]:
        assert 1 <= ann["category_id"] <= K and coco.annToMask(ann).sum() == ann["area"] > 0
    # Things and stuff: the pool's background masks are left to the stuff map, so every
    # photo keeps a thing and has stuff segments (with them as things, none had any).
    for ann in dataset["annotations"]:
        kinds = {s["isthing"] for s in ann["segments_info"]}
        assert kinds == {0, 1}, ann["file_name"]


def test_panoptic_resumes_to_the_same_files(run_dir: tuple[Path, PipelineConfig]) -> None:
    out, cfg = run_dir
    root = out / "panoptic"
    clean = {n: (root / n).read_bytes() for n in ("panoptic.json", "instances.json")}
    for name in ("manifest.json", "panoptic.json", "instances.json", "part-00001.parquet"):
        (root / name).unlink()
    manifest = panoptic.run(cfg)
    assert manifest["counts"]["resumed_shards"] == 1
    assert {n: (root / n).read_bytes() for n in clean} == clean


def test_pictures_of_every_stage(run_dir: tuple[Path, PipelineConfig]) -> None:
    out, cfg = run_dir
    for stage in ("maskcut", "cluster", "panoptic"):  # predict: in the demo's test
        folder = visualize.run(cfg, stage)
        pictures = list(folder.glob("*.png"))
        assert pictures, stage
        assert Image.open(pictures[0]).size[0] > 0


def test_pictures_without_data_source_use_the_images_the_stage_ran_on(
    run_dir: tuple[Path, PipelineConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    """`u2seg visualize --config ... output=<run> --stage panoptic` as getting-started shows
    it: no data.source on the command line; the stage's config.json names the photos."""
    out, cfg = run_dir
    sheet = out / "visualize" / "panoptic" / "sheet.png"
    sheet.unlink(missing_ok=True)
    args = ["--config", str(DEMO_CONFIG), f"output={out}", "--stage", "panoptic"]
    assert main(["visualize", *args]) == 0, capsys.readouterr().err
    assert Image.open(sheet).size[0] > 0
    empty = out.parent / "nothing-run"
    assert main(["visualize", "--config", str(DEMO_CONFIG), f"output={empty}"]) == 2
    assert "pass data.source=" in capsys.readouterr().err


def test_evaluate_scores_pseudo_masks_and_pseudo_labels(
    run_dir: tuple[Path, PipelineConfig],
) -> None:
    out, cfg = run_dir
    gt = out.parent / "demo" / "annotations" / "panoptic.json"  # voc, arc2017, quokka
    cfg = _config(
        Path(cfg.data.source), out, Path(str(cfg.backbone.cache_dir)),
        f"evaluate.gt_panoptic_json={gt}",
    )  # fmt: skip
    manifest = evaluate.run(cfg)
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())["predictions"]
    masks, stuff, labels = metrics["maskcut"], metrics["semantic"], metrics["panoptic"]
    assert set(stuff) == {"semantic", "images", "pictures"}  # stuff classes: mIoU only
    assert stuff["semantic"]["hungarian"]["matched_clusters"] == S
    assert set(masks) == {"class_agnostic", "images", "pictures"}  # one class: no mapping
    assert masks["images"]["without_prediction"] == 1  # arc2017 was not in the run
    assert masks["images"]["predicted_not_in_ground_truth"] == 1  # coffee has no labels
    assert masks["class_agnostic"]["segm"]["AP50"] > 0  # the quokka is found
    assert {"class_agnostic", "instance", "semantic", "panoptic"} <= set(labels)
    assert 0 <= labels["panoptic"]["All"]["PQ"] <= 100
    assert labels["semantic"]["hungarian"]["matched_clusters"] <= K + S
    assert (out / "evaluate" / "panoptic" / "overlays.png").is_file()
    assert manifest["counts"]["prediction_sets"] == 3


def test_stages_refuse_to_run_before_their_inputs(tmp_path: Path) -> None:
    cfg = load_config(DEMO_CONFIG, [f"output={tmp_path}", "data.source=/x"])
    for stage, needed in ((cluster, "embed"), (panoptic, "maskcut"), (train_stage, "panoptic"),
                          (predict_stage, "train")):  # fmt: skip
        with pytest.raises(ArtifactError, match=f"u2seg {needed}"):
            stage.run(cfg)


def test_stego_stuff_classes_trained_with_ray_train(
    run_dir: tuple[Path, PipelineConfig], tmp_path: Path
) -> None:
    _, cfg = run_dir
    stego_cfg = _config(
        Path(cfg.data.source), tmp_path / "run", Path(str(cfg.backbone.cache_dir)),
        "semantic.method=stego", "semantic.stego_steps=20", "semantic.stego_batch_size=2",
        "semantic.stego_code_dim=16", "semantic.train_workers=2", "semantic.crf=true",
    )  # fmt: skip
    manifest = semantic.run(stego_cfg)
    assert manifest["counts"]["ok"] == 3
    root = tmp_path / "run" / "semantic"
    head = torch.load(root / "head.pt", weights_only=True)
    assert head["linear.weight"].shape[:2] == (16, 384)  # codes of the trained head
    assert np.load(root / "centroids.npy").shape == (S, 16)  # the cluster probe, in code space
    for row in _parts(root):
        labels = semantic.decode_labels(row["labels_png"])
        assert labels.shape == (row["height"], row["width"]) and labels.max() < S
