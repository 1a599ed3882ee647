"""The panoptic model end to end on tiny images: outputs, an overfit run, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from u2seg.models.panoptic_fpn import PanopticFPN, build_model
from u2seg.models.pyramid import STRIDES, CheckpointError, ResNetFPN, load_resnet_checkpoint
from u2seg.models.vit import load_backbone
from u2seg.ops.schedule import clip_per_parameter

SMALL = {
    "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 64,
    "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 64,
    "roi_batch_size_per_image": 64, "box_head_dim": 128,
}  # fmt: skip


def scene(size: int = 128) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A photo-like image with two boxes of distinct texture on two stuff halves."""
    g = torch.Generator().manual_seed(size)
    image = torch.rand(3, size, size, generator=g) * 60
    image[:, :, size // 2 :] += 120  # stuff 2 on the right half
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[0, 10:60, 12:58] = 1
    masks[1, 70:118, 72:120] = 1
    image[0][masks[0].bool()] = 250
    image[2][masks[1].bool()] = 250
    semantic = torch.ones(size, size, dtype=torch.int64)
    semantic[:, size // 2 :] = 2
    semantic[masks.any(0).bool()] = 0
    boxes = torch.tensor([[12.0, 10.0, 58.0, 60.0], [72.0, 70.0, 120.0, 118.0]])
    return image, {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks,
                   "semantic": semantic}  # fmt: skip


@pytest.fixture(scope="module")
def vit(weights_cache: Path):
    return load_backbone("dinov2_vits14", cache_dir=weights_cache)


def test_eval_outputs_at_each_image_size(vit) -> None:
    torch.manual_seed(0)
    model = build_model("vit", 3, 2, vit=vit, **SMALL).eval()
    images = [torch.rand(3, 100, 130) * 255, torch.rand(3, 64, 70) * 255]
    with torch.no_grad():
        out = model(images)
    for det, (h, w) in zip(out, [(100, 130), (64, 70)], strict=True):
        assert det["sem_seg"].shape == (3, h, w)  # S + 1 classes, things = 0
        n = len(det["boxes"])
        assert det["masks"].shape == (n, 1, h, w) and det["scores"].shape == (n,)
        assert n <= 100
        if n:
            assert det["labels"].min() >= 1 and det["labels"].max() <= 3
            assert det["masks"].min() >= 0 and det["masks"].max() <= 1
            assert bool((det["scores"][:-1] >= det["scores"][1:]).all())


def test_vit_pyramid_has_power_of_two_strides_and_stays_frozen(vit) -> None:
    model = build_model("vit", 1, 1, vit=vit, **SMALL)
    images = model.batch([torch.zeros(3, 100, 130)])
    assert tuple(images.tensors.shape[-2:]) == (128, 192)  # padded to multiples of 64
    features = model.backbone(images.tensors)
    assert [tuple(f.shape[-2:]) for f in features.values()] == [
        (32, 48), (16, 24), (8, 12), (4, 6), (2, 3)
    ]  # fmt: skip
    assert not any(p.requires_grad for p in model.backbone.vit.parameters())
    narrow = build_model("vit", 1, 1, vit=vit, channels=128, **SMALL)  # train.fpn_channels
    assert {f.shape[1] for f in narrow.backbone(images.tensors).values()} == {128}
    with torch.no_grad():
        (out,) = narrow.eval()([torch.zeros(3, 100, 130)])
    assert out["sem_seg"].shape == (2, 100, 130)


@pytest.mark.slow
def test_loss_falls_when_overfitting_two_images(vit) -> None:
    torch.manual_seed(0)
    model = build_model("vit", 2, 2, vit=vit, **SMALL).train()
    batch = [scene(128), scene(128)]
    images, targets = [b[0] for b in batch], [b[1] for b in batch]
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    totals = []
    for _ in range(12):
        losses = model(images, targets)
        assert set(losses) >= {"loss_objectness", "loss_cls_stage2", "loss_mask", "loss_sem_seg"}
        total = sum(losses.values())
        optimiser.zero_grad()
        total.backward()
        clip_per_parameter(params, 1.0)
        optimiser.step()
        totals.append(float(total.detach()))
    assert sum(totals[-3:]) / 3 < 0.6 * sum(totals[:3]) / 3


def test_resnet_fpn_trains_every_stage_and_loads_checkpoints(tmp_path: Path) -> None:
    model = ResNetFPN("bn")
    assert all(p.requires_grad for p in model.resnet.parameters())
    source = ResNetFPN("bn").resnet.state_dict()
    wrapped = {"teacher": {f"module.backbone.{k}": v for k, v in source.items()
                           if not k.startswith("fc.")}}  # fmt: skip
    torch.save(wrapped, tmp_path / "dino.pth")
    load_resnet_checkpoint(model, tmp_path / "dino.pth")
    torch.testing.assert_close(model.resnet.conv1.weight, source["conv1.weight"])
    other = {k: v for k, v in source.items() if not k.startswith("layer4.")}
    torch.save(other, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"short\.pth is not a ResNet-50 .* keys missing"):
        load_resnet_checkpoint(model, tmp_path / "short.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "dino.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable"):
        load_resnet_checkpoint(model, tmp_path / "cut.pth")


def test_bad_inputs_are_refused() -> None:
    model = PanopticFPN(ResNetFPN("frozen_bn"), 1, 1, **SMALL)
    with pytest.raises(ValueError, match="expected \\(3, H, W\\)"):
        model.eval()([torch.zeros(1, 32, 32)])
    with pytest.raises(ValueError, match="needs targets"):
        model.train()([torch.zeros(3, 32, 32)])
    with pytest.raises(ValueError, match="backbone='swin'"):
        build_model("swin", 1, 1)


def test_an_image_without_instances_trains_on_background() -> None:
    torch.manual_seed(0)
    model = PanopticFPN(ResNetFPN("frozen_bn"), 2, 1, drop_loss_iou=0.01, **SMALL).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 64, 64, dtype=torch.uint8),
             "semantic": torch.ones(64, 64, dtype=torch.int64)}  # fmt: skip
    losses = model([torch.rand(3, 64, 64) * 255], [empty])
    assert all(torch.isfinite(v) for v in losses.values())
    values = {k: v.item() for k, v in losses.items()}
    assert values["loss_box_stage0"] == 0.0 and values["loss_mask"] == 0.0
    assert values["loss_cls_stage0"] > 0  # every RoI is background, still scored
    sum(losses.values()).backward()
    assert model.roi_heads.stages[0].cls_score.weight.grad is not None


def test_boxes_stay_float32_under_bf16_autocast() -> None:
    # torchvision builds anchors in the features' dtype and decodes boxes in the deltas':
    # under bf16 autocast (training on GPU) both were rounded, by up to 7 px at 800 x 1344.
    torch.manual_seed(0)
    model = build_model("resnet50", 3, 2, **SMALL).train()
    images = ImageList(torch.zeros(1, 3, 800, 1344), [(800, 1344)])
    shapes = [torch.zeros(1, 1, 800 // s, 1344 // s) for s in STRIDES]
    small = [torch.randn(1, 256, 8, 8) for _ in STRIDES]
    proposals = torch.tensor([[1001.3, 602.7, 1301.9, 797.1], [3.2, 5.9, 40.1, 77.7]])
    deltas = torch.randn(2, 4) * 0.1
    with torch.no_grad():
        reference = model.rpn.anchor_generator(images, shapes)[0]
        expected = model.roi_heads._predict_boxes(0, deltas, [proposals])[0]
        with torch.autocast("cpu", torch.bfloat16):
            anchors = model.rpn.anchor_generator(images, [f.bfloat16() for f in shapes])[0]
            logits, rpn_deltas = model.rpn.head([f.bfloat16() for f in small])
            decoded = model.roi_heads._predict_boxes(0, deltas.bfloat16(), [proposals])[0]
    assert anchors.dtype == torch.float32 and torch.equal(anchors, reference)
    assert reference.abs().max() > 1000  # anchors where bf16 steps are 8 px
    assert all(t.dtype == torch.float32 for t in [*logits, *rpn_deltas])
    assert decoded.dtype == torch.float32
    # The deltas' own bf16 rounding stays; the boxes are not rounded on top of it.
    assert torch.allclose(decoded, expected, atol=0.5)
    assert not torch.equal(decoded, decoded.bfloat16().float())
