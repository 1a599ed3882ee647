"""Training throughput: u2seg's step vs a bare torchvision Mask R-CNN step, 1 vs 2 Ray Train
workers, the data-wait share with copy-paste, peak memory.

    python benchmarks/train.py [--sections step,workers] [--size 320] [--steps 3]
                               [--train-steps 12] [--json out.json]

Sections:
- `step`: images/s of one training step (forward, backward, SGD) of u2seg's Panoptic FPN +
  Cascade (ResNet-50, the paper's heads: 512 RoIs, 3 cascade stages, mask and semantic
  heads) and of torchvision's `maskrcnn_resnet50_fpn` (the same ResNet-50 + FPN with
  BatchNorm, one box stage), on the same batch of demo photos with their ground-truth
  instances at the same size, in this process; the baseline is torchvision, the ratio is
  u2seg / torchvision (1 - ratio is u2seg's overhead). u2seg runs twice: with the paper's
  adaptive RoIAlign sampling (`train.roi_sampling_ratio=0`, detectron2's) and with
  torchvision's 2 samples per bin, and a third time with one box stage instead of the
  cascade's three (still with the semantic head, which torchvision's model lacks): the
  architecture nearest torchvision's, so its ratio is the implementation's overhead. On
  CUDA every model runs under bf16 autocast.
- `workers`: `u2seg train` (DeepSpeed ZeRO-2, the `ray-data` loader) on the labelled demo
  photos with 1 and with 2 Ray Train workers (1 image per worker and step), copy-paste on,
  and 1 worker with copy-paste off: steady images/s, the data-wait share of a step, rank
  0's peak memory; the baseline is 1 worker, the ratio is the 2-worker speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from u2seg.config import load_config
from u2seg.data.coco import load_json, mask_to_annotation, panoptic_file_names, rle_to_mask
from u2seg.data.demo import write_demo_dataset
from u2seg.data.training import target_size
from u2seg.models.cascade import CASCADE_IOUS, CASCADE_WEIGHTS
from u2seg.ops.copy_paste import boxes_of
from u2seg.stages._panoptic_model import build_from_spec, model_spec

SECTIONS = ("step", "workers")


def labelled_photos(folder: Path) -> list[tuple[Path, list[np.ndarray]]]:
    """The demo photos that have ground-truth instances, with their masks."""
    demo = write_demo_dataset(folder)
    data = load_json(str(demo.instances_json), "demo instances", ValueError)
    masks: dict[int, list[np.ndarray]] = {}
    for ann in data["annotations"]:
        masks.setdefault(int(ann["image_id"]), []).append(rle_to_mask(ann["segmentation"]))
    return [
        (demo.root / im["file_name"], masks[im["id"]]) for im in data["images"] if im["id"] in masks
    ]


def step_batch(folder: Path, size: int, device: torch.device) -> tuple[list, list]:
    """Two labelled photos resized to short side `size` (0..255 float images, targets)."""
    images, targets = [], []
    for path, masks in labelled_photos(folder)[:2]:
        photo = Image.open(path).convert("RGB")
        h, w = target_size(photo.height, photo.width, size, 10 * size)
        pixels = np.asarray(photo.resize((w, h), Image.Resampling.BILINEAR))
        resized = np.stack(
            [np.asarray(Image.fromarray(m.astype(np.uint8)).resize((w, h))) for m in masks]
        )
        resized = resized[resized.any(axis=(1, 2))]
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().to(device))
        targets.append(
            {
                "boxes": torch.from_numpy(boxes_of(resized > 0)).to(device),
                "labels": torch.ones(len(resized), dtype=torch.int64, device=device),
                "masks": torch.from_numpy(resized).to(device),
                "semantic": torch.from_numpy((resized.max(axis=0) == 0).astype(np.int64)).to(
                    device
                ),
            }
        )
    return images, targets


def time_steps(model: torch.nn.Module, run_step: Any, steps: int, device: torch.device) -> float:
    """Seconds per step after one warm-up step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()

    def one() -> None:
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses = run_step()
        sum(losses.values()).backward()
        optimizer.step()

    one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def section_step(folder: Path, size: int, steps: int) -> dict[str, Any]:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    images, targets = step_batch(folder, size, device)
    seconds = {}
    one_stage = {"cascade_ious": CASCADE_IOUS[:1], "cascade_weights": CASCADE_WEIGHTS[:1]}
    for name, ratio, heads in (("paper", 0, {}), ("sampling_2", 2, {}),
                               ("one_stage", 2, one_stage)):  # fmt: skip
        cfg = load_config(
            overrides=[
                "train.backbone=resnet50",
                "train.norm=bn",
                f"train.roi_sampling_ratio={ratio}",
            ]
        )
        spec = model_spec(cfg, 1, 1)
        spec["heads"].update(heads)
        ours = build_from_spec(spec, device)
        seconds[name] = time_steps(ours, lambda m=ours: m(images, targets), steps, device)
    long_side = max(max(im.shape[-2:]) for im in images)
    theirs = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=2, trainable_backbone_layers=5,
        min_size=size, max_size=int(long_side),
    ).to(device)  # fmt: skip
    tv_images = [im / 255 for im in images]
    tv_targets = [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]
    baseline = time_steps(theirs, lambda: theirs(tv_images, tv_targets), steps, device)
    n = len(images)
    return {
        "device": device.type,
        "images": n,
        "size": [list(im.shape[-2:]) for im in images],
        "torchvision_images_per_s": n / baseline,
        **{f"u2seg_{k}_images_per_s": n / s for k, s in seconds.items()},
        **{f"ratio_{k}": baseline / s for k, s in seconds.items()},
    }


