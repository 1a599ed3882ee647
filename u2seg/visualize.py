"""Pictures: masks drawn over their images, and a contact sheet of many images.

`u2seg visualize` reads a stage's COCO instances file (`<output>/maskcut/instances.json`),
finds each image through `data.source`, and writes `<output>/visualize/<stage>/`:
one overlay PNG per image and `sheet.png`, a grid of the first overlays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from u2seg.config import PipelineConfig
from u2seg.ingest import ImageError, list_images, read_image
from u2seg.refine import rle_to_mask

_SOURCES = {"maskcut": "maskcut/instances.json"}


def palette(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 3) distinct, saturated colours (golden-ratio hues)."""
    hues = (seed * 0.137 + np.arange(n) * 0.618034) % 1.0
    hsv = np.stack([hues * 255, np.full(n, 200), np.full(n, 255)], axis=1).astype(np.uint8)
    rgb = Image.fromarray(hsv[None], mode="HSV").convert("RGB")
    return np.asarray(rgb)[0]


def overlay(image: np.ndarray, masks: list[np.ndarray], alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3) image with each bool (H, W) mask filled in its colour and outlined."""
    out = image.astype(np.float32)
    colours = palette(len(masks)).astype(np.float32)
    for mask, colour in zip(masks, colours, strict=True):
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
        out[edge] = colour
    return out.clip(0, 255).astype(np.uint8)


def contact_sheet(images: list[np.ndarray], cell: int = 256, columns: int = 4) -> np.ndarray:
    """uint8 grid of `images`, each fitted into a `cell` x `cell` square on white."""
    rows = -(-len(images) // columns)
    sheet = np.full((rows * cell, columns * cell, 3), 255, dtype=np.uint8)
    for k, image in enumerate(images):
        pil = Image.fromarray(image)
        pil.thumbnail((cell - 4, cell - 4))
        r, c = divmod(k, columns)
        y, x = r * cell + (cell - pil.height) // 2, c * cell + (cell - pil.width) // 2
        sheet[y : y + pil.height, x : x + pil.width] = np.asarray(pil)
    return sheet


def _masks_by_image(dataset: dict[str, Any]) -> dict[int, list[np.ndarray]]:
    masks: dict[int, list[np.ndarray]] = {im["id"]: [] for im in dataset["images"]}
    for ann in dataset["annotations"]:
        masks[ann["image_id"]].append(rle_to_mask(ann["segmentation"]))
    return masks


def run(cfg: PipelineConfig, stage: str = "maskcut", limit: int = 50) -> Path:
    """Overlay PNGs of the first `limit` images of `stage`'s instances; returns their folder."""
    if stage not in _SOURCES:
        raise ValueError(f"visualize: stage {stage!r} is not one of {', '.join(_SOURCES)}")
    source = f"{cfg.output_dir}/{_SOURCES[stage]}"
    try:
        with fsspec.open(source, "rb") as fh:
            dataset = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{source} not found: run `u2seg {stage}` first") from None
    paths = {
        r["image_id"]: r["path"] for r in list_images(cfg.data.source, cfg.data.root).to_pylist()
    }
    out = Path(cfg.output_dir) / "visualize" / stage
    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    for image_id, masks in tqdm(list(_masks_by_image(dataset).items())[:limit], desc="visualize"):
        try:
            image = read_image(paths[image_id], max_pixels=cfg.data.max_pixels)
        except (ImageError, KeyError):
            continue
        picture = overlay(image, masks)
        name = Path(paths[image_id]).stem
        Image.fromarray(picture).save(out / f"{image_id:08d}_{name}.png")
        drawn.append(picture)
    if drawn:
        Image.fromarray(contact_sheet(drawn)).save(out / "sheet.png")
    return out
