"""Pictures: masks drawn over their images, contact sheets, the gallery of pseudo classes.

`u2seg visualize --stage S` writes `<output>/visualize/S/`: for maskcut (its instances) and
panoptic and predict (segments, things first) one overlay PNG per image and `sheet.png`, a grid of
them; for cluster `gallery.png`, one row of mask crops per pseudo class.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from PIL import Image
from tqdm import tqdm

from u2seg.artifacts import CONFIG, StageDir
from u2seg.config import PipelineConfig, to_dict
from u2seg.data.coco import rgb_to_id, rle_to_mask
from u2seg.data.images import ImageError, list_images, read_image
from u2seg.lease import leased
from u2seg.ops.figures import contact_sheet, overlay

STAGES = ("maskcut", "cluster", "panoptic", "predict")


#: Pictures are drawn at most this many pixels on their long side (a 40-megapixel photo is
#: drawn from a 1024-pixel copy, its masks decoded one at a time).
PICTURE_SIDE = 1024


def _segmentations_by_image(dataset: dict[str, Any], limit: int) -> dict[int, list[Any]]:
    """The first `limit` images with annotations -> their encoded masks (decoded later, one
    image at a time)."""
    found: dict[int, list[Any]] = {}
    for ann in dataset["annotations"]:
        if ann["image_id"] in found or len(found) < limit:
            found.setdefault(ann["image_id"], []).append(ann["segmentation"])
    return found


def _decode(segmentations: list[Any]) -> list[np.ndarray]:
    return [rle_to_mask(r) for r in segmentations]


def _shrink(image: np.ndarray, masks: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image and masks scaled to at most PICTURE_SIDE on the long side."""
    height, width = image.shape[:2]
    scale = PICTURE_SIDE / max(height, width)
    if scale >= 1:
        return image, masks
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    shrunk = [
        np.asarray(Image.fromarray(m.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)) > 0
        for m in masks
    ]
    return small, shrunk


def _load_json(url: str, stage: str) -> Any:
    try:
        with fsspec.open(url, "rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} not found: run `u2seg {stage}` first") from None


def _source(cfg: PipelineConfig, stage: str) -> tuple[str, str | None]:
    """(source, root) of the images `stage` ran on: `predict.images` for predict, else
    `data.source`; where the command leaves both unset, those the stage's own config.json
    records."""
    resolved = to_dict(cfg)
    ran = StageDir(cfg.output_dir, "maskcut" if stage == "cluster" else stage)
    given = cfg.data.source or (stage == "predict" and cfg.predict.images)
    if not given and ran.exists(CONFIG):
        resolved = ran.read_json(CONFIG)["resolved"]
    if stage == "predict" and resolved["predict"]["images"]:
        return resolved["predict"]["images"], resolved["predict"].get("root")
    if resolved["data"]["source"]:
        return resolved["data"]["source"], resolved["data"]["root"]
    raise ValueError(
        f"visualize: data.source is unset and {ran.path}/{CONFIG} does not name the images: "
        "pass data.source=..."
    )


def _image_paths(cfg: PipelineConfig, stage: str) -> dict[int, str]:
    refs = list_images(*_source(cfg, stage)).to_pylist()
    return {r["image_id"]: r["path"] for r in refs}


def _read(paths: dict[int, str], image_id: int, max_pixels: int) -> np.ndarray | None:
    try:
        return read_image(paths[image_id], max_pixels=max_pixels)
    except (ImageError, KeyError):
        return None


def _panoptic_masks(cfg: PipelineConfig, ann: dict[str, Any], stage: str) -> list[np.ndarray]:
    """One bool mask per segment (things first, then stuff) of a panoptic.json annotation."""
    png = np.asarray(Image.open(f"{cfg.output_dir}/{stage}/panoptic/{ann['file_name']}"))
    ids = rgb_to_id(png)
    order = sorted(ann["segments_info"], key=lambda s: not s["isthing"])
    return [ids == s["id"] for s in order]


def cluster_gallery(cfg: PipelineConfig, per_cluster: int = 8, clusters: int = 12) -> np.ndarray:
    """uint8 grid: one row per pseudo class (the largest half of `clusters`, then random
    ones), `per_cluster` mask crops each (box crops, outside-mask pixels grey)."""
    from u2seg.stages.embed import instance_crop

    instances = _load_json(f"{cfg.output_dir}/maskcut/instances.json", "maskcut")
    table = StageDir(cfg.output_dir, "cluster").read_table("assignments.parquet").to_pylist()
    members: dict[int, list[int]] = {}
    for row in table:
        members.setdefault(row["category_id"], []).append(row["annotation_id"])
    by_size = sorted(members, key=lambda c: -len(members[c]))
    rng = np.random.default_rng(0)
    rest = by_size[clusters // 2 :]
    picked = by_size[: clusters // 2] + sorted(
        rng.permutation(rest)[: clusters - clusters // 2].tolist()
    )
    anns = {a["id"]: a for a in instances["annotations"]}
    paths = _image_paths(cfg, "cluster")
    cell = 96
    grid = np.full((len(picked) * cell, per_cluster * cell, 3), 255, dtype=np.uint8)
    for r, category in enumerate(picked):
        for c, ann_id in enumerate(members[category][:per_cluster]):
            ann = anns[ann_id]
            image = _read(paths, ann["image_id"], cfg.data.max_pixels)
            if image is not None:
                crop = instance_crop(image, rle_to_mask(ann["segmentation"]), cell - 4, "mean")
                grid[r * cell + 2 : (r + 1) * cell - 2, c * cell + 2 : (c + 1) * cell - 2] = crop
    return grid


@leased
def run(cfg: PipelineConfig, stage: str = "maskcut", limit: int = 50) -> Path:
    """Pictures of `stage`: overlays of its masks on the first `limit` images (maskcut,
    panoptic, predict) or the gallery of pseudo classes (cluster); returns the folder written."""
    if stage not in STAGES:
        raise ValueError(f"visualize: stage {stage!r} is not one of {', '.join(STAGES)}")
    out = Path(cfg.output_dir) / "visualize" / stage
    out.mkdir(parents=True, exist_ok=True)
    if stage == "cluster":
        Image.fromarray(cluster_gallery(cfg)).save(out / "gallery.png")
        return out
    paths = _image_paths(cfg, stage)
    masks: dict[int, Callable[[], list[np.ndarray]]]  # decoded when the image is drawn
    if stage == "maskcut":
        dataset = _load_json(f"{cfg.output_dir}/maskcut/instances.json", stage)
        encoded = _segmentations_by_image(dataset, limit)
        masks = {i: functools.partial(_decode, rles) for i, rles in encoded.items()}
    else:
        dataset = _load_json(f"{cfg.output_dir}/{stage}/panoptic.json", stage)
        masks = {a["image_id"]: functools.partial(_panoptic_masks, cfg, a, stage)
                 for a in dataset["annotations"][:limit]}  # fmt: skip
    drawn = []
    for image_id, decode in tqdm(list(masks.items())[:limit], desc="visualize"):
        image = _read(paths, image_id, cfg.data.max_pixels)
        if image is None:
            continue
        picture = overlay(*_shrink(image, decode()))
        Image.fromarray(picture).save(out / f"{image_id:08d}_{Path(paths[image_id]).stem}.png")
        drawn.append(picture)
    if drawn:
        Image.fromarray(contact_sheet(drawn)).save(out / "sheet.png")
    return out
