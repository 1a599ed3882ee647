"""Panoptic FPN with Cascade ROI heads (docs/method.md stage 6): the model U2Seg trains.

A feature pyramid (`u2seg.models.pyramid`: ResNet-50 + FPN, or the pseudo labels' ViT
behind a simple feature pyramid), torchvision's RPN on p2..p6 (anchors 32..512, ratios
0.5 / 1 / 2), `CascadeROIHeads` on p2..p5 and a semantic FPN head (128 channels,
GroupNorm 32, summed at stride 4, S + 1 classes with all things as class 0, ignore 255,
loss weight 0.5).

`PanopticFPN.forward(images, targets)`: `images` a list of (3, H, W) float tensors in
0..255 (RGB, any sizes); the model normalises them (ImageNet mean / std) and pads the batch
to the pyramid's size divisibility. Training `targets`, per image: boxes (M, 4) xyxy,
labels (M,) thing classes 1..K, masks (M, H, W) uint8 and semantic (H, W) int64 (0 things,
1..S stuff, 255 void). Training returns the losses; evaluation returns, per image, boxes,
scores, labels, masks (N, 1, H, W) probabilities and sem_seg (S + 1, H, W) logits, all at
the image's input size. The panoptic merge of the two is `u2seg.ops.panoptic`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from u2seg.models.cascade import CASCADE_IOUS, CASCADE_WEIGHTS, ROI_LEVELS, CascadeROIHeads
from u2seg.models.pyramid import STRIDES, ResNetFPN, ViTPyramid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255


class SemanticFPNHead(nn.Module):
    """detectron2's SemSegFPNHead: each of p2..p5 through 3x3 conv + GroupNorm + ReLU (and
    2x bilinear upsampling) stages down to stride 4, summed, a 1x1 classifier, upsampled to
    the padded image. Cross-entropy ignoring 255, times `loss_weight`."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        channels: int = 128,
        groups: int = 32,
        loss_weight: float = 0.5,
    ) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for stride in STRIDES[: len(ROI_LEVELS)]:
            layers: list[nn.Module] = []
            for k in range(max(1, int(math.log2(stride / STRIDES[0])))):
                conv = nn.Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1,
                                 bias=False)  # fmt: skip
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                layers += [conv, nn.GroupNorm(groups, channels), nn.ReLU(inplace=True)]
                if stride != STRIDES[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        nn.init.kaiming_normal_(self.predictor.weight, mode="fan_out", nonlinearity="relu")
        assert self.predictor.bias is not None
        nn.init.zeros_(self.predictor.bias)
        self.loss_weight = loss_weight

    def forward(self, features: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """(B, S + 1, H, W) logits at the padded image size `size`."""
        x = sum(
            head(features[name]) for head, name in zip(self.scale_heads, ROI_LEVELS, strict=True)
        )
        assert isinstance(x, torch.Tensor)
        return F.interpolate(self.predictor(x), size=size, mode="bilinear", align_corners=False)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Weighted cross-entropy; `targets` (B, H, W) int64, 255 ignored (also padding)."""
        if not bool((targets != IGNORE).any()):
            return logits.sum() * 0.0
        return self.loss_weight * F.cross_entropy(logits, targets, ignore_index=IGNORE)


class FP32AnchorGenerator(AnchorGenerator):
    """torchvision's anchors, always in float32. torchvision builds them in the dtype of the
    feature maps, so under bf16 autocast every anchor was rounded (up to 7 px at 800 x 1344,
    two in three of them moved), and so were the proposals and the ground truth added to
    them; detectron2 keeps boxes in fp32."""

    def forward(
        self, image_list: ImageList, feature_maps: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        # Zero-stride stand-ins: the generator reads only their shapes and device.
        shapes = [torch.zeros((), device=f.device).expand(f.shape) for f in feature_maps]
        return super().forward(image_list, shapes)


class FP32RPNHead(RPNHead):
    """torchvision's RPN head with float32 outputs, so that proposals are decoded in fp32
    under autocast (torchvision's BoxCoder decodes in the deltas' dtype; detectron2: "ensure
    fp32 for decoding precision")."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class PanopticFPN(nn.Module):
    """Pyramid + RPN + Cascade ROI heads + semantic head (module docstring)."""

    def __init__(
        self,
        backbone: ResNetFPN | ViTPyramid,
        num_things: int,
        num_stuff: int,
        *,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 1000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_batch_size_per_image: int = 256,
        roi_batch_size_per_image: int = 512,
        roi_positive_fraction: float = 0.25,
        cascade_ious: Sequence[float] = CASCADE_IOUS,
        cascade_weights: Sequence[Sequence[float]] = CASCADE_WEIGHTS,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
        drop_loss_iou: float = 0.0,
        semantic_loss_weight: float = 0.5,
        box_head_dim: int = 1024,
        roi_sampling_ratio: int = 0,
    ) -> None:
        super().__init__()
        if num_things < 1 or num_stuff < 0:
            raise ValueError(f"num_things={num_things} must be >= 1, num_stuff={num_stuff} >= 0")
        self.num_things, self.num_stuff = num_things, num_stuff
        self.backbone = backbone
        channels = backbone.out_channels
        anchors = FP32AnchorGenerator(
            sizes=tuple((s,) for s in (32, 64, 128, 256, 512)),
            aspect_ratios=((0.5, 1.0, 2.0),) * 5,
        )
        self.rpn = RegionProposalNetwork(
            anchors,
            FP32RPNHead(channels, 3),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=rpn_batch_size_per_image,
            positive_fraction=0.5,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={
                "training": rpn_post_nms_top_n_train,
                "testing": rpn_post_nms_top_n_test,
            },
            nms_thresh=rpn_nms_thresh,
        )
        self.roi_heads = CascadeROIHeads(
            num_things, channels, cascade_ious, cascade_weights, roi_batch_size_per_image,
            roi_positive_fraction, score_thresh, nms_thresh, detections_per_image, drop_loss_iou,
            box_head_dim, roi_sampling_ratio,
        )  # fmt: skip
        self.sem_seg_head = SemanticFPNHead(
            num_stuff + 1, channels, loss_weight=semantic_loss_weight
        )
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255)

    def batch(self, images: Sequence[torch.Tensor]) -> ImageList:
        """Normalised images padded (with 0 after normalising) into one tensor."""
        if not images:
            raise ValueError("PanopticFPN needs at least one image")
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        d = self.backbone.size_divisibility
        height = -(-max(h for h, _ in sizes) // d) * d
        width = -(-max(w for _, w in sizes) // d) * d
        mean, std = self.pixel_mean, self.pixel_std
        assert isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor)
        out = mean.new_zeros((len(images), 3, height, width))
        for k, im in enumerate(images):
            if im.ndim != 3 or im.shape[0] != 3:
                raise ValueError(f"image {k}: expected (3, H, W), got {tuple(im.shape)}")
            out[k, :, : sizes[k][0], : sizes[k][1]] = (im.to(out) - mean) / std
        return ImageList(out, sizes)

    def forward(
        self,
        images: Sequence[torch.Tensor],
        targets: Sequence[dict[str, torch.Tensor]] | None = None,
    ) -> Any:
        batch = self.batch(images)
        features = self.backbone(batch.tensors)
        padded = (int(batch.tensors.shape[-2]), int(batch.tensors.shape[-1]))
        if self.training:
            if targets is None:
                raise ValueError("PanopticFPN needs targets in training")
            device = batch.tensors.device
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            rpn_targets = [{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in targets]
            proposals, losses = self.rpn(batch, features, rpn_targets)
            _, roi_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
            losses.update(roi_losses)
            semantic = torch.full((len(targets), *padded), IGNORE, dtype=torch.int64, device=device)
            for k, t in enumerate(targets):
                h, w = t["semantic"].shape
                semantic[k, :h, :w] = t["semantic"]
            logits = self.sem_seg_head(features, padded)
            losses["loss_sem_seg"] = self.sem_seg_head.loss(logits, semantic)
            return losses
        proposals, _ = self.rpn(batch, features)
        detections, _ = self.roi_heads(features, proposals, batch.image_sizes)
        logits = self.sem_seg_head(features, padded)
        for det, sem, (h, w) in zip(detections, logits, batch.image_sizes, strict=True):
            det["sem_seg"] = sem[:, :h, :w]
        return detections


def build_model(
    backbone: str,
    num_things: int,
    num_stuff: int,
    *,
    vit: Any = None,
    norm: str = "bn",
    vit_trainable: bool = False,
    channels: int = 256,
    **heads: Any,
) -> PanopticFPN:
    """A `PanopticFPN` on `backbone` "resnet50" (`norm` "bn" or "frozen_bn") or "vit"
    (`vit`: a loaded `ViTBackbone`, frozen unless `vit_trainable`), its pyramid `channels`
    wide; `heads`: the keyword options of `PanopticFPN`."""
    pyramid: ResNetFPN | ViTPyramid
    if backbone == "resnet50":
        pyramid = ResNetFPN(norm, channels)
    elif backbone == "vit":
        if vit is None:
            raise ValueError("backbone='vit' needs the loaded ViT (vit=...)")
        pyramid = ViTPyramid(vit, vit_trainable, channels)
    else:
        raise ValueError(f"backbone={backbone!r} is not one of 'resnet50', 'vit'")
    return PanopticFPN(pyramid, num_things, num_stuff, **heads)
