"""bf16 autocast against fp32 for the ViT stages: the same masks and embeddings?

    python benchmarks/precision.py [--config configs/demo.yaml] [--device auto] [--json OUT]

Runs the stages' own Ray Data actors' batch functions directly (no Ray): `MaskCutWorker.cut`
(the ViT and the discovery of `maskcut`, before refinement: the CRF reads the photo, not the
features) on the 8 demo photos at the config's `maskcut.image_size`, and `CropEmbedder` on
the crops of the fp32 masks (`embed.crop`, `embed.image_size`), once with
`backbone.precision=fp32` and once with `bf16` (autocast on the device; on a GPU that is
what "auto" picks). Prints, per precision, seconds per image (cut_s) and per crop
(embed_s), and the agreement: per fp32 mask the best IoU among the same photo's bf16 masks
(mean, share >= 0.9, share at the same rank) and the cosine of each crop's embedding.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from u2seg.config import load_config
from u2seg.data.demo import write_demo_dataset
from u2seg.data.images import read_image, resize_square
from u2seg.ops.coco_eval import best_iou
from u2seg.stages.embed import instance_crop
from u2seg.workers.maskcut import MaskCutWorker
from u2seg.workers.vit import CropEmbedder

REPO = Path(__file__).resolve().parents[1]


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--device", default="auto", help="backbone.device: auto, cpu, cuda")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        demo = write_demo_dataset(Path(tmp) / "demo")
        photos = [read_image(str(p), 10**9) for p in sorted(demo.root.iterdir())]
    square = np.stack([resize_square(p, cfg.maskcut.image_size) for p in photos])
    options = asdict(cfg.maskcut)
    found: dict[str, list[list[np.ndarray]]] = {}
    vectors: dict[str, np.ndarray] = {}
    seconds: dict[str, dict[str, float]] = {}
    crops: np.ndarray | None = None
    device = ""
    for precision in ("fp32", "bf16"):
        backbone = asdict(replace(cfg.backbone, device=args.device, precision=precision))
        worker = MaskCutWorker(backbone, options)
        device = str(worker.device)
        worker.cut(square[:1])  # warm-up: kernels, caches
        cut, cut_s = _timed(worker.cut, square)
        found[precision] = [[m for m, _, _ in image or []] for image in cut]
        if crops is None:  # the same crops for both: those of the fp32 masks
            crops = np.stack([
                instance_crop(s, np.kron(m, np.ones((s.shape[0] // m.shape[0],) * 2, bool)),
                              cfg.embed.image_size, cfg.embed.crop)
                for s, masks in zip(square, found["fp32"], strict=True) for m in masks
            ])  # fmt: skip
        embedder = CropEmbedder(backbone)
        batch = {"error": np.full(len(crops), "", dtype=object), "image": crops}
        embedder(batch | {"image": crops[:2], "error": batch["error"][:2]})  # warm-up
        embedded, embed_s = _timed(embedder, batch)
        vectors[precision] = embedded["vector"]
        seconds[precision] = {"cut_s": cut_s / len(square),
                              "embed_s": embed_s / len(crops)}  # fmt: skip
    best, same_rank = [], []
    for ref, other in zip(found["fp32"], found["bf16"], strict=True):
        for k, mask in enumerate(ref):
            best.append(best_iou(mask, other))
            same_rank.append(k < len(other) and np.array_equal(mask, other[k]))
    a, b = vectors["fp32"], vectors["bf16"]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    figures = {
        "device": device,
        "images": len(square),
        "masks_fp32": sum(map(len, found["fp32"])),
        "masks_bf16": sum(map(len, found["bf16"])),
        "mask_best_iou_mean": float(np.mean(best)),
        "mask_best_iou_share_0.9": float(np.mean(np.array(best) >= 0.9)),
        "mask_same_at_same_rank": float(np.mean(same_rank)),
        "embed_cosine_mean": float(cosine.mean()),
        "embed_cosine_min": float(cosine.min()),
        "seconds": seconds,
    }
    assert crops is not None
    print(f"device {device}, {len(square)} photos, {len(crops)} crops")
    print("| precision | MaskCut ViT + discovery s/image | embed s/crop |")
    print("|---|---|---|")
    for precision, s in seconds.items():
        print(f"| {precision} | {s['cut_s']:.3f} | {s['embed_s']:.4f} |")
    fp32, bf16 = seconds["fp32"], seconds["bf16"]
    cut_x, embed_x = fp32["cut_s"] / bf16["cut_s"], fp32["embed_s"] / bf16["embed_s"]
    print(f"bf16 / fp32 speed: MaskCut {cut_x:.2f}x, embed {embed_x:.2f}x")
    print(f"masks: {figures['masks_fp32']} fp32, {figures['masks_bf16']} bf16; best IoU of each "
          f"fp32 mask among bf16's: mean {figures['mask_best_iou_mean']:.3f}, >= 0.9 for "
          f"{100 * figures['mask_best_iou_share_0.9']:.0f}%; identical at the same rank "
          f"{100 * figures['mask_same_at_same_rank']:.0f}%")  # fmt: skip
    print(f"embeddings of the same crops: cosine mean {figures['embed_cosine_mean']:.4f}, "
          f"min {figures['embed_cosine_min']:.4f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
