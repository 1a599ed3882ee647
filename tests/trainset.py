"""A tiny run directory to train on: photos with two boxes each and the `panoptic/`
artifact a pseudo-label run would have written for them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import REPO
from u2seg.config import PipelineConfig, load_config
from u2seg.data.coco import mask_to_annotation

# Small heads and few proposals: a step on two 128 px images takes about a second.
SMALL_TRAIN = [
    "train.backbone=vit", "train.rpn_pre_nms_top_n_train=200",
    "train.rpn_post_nms_top_n_train=64", "train.rpn_pre_nms_top_n_test=200",
    "train.rpn_post_nms_top_n_test=64", "train.roi_batch_size_per_image=64",
    "train.box_head_dim=128", "train.short_sides=[128]", "train.max_side=128",
    "train.warmup_iters=2", "train.log_every=1", "train.cpus_per_worker=0.5",
    "train.data_num_cpus=0.25", "train.timeout_s=60", "train.torch_threads=1",
]  # fmt: skip


def write_trainset(tmp: Path, images: int = 4, size: int = 128) -> tuple[Path, Path]:
    """(photos folder, run directory with a complete `panoptic/`): each photo has two
    bright squares (classes 1 and 2) on two stuff halves (stuff 1 and 2)."""
    photos, run = tmp / "photos", tmp / "run"
    panoptic = run / "panoptic"
    (panoptic / "semantic").mkdir(parents=True)
    photos.mkdir()
    entries, anns = [], []
    for k in range(images):
        rng = np.random.default_rng(k)
        image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        image[:, size // 2 :] += 120
        semantic = np.ones((size, size), dtype=np.uint8)
        semantic[:, size // 2 :] = 2
        for label, (y, x) in enumerate([(10 + 4 * k, 12), (70, 72 - 4 * k)], start=1):
            mask = np.zeros((size, size), dtype=bool)
            mask[y : y + 44, x : x + 44] = True
            image[mask, label - 1] = 250
            semantic[mask] = 0
            anns.append(mask_to_annotation(mask, k + 1, len(anns) + 1, label))
        name = f"p{k}.png"
        Image.fromarray(image).save(photos / name)
        Image.fromarray(semantic).save(panoptic / "semantic" / name)
        entries.append({"id": k + 1, "file_name": name, "height": size, "width": size})
    categories = [{"id": c, "name": f"c{c}", "isthing": int(c <= 2)} for c in (1, 2, 3, 4)]
    instances = {"images": entries, "annotations": anns, "categories": categories[:2]}
    (panoptic / "instances.json").write_text(json.dumps(instances))
    (panoptic / "panoptic.json").write_text(json.dumps({"categories": categories}))
    (panoptic / "manifest.json").write_text(json.dumps({"stage": "panoptic"}))
    return photos, run


def train_config(photos: Path, run: Path, *extra: str) -> PipelineConfig:
    return load_config(
        REPO / "configs" / "demo.yaml",
        [f"data.source={photos}", f"output={run}", "data.shard_size=2",
         f"backbone.cache_dir={REPO / '.cache' / 'weights'}", *SMALL_TRAIN, *extra],
    )  # fmt: skip
