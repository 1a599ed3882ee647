"""STEGO's segmentation head: a small network over frozen ViT patch tokens (docs/method.md stage 4).

Trained by `u2seg.stages._stego_train` with the correspondence loss of `u2seg.ops.stuff`;
its codes are clustered by the unsupervised cluster probe (`u2seg.ops.stuff.fit_cluster_probe`).
"""

from __future__ import annotations

import torch
from torch import nn


class SegmentationHead(nn.Module):
    """STEGO's segmentation head: frozen features (B, D, h, w) -> codes (B, C, h, w).

    A linear 1x1 conv plus a nonlinear branch (1x1 conv, ReLU, 1x1 conv), both fed the
    features after channel dropout (Dropout2d, p=0.1), as in STEGO's `DinoFeaturizer`
    with projection_type "nonlinear". C = `code_dim`: 70 in STEGO's configs, 100 in some.
    """

    def __init__(self, in_dim: int, code_dim: int = 70, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.code_dim = code_dim
        self.dropout = nn.Dropout2d(p=dropout)
        self.linear = nn.Conv2d(in_dim, code_dim, 1)
        self.nonlinear = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, code_dim, 1)
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.dropout(feats)
        return self.linear(x) + self.nonlinear(x)

    def codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, h, w, D) -> codes (B, h, w, C), channels last like the tokens."""
        return self(tokens.permute(0, 3, 1, 2).float()).permute(0, 2, 3, 1)


def load_head(state_dict: dict[str, torch.Tensor], dropout: float = 0.1) -> SegmentationHead:
    """A `SegmentationHead` (eval mode) from `train_loop_per_worker`'s state dict."""
    code_dim, in_dim = state_dict["linear.weight"].shape[:2]
    head = SegmentationHead(int(in_dim), int(code_dim), dropout)
    head.load_state_dict(state_dict)
    return head.eval()
