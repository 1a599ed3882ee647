"""Cascade ROI heads on hand-made boxes: class-agnostic regression, IoU schedule, DropLoss."""

from __future__ import annotations

import pytest
import torch

from u2seg.models.cascade import (
    CASCADE_IOUS,
    CascadeROIHeads,
    RoIPooler,
    box_stage_losses,
    mask_targets,
    paste_masks,
)


def _box_with_iou(iou: float, size: float = 100.0) -> torch.Tensor:
    """A box of the GT's size [0, 0, size, size] shifted right until its IoU is `iou`."""
    # IoU of a horizontal shift d: (s - d) / (s + d) -> d = s (1 - iou) / (1 + iou).
    d = size * (1 - iou) / (1 + iou)
    return torch.tensor([[d, 0.0, size + d, size]])


def test_box_targets_are_one_delta_per_roi_with_each_stage_weights() -> None:
    heads = CascadeROIHeads(num_classes=5)
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[1.0, 1.0, 11.0, 11.0]])
    # Centre shift 1 on a 10 px box, same size: dx = dy = wx * 0.1, dw = dh = 0.
    expected = ([1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0], [3.0, 3.0, 0.0, 0.0])
    for coder, want in zip(heads.coders, expected, strict=True):
        torch.testing.assert_close(coder.encode_single(gt, proposal)[0], torch.tensor(want))
    # One box output per stage, whatever K.
    assert [stage.bbox_pred.out_features for stage in heads.stages] == [4, 4, 4]
    assert [stage.cls_score.out_features for stage in heads.stages] == [6, 6, 6]


def test_box_loss_is_class_agnostic() -> None:
    logits = torch.zeros(3, 4)
    deltas = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # Two foreground RoIs of different classes, one background (its delta is ignored).
    _, box = box_stage_losses(logits, deltas, torch.tensor([1, 3, 0]), targets)
    assert box.item() == pytest.approx(0.5 / 3)  # L1 over the foreground, / all RoIs
    _, same = box_stage_losses(logits, deltas, torch.tensor([2, 1, 0]), targets)
    assert same.item() == pytest.approx(box.item())  # other classes, the same box loss
    cls, _ = box_stage_losses(logits, deltas, torch.tensor([1, 3, 0]), targets)
    assert cls.item() == pytest.approx(torch.log(torch.tensor(4.0)).item())  # uniform logits
    dropped, _ = box_stage_losses(logits, deltas, torch.tensor([1, 3, 0]), targets,
                                  torch.tensor([1.0, 0.0, 1.0]))  # fmt: skip
    assert dropped.item() == pytest.approx(cls.item() * 2 / 3)  # still the mean over all 3


@pytest.mark.parametrize(
    ("iou", "labels"),
    [(0.45, [0, 0, 0]), (0.55, [2, 0, 0]), (0.65, [2, 2, 0]), (0.75, [2, 2, 2])],
)
def test_each_stage_matches_at_its_own_iou(iou: float, labels: list[int]) -> None:
    heads = CascadeROIHeads(num_classes=3)
    assert heads.ious == CASCADE_IOUS == (0.5, 0.6, 0.7)
    target = {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "labels": torch.tensor([2])}
    box = _box_with_iou(iou)
    got = [int(heads.match(stage, box, target)[1][0]) for stage in range(3)]
    assert got == labels


def test_stage_zero_samples_with_the_ground_truth_added() -> None:
    heads = CascadeROIHeads(num_classes=2, batch_size_per_image=8, positive_fraction=0.25)
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 90.0]])
    target = {"boxes": gt, "labels": torch.tensor([1, 2])}
    far = torch.tensor([[0.0, 0.0, 5.0, 5.0]]).repeat(20, 1) + torch.arange(20.0)[:, None]
    boxes, matched, labels = heads.sample([far], [target])
    # No proposal overlaps: the only foreground are the two GT boxes themselves (2 of 8).
    assert sorted(labels[0].tolist()) == [0] * 6 + [1, 2]
    fg = labels[0] > 0
    torch.testing.assert_close(boxes[0][fg].sort(dim=0).values, gt.sort(dim=0).values)
    assert set(matched[0][fg].tolist()) == {0, 1}


