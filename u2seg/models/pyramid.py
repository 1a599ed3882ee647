"""Feature pyramids for the panoptic model: p2..p6 (strides 4..64), 256 channels each.

* `ResNetFPN`: torchvision's ResNet-50 and FPN (`BackboneWithFPN`), every stage trainable
  (the paper trains from a self-supervised DINO ResNet-50, not from frozen ImageNet
  stages); p6 is a stride-2 max-pool of p5, as detectron2's FPN. Norm layers: plain
  BatchNorm (`norm="bn"`, converted to SyncBatchNorm by the training stage when it runs
  distributed on GPUs) or frozen statistics (`norm="frozen_bn"`, for a small batch on a
  pretrained checkpoint). `load_resnet_checkpoint` reads a DINO-style checkpoint with
  `weights_only=True`.
* `ViTPyramid`: the ViT that made the pseudo labels (e.g. the packaged DINOv2 ViT-S/14)
  behind ViTDet's simple feature pyramid (deconvolutions to strides 4 and 8, the map
  itself at 16, max-pool to 32; 1x1 + 3x3 convolutions with LayerNorm), frozen by default.
  A patch-14 ViT sees the padded image resized by 14/16, so its token grid is exactly the
  stride-16 grid and every level has the power-of-two stride the anchors and RoI pooling
  assume.

Both take ImageNet-normalised (B, 3, H, W) batches with H and W multiples of
`size_divisibility` and return an ordered dict "p2".."p6".
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from u2seg.models.vit import ViTBackbone, read_weights_file
from u2seg.ops.state_dicts import state_dict_differences

LEVELS = ("p2", "p3", "p4", "p5", "p6")
STRIDES = (4, 8, 16, 32, 64)
NORMS = ("bn", "frozen_bn")
# Key prefixes of self-supervised ResNet checkpoints (DINO's `teacher`/`student` wrap the
# backbone in `module.backbone.`; MoCo-style exports use `encoder.` or `module.`).
_PREFIXES = ("module.", "backbone.", "encoder.", "model.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the file."""


class ResNetFPN(nn.Module):
    """ResNet-50 + FPN -> p2..p6, 256 channels."""

    size_divisibility = 32

    def __init__(self, norm: str = "bn", out_channels: int = 256) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not one of {NORMS}")
        layer = nn.BatchNorm2d if norm == "bn" else FrozenBatchNorm2d
        self.resnet = resnet50(weights=None, norm_layer=layer)
        self.body = BackboneWithFPN(
            self.resnet,
            return_layers={f"layer{k}": LEVELS[k - 1] for k in range(1, 5)},
            in_channels_list=[256, 512, 1024, 2048],
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = self.body(images)
        return OrderedDict(zip(LEVELS, out.values(), strict=True))


#: DINO's ResNet-50 (facebookresearch/dino), what `train.weights: hub` starts from.
DINO_RESNET50_URL = (
    "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth"
)
HUB = "hub"


def _hub_state() -> object:
    """DINO's ResNet-50 weights, downloaded once into torch.hub's cache (TORCH_HOME)."""
    try:
        return torch.hub.load_state_dict_from_url(
            DINO_RESNET50_URL, map_location="cpu", weights_only=True
        )
    except OSError as exc:  # no network, a proxy, a full disk
        raise CheckpointError(
            f"train.weights=hub: could not fetch {DINO_RESNET50_URL} ({exc}); download it "
            "where the internet can be reached and set train.weights=<that file>"
        ) from None


def load_resnet_checkpoint(model: ResNetFPN, path: str | Path) -> None:
    """Load a ResNet-50 checkpoint (torchvision layout, e.g. DINO's; a local path, an fsspec
    URL such as s3://bucket/dino_resnet50_pretrain.pth, or `HUB`: DINO's from its public
    URL, cached by torch.hub) into `model.resnet`.

    The file is read with `weights_only=True` (no pickled objects). A dict holding the
    weights under "state_dict", "model", "teacher" or "student" is unwrapped and the usual
    prefixes are stripped; the classifier (`fc.*`) is ignored. Any other key that is
    missing, unexpected or of another shape is a `CheckpointError` naming the file.
    """
    try:
        if str(path) == HUB:
            state = _hub_state()
        else:
            data = read_weights_file(str(path))
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"ResNet checkpoint not found: {path}") from None
    except Exception as exc:  # torch raises many types for a corrupt or unsafe file
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint ({exc})") from None
    for key in ("state_dict", "model", "teacher", "student"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        if not key.startswith("fc."):
            cleaned[key] = value
    own = {k: v for k, v in model.resnet.state_dict().items() if not k.startswith("fc.")}
    differences = state_dict_differences(cleaned, own)
    if differences:
        raise CheckpointError(f"{path} is not a ResNet-50 checkpoint: {differences}")
    model.resnet.load_state_dict(cleaned, strict=False)


def _conv_norm(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), LayerNorm2d(cout)
    )


class ViTPyramid(nn.Module):
    """A ViT behind ViTDet's simple feature pyramid -> p2..p6, 256 channels."""

    size_divisibility = 64

    def __init__(self, vit: ViTBackbone, trainable: bool = False, out_channels: int = 256) -> None:
        super().__init__()
        self.vit = vit
        self.trainable = trainable
        vit.model.requires_grad_(trainable)
        dim = vit.embed_dim
        self.scales = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                    LayerNorm2d(dim // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
                ),
                nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2),
            ]
        )
        widths = (dim // 4, dim // 2, dim, dim)
        self.outputs = nn.ModuleList(
            nn.Sequential(_conv_norm(w, out_channels, 1), _conv_norm(out_channels, out_channels, 3))
            for w in widths
        )
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        height, width = images.shape[-2:]
        if height % self.size_divisibility or width % self.size_divisibility:
            raise ValueError(
                f"ViTPyramid: image size {height}x{width} is not a multiple of "
                f"{self.size_divisibility}"
            )
        patch = self.vit.patch_size
        grid = (height // 16, width // 16)
        if patch != 16:
            images = F.interpolate(
                images, size=(grid[0] * patch, grid[1] * patch), mode="bilinear",
                align_corners=False, antialias=True,
            )  # fmt: skip
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            tokens = self.vit.tokens(images)
        x = tokens.permute(0, 3, 1, 2).contiguous()
        maps = [out(scale(x)) for scale, out in zip(self.scales, self.outputs, strict=True)]
        maps.append(F.max_pool2d(maps[-1], kernel_size=1, stride=2))
        return OrderedDict(zip(LEVELS, maps, strict=True))