def write_labels(folder: Path) -> tuple[Path, Path]:
    """(photos, run) with a `panoptic/` artifact from the demo photos' ground truth: one
    thing class (every instance), one stuff class (the rest)."""
    photos_dir = folder / "demo"
    photos = labelled_photos(photos_dir)
    run = folder / "run"
    panoptic = run / "panoptic"
    (panoptic / "semantic").mkdir(parents=True)
    names = [p.relative_to(photos_dir / "images").as_posix() for p, _ in photos]
    pngs = panoptic_file_names(names)
    images, anns = [], []
    for k, ((_, masks), name) in enumerate(zip(photos, names, strict=True), start=1):
        h, w = masks[0].shape
        images.append({"id": k, "file_name": name, "height": h, "width": w})
        semantic = np.ones((h, w), np.uint8)
        for mask in masks:
            semantic[mask] = 0
            anns.append(mask_to_annotation(mask, k, len(anns) + 1, 1))
        Image.fromarray(semantic).save(panoptic / "semantic" / pngs[name])
    categories = [{"id": 1, "name": "fg", "isthing": 1}, {"id": 2, "name": "bg", "isthing": 0}]
    (panoptic / "instances.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories[:1]})
    )
    (panoptic / "panoptic.json").write_text(json.dumps({"categories": categories}))
    (panoptic / "manifest.json").write_text(json.dumps({"stage": "panoptic"}))
    return photos_dir / "images", run


def section_workers(folder: Path, train_steps: int) -> dict[str, Any]:
    import u2seg

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".cache/torch_extensions").resolve()))
    photos, run = write_labels(folder)
    common = [
        f"data.source={photos}", "backbone.name=dinov2_vits14", "backbone.weights=packaged",
        "train.strategy=deepspeed", "train.zero_stage=2", "train.backbone=vit",
        "train.loader=ray-data", "train.cpus_per_worker=0.5", "train.data_num_cpus=0.25",
        "train.torch_threads=1", "train.short_sides=[192,224,256]", "train.max_side=320",
        "train.rpn_post_nms_top_n_train=200", "train.roi_batch_size_per_image=128",
        "train.box_head_dim=256", "train.warmup_iters=2", f"train.max_iter={train_steps}",
        f"train.log_every={max(1, train_steps // 4)}", f"train.checkpoint_every={train_steps}",
        "ray.num_cpus=2",
    ]  # fmt: skip
    results = {}
    for name, extra in (
        ("1 worker", ["train.num_workers=1", "train.ims_per_batch=1"]),
        ("2 workers", ["train.num_workers=2", "train.ims_per_batch=2"]),
        ("1 worker, no copy-paste", ["train.num_workers=1", "train.ims_per_batch=1",
                                     "train.copy_paste=false"]),
    ):  # fmt: skip
        out = folder / name.replace(" ", "_").replace(",", "")
        out.mkdir()
        (out / "panoptic").symlink_to(run / "panoptic", target_is_directory=True)
        cfg = load_config(overrides=[*common, *extra, f"output={out}"])
        timing = u2seg.run_train(cfg)["timing"]
        results[name] = {
            k: timing[k] for k in ("steady_images_per_s", "steady_data_wait_share", "peak_rss_mib")
        }
    results["ratio_2_vs_1"] = (
        results["2 workers"]["steady_images_per_s"] / results["1 worker"]["steady_images_per_s"]
    )
    return results


def report_step(step: dict[str, Any]) -> None:
    print(f"training step, {step['images']} demo photos {step['size']}, {step['device']}:")
    print(f"  torchvision maskrcnn_resnet50_fpn: {step['torchvision_images_per_s']:7.3f} images/s"
          " (baseline)")  # fmt: skip
    for name, key in (
        ("u2seg Panoptic FPN + Cascade     ", "paper"),
        ("  the same, RoIAlign sampling 2  ", "sampling_2"),
        ("  and one box stage (no cascade) ", "one_stage"),
    ):
        ratio = step[f"ratio_{key}"]
        print(f"  {name}: {step[f'u2seg_{key}_images_per_s']:7.3f} images/s  ratio {ratio:.2f}"
              f" (overhead {100 * (1 - ratio):.0f} %)")  # fmt: skip


def report_workers(work: dict[str, Any]) -> None:
    print("u2seg train, DeepSpeed ZeRO-2, ray-data loader, demo photos, steady state:")
    for name in ("1 worker", "2 workers", "1 worker, no copy-paste"):
        r = work[name]
        wait = 100 * r["steady_data_wait_share"]
        print(f"  {name:<24}: {r['steady_images_per_s']:6.3f} images/s  data wait {wait:5.1f} %"
              f"  peak {r['peak_rss_mib']:6.0f} MiB (rank 0)")  # fmt: skip
    print(f"  2 vs 1 worker: ratio {work['ratio_2_vs_1']:.2f} (baseline: 1 worker)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"of {SECTIONS}")
    parser.add_argument("--size", type=int, default=320, help="short side of the step section")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of the step section")
    parser.add_argument("--train-steps", type=int, default=12, help="steps of each training run")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}: choose from {SECTIONS}")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "step" in sections:
            figures["step"] = section_step(Path(tmp) / "step", args.size, args.steps)
            report_step(figures["step"])
        if "workers" in sections:
            figures["workers"] = section_workers(Path(tmp) / "workers", args.train_steps)
            report_workers(figures["workers"])
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
