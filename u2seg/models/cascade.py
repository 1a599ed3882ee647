"""Cascade R-CNN box heads with class-agnostic regression, and the mask head (docs/method.md
stage 6), on torchvision's Matcher, BoxCoder, sampler, RoIAlign and mask-head layers.

Training (detectron2's CascadeROIHeads, which U2Seg trains):

- stage 0 takes the RPN proposals plus the ground-truth boxes, matches them at IoU 0.5 and
  samples `batch_size_per_image` (512) with `positive_fraction` (25 %) foreground;
- stage k > 0 takes the boxes stage k-1 predicted for those proposals (detached, clipped,
  empty ones dropped), matched again at its own IoU (0.6, 0.7), without sampling;
- every stage: RoIAlign (aligned=True) 7x7 from the FPN level of each box, a 2 x 1024 FC
  head, K + 1 class logits (0 = background) and **one** box delta per RoI (class-agnostic),
  encoded with the stage's weights (10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15);
  cross-entropy over all RoIs and L1 over the foreground ones, divided by the number of
  RoIs; the gradient into the shared pooled features is scaled by 1 / stages;
- DropLoss (CutLER, `drop_loss_iou`): a RoI whose predicted box overlaps no ground-truth
  box by more than that IoU gets classification weight 0 (the loss stays the mean over all);
- the mask head (4 conv x 256 on 14x14 RoIs, a deconvolution to 28x28, one mask per class)
  trains on stage 0's foreground RoIs, targets RoIAligned from the masks and thresholded at
  0.5, binary cross-entropy on the RoI's class.

Inference: the boxes pass the three stages; the class scores are the mean of the three
stages' softmax; the last stage's boxes are kept per class above `score_thresh`, NMS per
class at `nms_thresh`, the best `detections_per_image`; masks are the sigmoid of the
predicted class's channel pasted into the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes, roi_align

CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
ROI_LEVELS = ("p2", "p3", "p4", "p5")
ROI_STRIDES = (4, 8, 16, 32)


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask probabilities (N, M, M) of boxes (N, 4) -> (N, 1, H, W) on the image of `size`:
    each pixel centre is mapped into its box and the M x M grid sampled bilinearly there
    (zero outside), in float32. detectron2's aligned paste (`layers/mask_ops.py`); the legacy
    one of torchvision pads the grid by a cell and rounds the box to whole pixels, which
    makes a mask about a pixel wider on each side."""
    height, width = size
    x0, y0, x1, y1 = boxes.float().split(1, dim=1)  # (N, 1) each
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    ys = (ys - y0) / (y1 - y0).clamp(min=1e-6) * 2 - 1  # (N, H) in the box's [-1, 1]
    xs = (xs - x0) / (x1 - x0).clamp(min=1e-6) * 2 - 1  # (N, W)
    grid = torch.stack(
        [xs[:, None, :].expand(-1, height, -1), ys[:, :, None].expand(-1, -1, width)], dim=3
    )
    return F.grid_sample(masks[:, None].float(), grid, align_corners=False)


