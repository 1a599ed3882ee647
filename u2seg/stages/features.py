"""Stage `features`: per-image CLS and mean-pooled patch vectors from the frozen ViT.

Full patch grids are never stored (a 60x60x768 grid is ~11 MB per image); later stages
recompute what they need.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from u2seg.config import PipelineConfig
from u2seg.lease import leased
from u2seg.plan import planned
from u2seg.stages._image_loop import ImageStage, base_columns, run_image_stage
from u2seg.workers.vit import FeatureExtractor

STAGE = "features"


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


@planned("features")
@leased
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
