"""u2seg: unsupervised universal image segmentation at cluster scale.

The public API is the stage functions, `run_<stage>(cfg) -> manifest`, and `load_config`:

    import u2seg
    cfg = u2seg.load_config("configs/demo.yaml", ["data.source=/images"])
    manifest = u2seg.run_features(cfg)

Stage modules load lazily, so `import u2seg` (and `u2seg --help`) does not import torch or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

from u2seg.config import PipelineConfig, load_config

__all__ = [
    "PipelineConfig",
    "load_config",
    "run_cluster",
    "run_embed",
    "run_evaluate",
    "run_features",
    "run_maskcut",
    "run_panoptic",
    "run_semantic",
]

_STAGES = {
    "run_features": "u2seg.features",
    "run_maskcut": "u2seg.maskcut_stage",
    "run_embed": "u2seg.embed",
    "run_cluster": "u2seg.cluster",
    "run_semantic": "u2seg.semantic",
    "run_panoptic": "u2seg.panoptic_stage",
    "run_evaluate": "u2seg.evaluate_stage",
}


def __getattr__(name: str) -> Any:
    if name in _STAGES:
        return importlib.import_module(_STAGES[name]).run
    raise AttributeError(f"module 'u2seg' has no attribute {name!r}")
