"""The panoptic model of a run, built from a plain description (`spec`) that training
writes into `train/model.pt` and `predict` reads back: no pickled object, only names and
numbers."""

from __future__ import annotations

from typing import Any

import torch

from u2seg.config import PipelineConfig, to_dict
from u2seg.models.panoptic_fpn import PanopticFPN, build_model
from u2seg.models.pyramid import ResNetFPN, load_resnet_checkpoint
from u2seg.models.vit import load_backbone

# TrainConfig fields that are PanopticFPN keyword options.
_HEADS = (
    "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test", "rpn_nms_thresh", "rpn_batch_size_per_image",
    "roi_batch_size_per_image", "roi_positive_fraction", "box_head_dim", "drop_loss_iou",
    "semantic_loss_weight", "roi_sampling_ratio",
)  # fmt: skip


def model_spec(cfg: PipelineConfig, num_things: int, num_stuff: int) -> dict[str, Any]:
    """What builds the model of `cfg.train` for K things and S stuff classes."""
    train = cfg.train
    return {
        "backbone": train.backbone,
        "norm": train.norm,
        "vit": to_dict(cfg.backbone) if train.backbone == "vit" else None,
        "vit_trainable": train.vit_trainable,
        "fpn_channels": train.fpn_channels,
        "num_things": num_things,
        "num_stuff": num_stuff,
        "heads": {k: getattr(train, k) for k in _HEADS},
    }


#: `train.weights` that asks for a randomly initialised ResNet-50 (an empty one is refused).
RANDOM_INIT = "random"


def build_from_spec(
    spec: dict[str, Any], device: torch.device, weights: str = "", **inference: Any
) -> PanopticFPN:
    """The model of `spec` on `device`. A ViT backbone loads its self-supervised weights
    (the run's `backbone` section); `weights`: a ResNet-50's to start from (a checkpoint,
    "hub": DINO's; "" or `RANDOM_INIT`: random), which a ViT backbone ignores.
    `inference`: PanopticFPN options that only change inference (score / NMS thresholds,
    detections per image) and override the spec's."""
    vit = None
    if spec["backbone"] == "vit":
        b = spec["vit"]
        vit = load_backbone(b["name"], weights=b["weights"], cache_dir=b["cache_dir"])
    heads = {**spec["heads"], **inference}
    model = build_model(
        spec["backbone"], spec["num_things"], spec["num_stuff"], vit=vit, norm=spec["norm"],
        vit_trainable=spec["vit_trainable"], channels=spec.get("fpn_channels", 256), **heads,
    )  # fmt: skip
    if weights and weights != RANDOM_INIT and spec["backbone"] == "resnet50":
        assert isinstance(model.backbone, ResNetFPN)
        load_resnet_checkpoint(model.backbone, weights)
    for tensor in [*model.parameters(), *model.buffers()]:
        # Converted weights can be views of transposed arrays; DeepSpeed broadcasts raw
        # bytes, which needs contiguous storage.
        tensor.data = tensor.data.contiguous()
    return model.to(device)