def test_drop_loss_zeroes_rois_whose_prediction_misses_every_box() -> None:
    heads = CascadeROIHeads(num_classes=1, drop_loss_iou=0.01)
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])]
    predicted = heads._predict_boxes(0, torch.zeros(2, 4), boxes)  # zero deltas: the boxes
    weights = heads._drop_weights(predicted, [target])
    assert weights is not None and weights.tolist() == [1.0, 0.0]
    assert CascadeROIHeads(num_classes=1)._drop_weights(predicted, [target]) is None


def test_rois_are_pooled_from_detectron2s_level() -> None:
    sizes = torch.tensor([16.0, 112.0, 224.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros(5), torch.zeros(5), sizes, sizes], dim=1)
    assert RoIPooler.levels(boxes).tolist() == [0, 1, 2, 3, 3]  # p2, p3, p4, p5, p5
    # Aligned RoIAlign on a ramp (value = column index): the box's pixels 12..16 at stride
    # 4 are columns 2.5..3.5 once the half-pixel shift is applied, sampled at 2.75 and 3.25
    # (torchvision's default, unaligned, would read 3.25 and 3.75).
    ramp = torch.arange(16.0).expand(1, 1, 16, 16)
    features = {f"p{k}": ramp[..., : 64 // 2**k, : 64 // 2**k] for k in range(2, 6)}
    out = RoIPooler(2)(features, [torch.tensor([[12.0, 8.0, 16.0, 12.0]])])
    torch.testing.assert_close(out[0, 0], torch.tensor([[2.75, 3.25], [2.75, 3.25]]))


def test_mask_targets_are_thresholded_crops() -> None:
    masks = torch.zeros(1, 20, 20, dtype=torch.uint8)
    masks[0, :, :10] = 1
    box = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
    target = mask_targets(masks, box, torch.tensor([0]), 4)
    assert target.tolist() == [[[1.0, 1.0, 0.0, 0.0]] * 4]
    assert set(torch.unique(mask_targets(masks, box + 0.3, torch.tensor([0]), 7)).tolist()) <= {
        0.0,
        1.0,
    }


def test_pasted_masks_cover_the_pixels_whose_centres_lie_in_the_box() -> None:
    """The aligned paste: a mask of ones reaches, along the box's middle row and column,
    exactly the pixels whose centres are inside its box (the legacy paste with padding 1
    reaches a pixel further on each side) and nothing outside (bilinear sampling against the
    zeros outside rounds the corners); half a 28 x 28 grid fills half the box."""
    boxes = torch.tensor([[10.2, 20.0, 50.7, 40.4], [0.0, 0.0, 100.0, 60.0]])
    ones = torch.ones(2, 28, 28)
    pasted = paste_masks(ones, boxes, (80, 120))[:, 0] > 0.5
    assert pasted.shape == (2, 80, 120)
    for mask, (x0, y0, x1, y1) in zip(pasted, boxes.tolist(), strict=True):
        centres_y = torch.arange(80) + 0.5
        centres_x = torch.arange(120) + 0.5
        inside = ((centres_y >= y0) & (centres_y <= y1))[:, None] & (
            (centres_x >= x0) & (centres_x <= x1)
        )[None, :]
        assert not (mask & ~inside).any()
        row, col = int((y0 + y1) / 2), int((x0 + x1) / 2)
        assert torch.equal(mask[row], inside[row]) and torch.equal(mask[:, col], inside[:, col])
    left = torch.zeros(1, 28, 28)
    left[:, :, :14] = 1.0
    half = paste_masks(left, boxes[1:], (80, 120))[0, 0] > 0.5
    assert half[30, :50].all() and not half[:, 50:].any()
