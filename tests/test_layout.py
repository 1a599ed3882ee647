"""The package's layers: imports run downwards only, every command module has `run`."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import u2seg

PACKAGE = Path(u2seg.__file__).parent
# What each layer may import of u2seg (besides itself).
ALLOWED = {
    "ops": {"u2seg.ops"},
    "models": {"u2seg.models", "u2seg.ops"},  # networks may use the numeric cores
    "data": {"u2seg.data", "u2seg.ops", "u2seg.artifacts", "u2seg.config"},
    # The per-batch work of the actor pools, runnable without Ray or Parquet (below).
    "workers": {
        "u2seg.workers",
        "u2seg.ops",
        "u2seg.models",
        "u2seg.data.coco",
        "u2seg.config",
        "u2seg.runtime",
    },  # fmt: skip
    "stages": {"u2seg"},  # the top layer composes everything
}


def _u2seg_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = (
                [node.module] if node.module != "u2seg" else [f"u2seg.{a.name}" for a in node.names]
            )
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n == "u2seg" or n.startswith("u2seg.")}
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_run_downwards(layer: str) -> None:
    allowed = ALLOWED[layer]
    for path in sorted((PACKAGE / layer).glob("*.py")):
        for name in _u2seg_imports(path):
            ok = any(name == a or name.startswith(a + ".") for a in allowed)
            assert ok, f"u2seg/{layer}/{path.name} imports {name}"


def test_workers_run_without_ray_parquet_or_deepspeed() -> None:
    """A GPU machine with torch, timm, scipy, pycocotools and faiss runs the workers'
    batch functions (benchmarks/gpu_stages.py): importing them loads none of the large
    packages such a machine lacks."""
    code = (
        "import sys, u2seg.workers.maskcut, u2seg.workers.vit; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'pyarrow', 'deepspeed'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_root_modules_use_no_layer() -> None:
    for name in ("config", "artifacts", "runtime"):
        imports = _u2seg_imports(PACKAGE / f"{name}.py")
        assert imports <= {"u2seg.config"}, f"u2seg/{name}.py imports {imports}"


def test_every_command_module_exposes_run() -> None:
    assert set(u2seg.STAGES) >= {"features", "maskcut", "embed", "cluster", "semantic",
                                 "panoptic", "evaluate", "visualize"}  # fmt: skip
    for stage in u2seg.STAGES:
        module = importlib.import_module(f"u2seg.stages.{stage}")
        assert getattr(u2seg, f"run_{stage}") is module.run
    with pytest.raises(AttributeError):
        u2seg.run__image_loop  # noqa: B018 (private modules are not stages)
