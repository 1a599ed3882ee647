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
    from u2seg.stages import cluster, embed, maskcut, panoptic, predict, semantic, train

    for k in range(3):
        save_photo(tmp_path / f"p{k}.jpg", (96, 80), seed=k)
        s3.put(str(tmp_path / f"p{k}.jpg"), f"u2seg/photos/p{k}.jpg")
    cfg = demo_config("s3://u2seg/photos", "s3://u2seg/run", weights_cache, *SMALL)  # type: ignore[arg-type]
    stages = (maskcut, embed, cluster, semantic, panoptic, train, predict)
    with ray_session(cfg.ray):
        for stage in stages:
            stage.run(cfg)
        assert {p.rstrip("/").rsplit("/", 1)[1] for p in s3.ls("u2seg/run")} - {"run"} == {
            "maskcut", "embed", "cluster", "semantic", "panoptic", "train", "predict"
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


def test_weights_and_checkpoints_load_from_s3(s3: Any, tmp_path: Path, weights_cache: Path) -> None:
    """backbone.weights and train.weights accept s3:// URLs: the same tensors as from disk,
    and a missing object is refused by name before anything loads."""
    import numpy as np
    import torch
    from torchvision.models import resnet50

    from u2seg.models.pyramid import ResNetFPN, load_resnet_checkpoint
    from u2seg.models.vit import WeightsUnavailableError, backbone_state, check_weights

    packaged = backbone_state("dinov2_vits14", "packaged", weights_cache)
    local = tmp_path / "vits14.pth"
    torch.save({k: torch.from_numpy(v) for k, v in packaged.items()}, local)
    s3.put(str(local), "u2seg/weights/vits14.pth")
    from_s3 = backbone_state("dinov2_vits14", "s3://u2seg/weights/vits14.pth")
    assert from_s3.keys() == packaged.keys()
    assert all(np.array_equal(from_s3[k], packaged[k]) for k in packaged)
    with pytest.raises(WeightsUnavailableError, match="s3://u2seg/weights/nothing.pth"):
        check_weights("dinov2_vits14", "s3://u2seg/weights/nothing.pth")

    resnet = resnet50().state_dict()
    torch.save({"state_dict": resnet}, tmp_path / "r50.pth")
    s3.put(str(tmp_path / "r50.pth"), "u2seg/weights/r50.pth")
    model = ResNetFPN()
    load_resnet_checkpoint(model, "s3://u2seg/weights/r50.pth")
    loaded = model.resnet.state_dict()
    assert all(torch.equal(loaded[k], resnet[k]) for k in resnet if not k.startswith("fc."))
    # Training's own check of train.weights reads the bucket too.
    from u2seg.config import ConfigError, load_config
    from u2seg.stages.train import _check

    ok = load_config(
        None,
        [
            "train.weights=s3://u2seg/weights/r50.pth",
            "train.num_workers=1",
            "train.strategy=deepspeed",
        ],
    )
    assert _check(ok) == 1
    missing = load_config(
        None,
        [
            "train.weights=s3://u2seg/weights/r5.pth",
            "train.num_workers=1",
            "train.strategy=deepspeed",
        ],
    )
    with pytest.raises(ConfigError, match="checkpoint not found: s3://u2seg/weights/r5.pth"):
        _check(missing)