class RoIPooler(nn.Module):
    """RoIAlign (aligned=True) of each box from its FPN level, detectron2's assignment:
    level = floor(4 + log2(sqrt(area) / 224)), clamped to p2..p5."""

    def __init__(self, output_size: int, sampling_ratio: int = 0) -> None:
        super().__init__()
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    @staticmethod
    def levels(boxes: torch.Tensor) -> torch.Tensor:
        """int64 (N,) level index 0..3 (p2..p5) of (N, 4) boxes."""
        sizes = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp_min(0).sqrt()
        level = torch.floor(4 + torch.log2(sizes / 224 + 1e-8))
        return (level.clamp(2, 5) - 2).to(torch.int64)

    def forward(
        self, features: dict[str, torch.Tensor], boxes: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """(N, C, s, s) features of the boxes of every image, in image order."""
        first = features[ROI_LEVELS[0]]
        rois = torch.cat(
            [torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)]
        ) if boxes else first.new_zeros((0, 5))  # fmt: skip
        out = first.new_zeros((len(rois), first.shape[1], self.output_size, self.output_size))
        levels = self.levels(rois[:, 1:])
        for k, (name, stride) in enumerate(zip(ROI_LEVELS, ROI_STRIDES, strict=True)):
            index = torch.nonzero(levels == k).flatten()
            if len(index):
                out[index] = roi_align(
                    features[name], rois[index], self.output_size, 1.0 / stride,
                    self.sampling_ratio, aligned=True,
                ).to(out.dtype)  # fmt: skip
        return out


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class BoxStage(nn.Module):
    """One cascade stage: 2 x 1024 FC head, K + 1 class logits, one box delta per RoI."""

    def __init__(self, in_channels: int, num_classes: int, representation: int = 1024) -> None:
        super().__init__()
        self.head = TwoMLPHead(in_channels * 7 * 7, representation)
        self.cls_score = nn.Linear(representation, num_classes + 1)
        self.bbox_pred = nn.Linear(representation, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.head(pooled)
        return self.cls_score(x), self.bbox_pred(x)


def box_stage_losses(
    class_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    labels: torch.Tensor,
    regression_targets: torch.Tensor,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification and class-agnostic box losses of one stage.

    `class_logits` (N, K + 1), `box_deltas` (N, 4): one delta per RoI whatever its class;
    `labels` (N,) 0 = background; `regression_targets` (N, 4); `class_weights` (N,) or None
    (DropLoss zeroes some). Cross-entropy: weighted mean over all N RoIs; L1 over the
    foreground RoIs, divided by N (detectron2's normalisation).
    """
    n = max(1, labels.numel())
    ce = F.cross_entropy(class_logits, labels, reduction="none")
    if class_weights is not None:
        ce = ce * class_weights
    foreground = labels > 0
    box = F.l1_loss(box_deltas[foreground], regression_targets[foreground], reduction="sum")
    return ce.sum() / n, box / n


def mask_targets(
    masks: torch.Tensor, boxes: torch.Tensor, matched: torch.Tensor, size: int
) -> torch.Tensor:
    """float (N, size, size) 0/1 targets: the matched GT mask RoIAligned (aligned=True) on
    each box, thresholded at 0.5 (detectron2's `crop_and_resize`)."""
    if len(boxes) == 0:
        return boxes.new_zeros((0, size, size))
    rois = torch.cat([matched[:, None].to(boxes.dtype), boxes], dim=1)
    crops = roi_align(masks[:, None].to(boxes.dtype), rois, size, 1.0, 0, aligned=True)
    return (crops[:, 0] >= 0.5).to(boxes.dtype)


class CascadeROIHeads(nn.Module):
    """Three cascade box stages and a class-specific mask head (module docstring)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        ious: Sequence[float] = CASCADE_IOUS,
        weights: Sequence[Sequence[float]] = CASCADE_WEIGHTS,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
        drop_loss_iou: float = 0.0,
        fc_dim: int = 1024,
        sampling_ratio: int = 0,
    ) -> None:
        super().__init__()
        if len(ious) != len(weights):
            raise ValueError(f"{len(ious)} cascade IoUs but {len(weights)} box weights")
        self.num_classes = num_classes
        self.ious = tuple(float(i) for i in ious)
        self.coders = [BoxCoder(tuple(float(v) for v in w)) for w in weights]
        self.matchers = [Matcher(i, i, allow_low_quality_matches=False) for i in self.ious]
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_pooler = RoIPooler(7, sampling_ratio)
        self.mask_pooler = RoIPooler(14, sampling_ratio)
        self.stages = nn.ModuleList(BoxStage(in_channels, num_classes, fc_dim) for _ in self.ious)
        self.mask_head = MaskRCNNHeads(in_channels, [256] * 4, 1)
        self.mask_predictor = MaskRCNNPredictor(256, 256, num_classes + 1)
        # detectron2's mask predictor init: small logits, so the first BCE is ~log 2.
        nn.init.normal_(self.mask_predictor.mask_fcn_logits.weight, std=0.001)
        nn.init.zeros_(self.mask_predictor.mask_fcn_logits.bias)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.drop_loss_iou = drop_loss_iou

    # -- matching ----------------------------------------------------------------------

    def match(
        self, stage: int, proposals: torch.Tensor, target: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Matched GT index (N,) (0 where unmatched) and labels (N,) (0 = background) of
        one image's proposals at the stage's IoU."""
        gt = target["boxes"]
        if len(gt) == 0:
            zeros = torch.zeros(len(proposals), dtype=torch.int64, device=proposals.device)
            return zeros, zeros.clone()
        index = self.matchers[stage](box_iou(gt, proposals))
        labels = target["labels"][index.clamp(min=0)]
        labels = torch.where(index >= 0, labels, torch.zeros_like(labels))
        return index.clamp(min=0), labels

    def sample(
        self, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Stage 0: GT boxes added to the proposals, matched, subsampled per image."""
        proposals = [
            torch.cat([p, t["boxes"].to(p.dtype)]) for p, t in zip(proposals, targets, strict=True)
        ]
        pairs = [self.match(0, p, t) for p, t in zip(proposals, targets, strict=True)]
        matched, labels = [m for m, _ in pairs], [lab for _, lab in pairs]
        positive, negative = self.sampler([(lab > 0).to(torch.int64) for lab in labels])
        keep = [torch.nonzero(p | n).flatten() for p, n in zip(positive, negative, strict=True)]
        return (
            [p[k] for p, k in zip(proposals, keep, strict=True)],
            [m[k] for m, k in zip(matched, keep, strict=True)],
            [lab[k] for lab, k in zip(labels, keep, strict=True)],
        )

    # -- forward -----------------------------------------------------------------------

    def _stage(
        self, stage: int, features: dict[str, torch.Tensor], boxes: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.box_pooler(features, boxes)
        if self.training:
            pooled = _ScaleGradient.apply(pooled, 1.0 / len(self.stages))
        result: tuple[torch.Tensor, torch.Tensor] = self.stages[stage](pooled)
        return result

    def _predict_boxes(
        self, stage: int, deltas: torch.Tensor, boxes: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Each image's boxes as the stage predicts them (detached, not clipped), decoded in
        float32 whatever the deltas' dtype (bf16 under autocast)."""
        decoded = self.coders[stage].decode_single(deltas.detach().float(), torch.cat(boxes))
        return list(decoded.split([len(b) for b in boxes]))

    @staticmethod
    def _clip(
        boxes: list[torch.Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """The next stage's input: each image's boxes clipped to it."""
        return [clip_boxes_to_image(b, size) for b, size in zip(boxes, image_sizes, strict=True)]

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Detections per image (eval) or losses (training: `targets` with boxes (M, 4),
        labels (M,) in 1..K, masks (M, H, W))."""
        if self.training:
            if targets is None:
                raise ValueError("CascadeROIHeads needs targets in training")
            return [], self.losses(features, proposals, image_sizes, targets)
        return self.detect(features, proposals, image_sizes), {}

    def losses(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        boxes, matched, labels = self.sample(proposals, targets)
        first = (boxes, matched, labels)
        for stage in range(len(self.stages)):
            if stage > 0:
                boxes = [b[remove_small_boxes(b, 1e-3)] for b in boxes]
                pairs = [self.match(stage, b, t) for b, t in zip(boxes, targets, strict=True)]
                matched, labels = [m for m, _ in pairs], [lab for _, lab in pairs]
            logits, deltas = self._stage(stage, features, boxes)
            # An image without ground truth has only background RoIs: no box target.
            gt_boxes = torch.cat(
                [
                    t["boxes"][m] if len(t["boxes"]) else b
                    for t, m, b in zip(targets, matched, boxes, strict=True)
                ]
            )
            regression = self.coders[stage].encode_single(gt_boxes, torch.cat(boxes))
            label = torch.cat(labels)
            predicted = self._predict_boxes(stage, deltas, boxes)
            weights = self._drop_weights(predicted, targets)
            cls, box = box_stage_losses(logits, deltas, label, regression, weights)
            losses[f"loss_cls_stage{stage}"] = cls
            losses[f"loss_box_stage{stage}"] = box
            boxes = self._clip(predicted, image_sizes)
        losses["loss_mask"] = self._mask_loss(features, *first, targets)
        return losses

    def _drop_weights(
        self, predicted: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor | None:
        """DropLoss: weight 0 for RoIs whose `predicted` box (per image) has max IoU <=
        `drop_loss_iou` with every GT box of its image (CutLER); None when off."""
        if self.drop_loss_iou <= 0:
            return None
        weights = []
        for part, target in zip(predicted, targets, strict=True):
            if len(target["boxes"]) == 0:
                weights.append(torch.ones(len(part), device=part.device))
                continue
            best = box_iou(part, target["boxes"].to(part.dtype)).max(dim=1).values
            weights.append((best > self.drop_loss_iou).to(part.dtype))
        return torch.cat(weights)

    def _mask_loss(
        self,
        features: dict[str, torch.Tensor],
        boxes: list[torch.Tensor],
        matched: list[torch.Tensor],
        labels: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
    ) -> torch.Tensor:
        fg = [lab > 0 for lab in labels]
        fg_boxes = [b[f] for b, f in zip(boxes, fg, strict=True)]
        if sum(len(b) for b in fg_boxes) == 0:
            return features[ROI_LEVELS[0]].sum() * 0.0  # keeps every rank's graph alike
        logits = self.mask_predictor(self.mask_head(self.mask_pooler(features, fg_boxes)))
        size = logits.shape[-1]
        target = torch.cat(
            [
                mask_targets(t["masks"], b, m[f], size)
                for t, b, m, f in zip(targets, fg_boxes, matched, fg, strict=True)
            ]
        )
        label = torch.cat([lab[f] for lab, f in zip(labels, fg, strict=True)])
        chosen = logits[torch.arange(len(label), device=label.device), label]
        return F.binary_cross_entropy_with_logits(chosen, target)

    def detect(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """boxes (N, 4), scores (N,), labels (N,) in 1..K, masks (N, 1, H, W) probabilities
        at each image's (unpadded) size."""
        boxes = proposals
        scores = []
        for stage in range(len(self.stages)):
            logits, deltas = self._stage(stage, features, boxes)
            scores.append(F.softmax(logits, dim=-1))
            boxes = self._clip(self._predict_boxes(stage, deltas, boxes), image_sizes)
        mean = torch.stack(scores).mean(dim=0).split([len(b) for b in boxes])
        results = [self._select(b, s) for b, s in zip(boxes, mean, strict=True)]
        found = [r["boxes"] for r in results]
        if sum(len(b) for b in found):
            logits = self.mask_predictor(self.mask_head(self.mask_pooler(features, found)))
            labels = torch.cat([r["labels"] for r in results])
            probs = logits[torch.arange(len(labels), device=labels.device), labels].sigmoid()
            for r, p, size in zip(
                results, probs.split([len(b) for b in found]), image_sizes, strict=True
            ):
                r["masks"] = paste_masks(p, r["boxes"], size)
        for r, size in zip(results, image_sizes, strict=True):
            if "masks" not in r:
                r["masks"] = r["boxes"].new_zeros((0, 1, *size))
        return results

    def _select(self, boxes: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """One image's detections: every (box, class) above the score threshold, NMS per
        class, the best `detections_per_image` (class-agnostic boxes: one box for all)."""
        cls_scores = scores[:, 1:]
        rows, cols = torch.nonzero(cls_scores > self.score_thresh, as_tuple=True)
        chosen, score, label = boxes[rows], cls_scores[rows, cols], cols + 1
        keep = batched_nms(chosen, score, label, self.nms_thresh)[: self.detections_per_image]
        return {"boxes": chosen[keep], "scores": score[keep], "labels": label[keep]}
