"""The ViT stages' per-batch work: the frozen backbone loaded once per actor, on its device,
and the batch functions of `features` and `embed`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from u2seg.config import BackboneConfig
from u2seg.models.vit import ViTBackbone, load_backbone, normalise
from u2seg.runtime import resolve_device


class BackboneActor:
    """Base of the Ray Data actors that run the frozen ViT: loads it once, on its device."""

    def __init__(
        self, backbone: dict[str, Any], threads: int | None = None, state: Any = None
    ) -> None:
        """`state`: the backbone's weights (`backbone_state`) or a Ray object reference to
        them; None loads them here from `backbone`'s settings."""
        cfg = BackboneConfig(**backbone)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu" and threads:
            # Ray pins fractional-CPU actors to one thread; the forward is the bottleneck.
            torch.set_num_threads(threads)
        if state is not None and not isinstance(state, dict):
            import ray

            state = ray.get(state)
        self.model: ViTBackbone = load_backbone(
            cfg.name, cfg.weights, cfg.cache_dir, self.device, state=state,
            precision=cfg.precision,
        )  # fmt: skip


class FeatureExtractor(BackboneActor):
    """Ray Data actor: square images -> CLS and mean patch vector per image.

    Rows whose `error` is set pass through with zero vectors (the writer stores nulls).
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        n, dim = len(ok), self.model.embed_dim
        cls = np.zeros((n, dim), dtype=np.float32)
        patch_mean = np.zeros((n, dim), dtype=np.float32)
        if ok.any():
            with torch.inference_mode():
                out = self.model(normalise(batch["image"][ok], self.device), want_keys=False)
            cls[ok] = out.cls.float().cpu().numpy()
            patch_mean[ok] = out.patch_tokens.float().mean(dim=(1, 2)).cpu().numpy()
        result = {k: v for k, v in batch.items() if k not in ("image", "path")}
        result["cls"] = cls
        result["patch_mean"] = patch_mean
        return result


class CropEmbedder(BackboneActor):
    """Ray Data actor: square crops -> CLS vector (after the final norm) per crop."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        vectors = np.zeros((len(ok), self.model.embed_dim), dtype=np.float32)
        if ok.any():
            with torch.inference_mode():
                out = self.model(normalise(batch["image"][ok], self.device), want_keys=False)
            vectors[ok] = out.cls.float().cpu().numpy()
        result = {k: v for k, v in batch.items() if k != "image"}
        result["vector"] = vectors
        return result
