"""Bringing a model's outputs back to a large photo's size: windows and bands against whole.

    python benchmarks/resize.py [--megapixels 40] [--masks 50] [--classes 28] [--json OUT]

`predict` runs the model at its test size (short side 800, long side at most 1333) and
brings the masks and semantic logits back to the photo's size. This compares, each in a
fresh process so that its peak resident memory is its own, the way predict does it
(`u2seg.ops.resize`: each mask only inside the window it can reach, the logits a band of
rows at a time, then the full-size masks one at a time, as the panoptic merge and the RLE
encoding read them) with resizing everything whole (`F.interpolate` of all masks and all
logits, as before). The masks are box-shaped probabilities of random sizes (a tenth to half
of the photo's side), as a detector's pasted masks are. Prints seconds and peak memory of
both, their ratios, and whether the two agree (masks equal, argmax equal on > 99.9 %).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from u2seg.ops.resize import mask_windows, resized_argmax


def _outputs(megapixels: float, masks: int, classes: int) -> tuple[Any, Any, tuple[int, int]]:
    width = round((megapixels * 1e6 * 3 / 2) ** 0.5)
    height = round(width * 2 / 3)
    test = (800, 1200)
    rng = np.random.default_rng(0)
    probs = torch.zeros(masks, *test)
    for k in range(masks):
        h, w = (rng.uniform(0.1, 0.5, 2) * test).astype(int)
        top, left = rng.integers(0, test[0] - h), rng.integers(0, test[1] - w)
        probs[k, top : top + h, left : left + w] = 0.9
    logits = torch.from_numpy(rng.standard_normal((classes, 200, 300)).astype(np.float32))
    return probs, F.interpolate(logits[None], size=test, mode="bilinear")[0], (height, width)


def _run(way: str, megapixels: float, masks: int, classes: int) -> dict[str, Any]:
    probs, logits, size = _outputs(megapixels, masks, classes)
    start = time.perf_counter()
    if way == "windows":
        windows = mask_windows(probs, size)
        labels = resized_argmax(logits, size)
        pixels = [int(w.full().sum()) for w in windows]
    else:
        whole = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
        full = (whole > 0.5).numpy()
        labels = F.interpolate(logits[None], size=size, mode="bilinear")[0].argmax(0).numpy()
        pixels = [int(m.sum()) for m in full]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    sample = labels[:: max(1, size[0] // 64), :: max(1, size[1] // 64)].astype(np.uint8)
    return {"seconds": seconds, "peak_gib": peak, "pixels": pixels, "sample": sample.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, default=40.0)
    parser.add_argument("--masks", type=int, default=50)
    parser.add_argument("--classes", type=int, default=28)
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--way", choices=["windows", "whole"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:  # one measurement, in this fresh process
        print(json.dumps(_run(args.way, args.megapixels, args.masks, args.classes)))
        return
    found = {}
    for way in ("windows", "whole"):
        command = [sys.executable, __file__, "--way", way, "--megapixels", str(args.megapixels),
                   "--masks", str(args.masks), "--classes", str(args.classes)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        found[way] = json.loads(done.stdout.strip().splitlines()[-1])
    windows, whole = found["windows"], found["whole"]
    agree = float(np.mean(np.array(windows["sample"]) == np.array(whole["sample"])))
    result = {
        "megapixels": args.megapixels, "masks": args.masks, "classes": args.classes,
        **{f"{way}_{key}": found[way][key] for way in found for key in ("seconds", "peak_gib")},
        "peak_ratio": whole["peak_gib"] / windows["peak_gib"],
        "time_ratio": whole["seconds"] / windows["seconds"],
        "mask_areas_equal": windows["pixels"] == whole["pixels"], "argmax_agreement": agree,
    }  # fmt: skip
    for way in found:
        print(f"{way:8s} {found[way]['seconds']:7.1f} s  peak {found[way]['peak_gib']:5.1f} GiB")
    print(
        f"whole / windows: memory x{result['peak_ratio']:.1f}, time x{result['time_ratio']:.1f}; "
        f"mask areas equal: {result['mask_areas_equal']}, argmax agreement {agree:.4f}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
