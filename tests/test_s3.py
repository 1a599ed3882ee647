"""The S3 deployment (`cluster/render.py --s3`: no shared volume) against a local S3 server
(moto's): photos read from a bucket, every stage's artifacts, Ray Train's checkpoints and
the model written there, a removed shard redone on resume, predictions readable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import demo_config, save_photo

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SMALL = [
    "features.image_size=112", "maskcut.image_size=112", "maskcut.n_masks=4",
    "embed.image_size=56", "semantic.image_size=112", "cluster.k=2", "semantic.num_classes=2",
    "train.max_iter=2", "train.short_sides=[96]", "train.max_side=128", "train.log_every=1",
    "train.checkpoint_every=1", "predict.short_side=96", "predict.max_side=128",
]  # fmt: skip


def test_the_pipeline_runs_on_s3_and_resumes_there(
    s3: Any, tmp_path: Path, weights_cache: Path
) -> None:
    from u2seg.runtime import ray_session
    from u2seg.stages import cluster, embed, features, maskcut, panoptic, predict, semantic, train

    for k in range(3):
        save_photo(tmp_path / f"p{k}.jpg", (96, 80), seed=k)
        s3.put(str(tmp_path / f"p{k}.jpg"), f"u2seg/photos/p{k}.jpg")
    cfg = demo_config("s3://u2seg/photos", "s3://u2seg/run", weights_cache, *SMALL)  # type: ignore[arg-type]
    stages = (features, maskcut, embed, cluster, semantic, panoptic, train, predict)
    with ray_session(cfg.ray):
        for stage in stages:
            stage.run(cfg)
        assert {p.rstrip("/").rsplit("/", 1)[1] for p in s3.ls("u2seg/run")} - {"run"} == {
            "features", "maskcut", "embed", "cluster", "semantic", "panoptic", "train", "predict"
        }  # fmt: skip
        # Ray Train kept its checkpoints in the bucket; the model is there.
        assert s3.glob("u2seg/run/train/ray/**/checkpoint_*")
        assert s3.size("u2seg/run/train/model.pt") > 1_000_000
        # A shard lost from the bucket is redone on resume, the other one kept.
        masks = json.loads(s3.cat("u2seg/run/maskcut/instances.json"))
        shards = sorted(s3.glob("u2seg/run/maskcut/part-*.parquet"))
        assert len(shards) == 2
        s3.rm(shards[0])
        again = maskcut.run(cfg)
        assert again["counts"]["resumed_shards"] == 1 and again["counts"]["ok"] == 3
        assert sorted(s3.glob("u2seg/run/maskcut/part-*.parquet")) == shards
        assert json.loads(s3.cat("u2seg/run/maskcut/instances.json")) == masks
    predictions = json.loads(s3.cat("u2seg/run/predict/instances.json"))
    assert {im["file_name"] for im in predictions["images"]} == {f"p{k}.jpg" for k in range(3)}
    assert predictions["annotations"] and all(a["segmentation"] for a in predictions["annotations"])
