"""u2seg: unsupervised universal image segmentation at cluster scale.

The public API is the stage functions, `run_<stage>(cfg) -> manifest`, and `load_config`:

    import u2seg
    cfg = u2seg.load_config("configs/demo.yaml", ["data.source=/images"])
    manifest = u2seg.run_features(cfg)

`run_<stage>` is `u2seg.stages.<stage>.run`, for every public module of `u2seg/stages/`
(one per `u2seg` command). Stage modules load lazily, so `import u2seg` (and
`u2seg --help`) does not import torch or Ray.

Layers: `stages/` (the commands) compose `models/` (the networks), `data/` (sources and
formats) and `ops/` (pure numeric cores), which use `config`, `artifacts` and `runtime`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from u2seg import stages
from u2seg.config import PipelineConfig, load_config

STAGES = tuple(
    sorted(m.name for m in pkgutil.iter_modules(stages.__path__) if not m.name.startswith("_"))
)

__all__ = ["PipelineConfig", "STAGES", "load_config", *(f"run_{name}" for name in STAGES)]


def __getattr__(name: str) -> Any:
    stage = name.removeprefix("run_")
    if name.startswith("run_") and stage in STAGES:
        return importlib.import_module(f"u2seg.stages.{stage}").run
    raise AttributeError(f"module 'u2seg' has no attribute {name!r}")
