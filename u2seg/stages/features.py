"""Stage `features`: per-image CLS and mean-pooled patch vectors from the frozen ViT.

Full patch grids are never stored (a 60x60x768 grid is ~11 MB per image); later stages
recompute what they need.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from u2seg.config import PipelineConfig
from u2seg.models.vit import normalise
from u2seg.stages._image_loop import BackboneActor, ImageStage, base_columns, run_image_stage

STAGE = "features"


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


def _vectors(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """(N, D) float32 -> fixed-size-list column, null where not `valid`."""
    dim = values.shape[1]
    flat = pa.array(values.reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))


def to_shard_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    """The driver-side table of one result batch (errors as null vectors)."""
    valid = batch["error"].astype(str) == ""
    return pa.table(
        {
            **base_columns(batch),
            "cls": _vectors(batch["cls"], valid),
            "patch_mean": _vectors(batch["patch_mean"], valid),
        }
    )


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Extract features for every image of `cfg.data`; returns the stage manifest."""
    spec = ImageStage(
        name=STAGE,
        depends_on=("data", "backbone", "features"),
        actor=FeatureExtractor,
        actor_kwargs={},
        actors=cfg.features,
        image_size=cfg.features.image_size,
        to_rows=to_shard_rows,
    )
    stage, result = run_image_stage(cfg, spec)
    return stage.finish(result["counts"], result["errors"], {"timing": result["timing"]})
