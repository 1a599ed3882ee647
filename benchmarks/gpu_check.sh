#!/usr/bin/env bash
# The image stages' GPU figures (docs/benchmarks.md), on a bare CUDA machine: Python with torch,
# torchvision and timm, nothing else of the project's dependencies, no network.
#
#   benchmarks/gpu_check.sh PHOTOS [WHEELS] [OUT.json]
#
# PHOTOS: a folder of photos, e.g. the demo's (`u2seg demo` writes them to <output>/data/images).
# WHEELS: wheels of the few packages the stages' workers import beyond torch and timm, made
# where the package index can be reached, for that machine's Python (about 55 MB):
#     pip download -d WHEELS --no-deps --only-binary=:all: scipy faiss-cpu pycocotools omegaconf
# No Ray, DeepSpeed or pyarrow: the workers import none of them (tests/test_layout.py). Leave
# WHEELS out where the machine has these packages.
# It unpacks the wheels into .gpu-deps, runs benchmarks/gpu_stages.py from this tree (each
# stage's images/s, its ViT, cut and refinement + RLE, beside the bare bf16 ViT of the same
# run) in under 5 minutes, and writes one JSON (default gpu_check.json).
# DEVICE=cpu rehearses the same on a CPU, with batches of 2 (minutes per setting), before a
# GPU's time is spent on it.
set -euo pipefail
photos=$(realpath "${1:?usage: benchmarks/gpu_check.sh PHOTOS [WHEELS] [OUT.json]}")
wheels=${2:-}
out=$(realpath -m "${3:-gpu_check.json}")
cd "$(dirname "$0")/.."
device=${DEVICE:-cuda}
if [ "$device" = cuda ]; then
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
  options=()
else
  options=(--batch 2 --repeat 1)
fi
if [ -n "$wheels" ]; then
  python3 -m pip install --quiet --no-index --no-deps --target .gpu-deps "$wheels"/*.whl
fi
export PYTHONPATH="$PWD:$PWD/.gpu-deps${PYTHONPATH:+:$PYTHONPATH}"
timeout "${TIMEOUT:-280}" python3 benchmarks/gpu_stages.py --images "$photos" --json "$out" \
  --device "$device" "${options[@]}"
echo "wrote $out"
