"""COCO formats written and read by every stage: instance annotations (RLE), panoptic
PNG ids and JSON, the instances JSON of the pseudo classes, detectron2's metadata.

Instance annotations (docs/method.md stage 2, step 8): one category per mask, RLE segmentation
(pycocotools, Fortran order, counts as str), bbox [x, y, w, h] from the mask, area, iscrowd
0, image width and height in COCO's order (upstream swapped them).

The panoptic conventions (category ids, segment ids, the semantic PNG values) are those of
`u2seg.ops.panoptic`.

Instances JSON
--------------
`instances_from_panoptic` writes each thing segment as a COCO instance with its pseudo class
(category_id 1..K, RLE). By default it writes the *visible* part (the pixels the segment
owns in the panoptic map), so the instances JSON, the semantic PNG's thing pixels (0) and
the panoptic PNG all agree. Upstream U2Seg (generate_classaware_instanceseg_annotations.py)
writes the whole pre-merge masks instead, including instances the merge drops; pass
`instance_masks` to write whole masks (of the kept instances only).

Training with detectron2 (PanopticFPN, "separated" dataset)
-----------------------------------------------------------
`detectron2.data.datasets.register_coco_panoptic_separated(name, metadata, image_root,
panoptic_root, panoptic_json, sem_seg_root, instances_json)` takes our files as:

- image_root: the folder of the photos themselves.
- panoptic_root: the panoptic PNG folder (`id_to_rgb` of `result.segments`, one PNG per
  image named by `panoptic_file_name`); panoptic_json: the `panoptic_dataset` JSON whose
  annotations come from `panoptic_annotation`. The training loader does not read them:
  they are the ground truth of detectron2's COCOPanopticEvaluator.
- sem_seg_root: the semantic PNG folder (`semantic_map`, saved as a single-channel 8-bit
  PNG, same file names as the panoptic PNGs). This is exactly what detectron2's
  `datasets/prepare_panoptic_fpn.py` derives from a COCO panoptic JSON: thing categories
  to 0, stuff categories to 1..S in category order, void (segment id 0) to 255.
- instances_json: the `instances_dataset` JSON (thing categories 1..K only).

What detectron2 expects of these (read from its `coco_panoptic.py` and `coco.py`):

- `load_sem_seg(sem_seg_root, image_root)` is called with its defaults gt_ext="png",
  image_ext="jpg", lists both folders without recursing and pairs files by name without
  extension. So the photos must be flat ".jpg" files in image_root, and every PNG must
  be named `<photo stem>.png` (`panoptic_file_name`). Other photos in image_root are
  ignored (detectron2 takes the intersection and logs a warning).
- `merge_to_panoptic` looks up every image of the instances JSON among the semantic PNGs:
  the instances JSON must list exactly the images that have PNGs (the kept images), with
  `file_name` relative to image_root.
- Masks are RLE, so the config needs INPUT.MASK_FORMAT = "bitmask" (the default
  "polygon" rejects RLE).
- Metadata (`detectron2_metadata(K, S, categories)` builds it):
  thing_classes: the instances JSON category names in id order (load_coco_json sets the
  same key on the registered name and detectron2 asserts that both values are equal);
  thing_dataset_id_to_contiguous_id {k: k - 1}; stuff_classes ["things", S stuff names];
  stuff_dataset_id_to_contiguous_id {0: 0, K + 1 + c: c + 1}, the inverse of which is how
  the panoptic evaluator turns the semantic head's class c + 1 back into category K + 1 + c
  (PanopticFPN skips semantic class 0, the things class).
- Model: ROI_HEADS.NUM_CLASSES = K, SEM_SEG_HEAD.NUM_CLASSES = S + 1,
  SEM_SEG_HEAD.IGNORE_VALUE = 255 (the default). Train on `name + "_separated"`;
  `name + "_stuffonly"` is registered too (semantic only).

For example::

    cats = panoptic_categories(K, S)
    register_coco_panoptic_separated(
        "u2seg_train", detectron2_metadata(K, S, cats), "photos/", "panoptic/",
        "panoptic.json", "semantic/", "instances.json")
    cfg.DATASETS.TRAIN = ("u2seg_train_separated",)
"""

from __future__ import annotations

import colorsys
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
import torch
from pycocotools import mask as mask_utils

from u2seg.data.names import leaves_root
from u2seg.ops.panoptic import PanopticResult


def load_json(url: str, what: str, error: type[ValueError]) -> Any:
    """A JSON file (local or fsspec URL); a missing or malformed one raises `error`, with
    `what` the file is and its URL."""
    try:
        with fsspec.open(url, "rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise error(f"{what} not found: {url}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{url} is not valid JSON: {exc}") from None


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Bool mask (H, W) -> COCO compressed RLE {"size": [H, W], "counts": str}."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed, counts str or bytes, or uncompressed counts list) -> bool (H, W)."""
    if isinstance(rle["counts"], list):
        height, width = rle["size"]
        rle = mask_utils.frPyObjects(rle, height, width)
    elif isinstance(rle["counts"], str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return np.asarray(mask_utils.decode(rle), dtype=bool)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Bool (H, W) mask of any COCO segmentation: polygons (annotation tools such as labelme
    write them), uncompressed or compressed RLE."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        return np.asarray(mask_utils.decode(rle), dtype=bool)
    return rle_to_mask(segmentation)


def masks_to_rles(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Bool masks (K, H, W), on any device -> `mask_to_rle` of each, the same strings.

    The runs of the whole stack are found on the masks' device in one pass (column-major, as
    COCO's); only the run boundaries come to the host, where pycocotools compresses them.
    """
    count, height, width = masks.shape
    if count == 0:
        return []
    flat = masks.transpose(1, 2).reshape(count, height * width)
    which, where = (flat[:, 1:] != flat[:, :-1]).nonzero(as_tuple=True)
    per_mask = np.bincount(which.cpu().numpy(), minlength=count)
    cuts = np.split((where + 1).cpu().numpy(), np.cumsum(per_mask)[:-1])
    uncompressed = []
    for on, cut in zip(flat[:, 0].cpu().tolist(), cuts, strict=True):
        # A mask that starts on a foreground pixel begins with an empty background run.
        bounds = [0, *([0] * on), *cut, height * width]
        uncompressed.append({"size": [height, width], "counts": np.diff(bounds).tolist()})
    compressed = mask_utils.frPyObjects(uncompressed, height, width)
    return [{"size": [height, width], "counts": r["counts"].decode("ascii")} for r in compressed]


def mask_to_annotation(
    mask: np.ndarray,
    image_id: int,
    annotation_id: int,
    category_id: int = 1,
    score: float | None = None,
) -> dict[str, Any]:
    """COCO instance annotation of a non-empty bool mask (H, W) of the image's own size:
    `rle_to_annotation` of its RLE."""
    mask = np.asarray(mask, dtype=bool)
    return rle_to_annotation(mask_to_rle(mask), image_id, annotation_id, category_id, score)


def rle_to_annotation(
    rle: dict[str, Any],
    image_id: int,
    annotation_id: int,
    category_id: int = 1,
    score: float | None = None,
) -> dict[str, Any]:
    """COCO instance annotation of a non-empty mask given as compressed RLE (`mask_to_rle`).

    RLE segmentation (counts as str, so the dict is JSON-ready), bbox [x, y, w, h] and area
    from pycocotools, iscrowd 0; "score" only when given (predictions). An empty mask is a
    ValueError: COCO tools reject zero-area instances and upstream drops them.
    """
    encoded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    area = int(mask_utils.area(encoded))
    if not area:
        raise ValueError(f"empty mask for annotation {annotation_id} of image {image_id}")
    annotation: dict[str, Any] = {
        "id": int(annotation_id),
        "image_id": int(image_id),
        "category_id": int(category_id),
        "segmentation": rle,
        "area": area,
        "bbox": [float(v) for v in mask_utils.toBbox(encoded)],
        "iscrowd": 0,
    }
    if score is not None:
        annotation["score"] = float(score)
    return annotation


def image_info(image_id: int, file_name: str, height: int, width: int) -> dict[str, Any]:
    """COCO "images" entry; keyword-friendly so width and height cannot swap (upstream's bug)."""
    return {"id": int(image_id), "file_name": file_name, "height": int(height), "width": int(width)}


MAX_SEGMENT_ID = 256**3 - 1  # three 8-bit channels


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids, int (H, W) in 0..256^3-1 -> uint8 (H, W, 3): id = R + 256 G + 256^2 B."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"segment ids must be in 0..{MAX_SEGMENT_ID}")
    ids = ids.astype(np.int32, copy=False)  # ids < 2^24: one channel at a time, no int64 copies
    rgb = np.empty((*ids.shape, 3), dtype=np.uint8)
    for channel, shift in enumerate((0, 8, 16)):
        rgb[..., channel] = (ids >> shift) & 0xFF
    return rgb


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) panoptic PNG pixels -> int32 (H, W) ids, R + 256 G + 256^2 B."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def panoptic_file_name(image_file_name: str) -> str:
    """PNG name of an image's panoptic and semantic labels: same path, extension ".png"."""
    return PurePosixPath(image_file_name).with_suffix(".png").as_posix()


def panoptic_file_names(image_file_names: Sequence[str]) -> dict[str, str]:
    """Image file name -> its label PNG name, unique over the set: `panoptic_file_name`
    (what detectron2 pairs photos with), except for images whose stem another image of the
    set shares (x.jpg and x.png), which keep their extension (x.jpg.png, x.png.png), and
    names shared even so, numbered by their position in the set (x.jpg.png beside x.jpg and
    x.png: x.jpg-0.png, x.jpg-2.png). Names are relative and without '..' parts (the listing
    refuses others), so no label lands outside its folder."""
    for name in image_file_names:
        if leaves_root(name):
            raise ValueError(f"{name!r}: an output name must be a relative name without '..'")
    plain = [panoptic_file_name(n) for n in image_file_names]
    shared = {p for p, count in Counter(plain).items() if count > 1}
    pngs = [f"{n}.png" if p in shared else p for n, p in zip(image_file_names, plain, strict=True)]
    # Still shared (x.jpg beside x.png and x.jpg.png): numbered by position in the set.
    again = {p for p, count in Counter(pngs).items() if count > 1}
    pngs = [f"{p[:-4]}-{i}.png" if p in again else p for i, p in enumerate(pngs)]
    if len(set(pngs)) != len(pngs):
        repeated = sorted(p for p, count in Counter(pngs).items() if count > 1)
        raise ValueError(f"label PNG names {repeated[:5]} would be shared by several images")
    return dict(zip(image_file_names, pngs, strict=True))


def panoptic_annotation(
    image_id: int, file_name: str, segments_info: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """COCO panoptic "annotations" entry; `file_name` is the panoptic PNG's name."""
    return {
        "image_id": int(image_id),
        "file_name": file_name,
        "segments_info": [dict(info) for info in segments_info],
    }


def _colors(n: int, offset: float) -> list[list[int]]:
    """n distinct saturated RGB colours, golden-ratio hues starting at `offset`."""
    hues = (offset + 0.618033988749895 * np.arange(n)) % 1.0
    return [[int(round(255 * v)) for v in colorsys.hsv_to_rgb(h, 0.75, 0.95)] for h in hues]


def panoptic_categories(
    num_things: int,
    num_stuff: int,
    thing_names: Sequence[str] | None = None,
    stuff_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """COCO panoptic categories: things 1..K (isthing 1), stuff K+1..K+S (isthing 0).

    Default names "thing-k" for class k and "stuff-c" for cluster c (the stage-4 label), so
    a category is traceable to the clustering that made it. Each has a fixed colour (used
    by panopticapi's visualisation for stuff).
    """
    if thing_names is None:
        thing_names = [f"thing-{k}" for k in range(1, num_things + 1)]
    if stuff_names is None:
        stuff_names = [f"stuff-{c}" for c in range(num_stuff)]
    if len(thing_names) != num_things or len(stuff_names) != num_stuff:
        raise ValueError(
            f"need {num_things} thing and {num_stuff} stuff names, "
            f"got {len(thing_names)} and {len(stuff_names)}"
        )
    colors = _colors(num_things, 0.0) + _colors(num_stuff, 0.5)
    names = list(thing_names) + list(stuff_names)
    return [
        {
            "id": k,
            "name": names[k - 1],
            "supercategory": "thing" if k <= num_things else "stuff",
            "isthing": int(k <= num_things),
            "color": colors[k - 1],
        }
        for k in range(1, num_things + num_stuff + 1)
    ]


def panoptic_dataset(
    images: Sequence[dict[str, Any]],
    annotations: Sequence[dict[str, Any]],
    categories: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """COCO panoptic JSON dict: images (`refine.image_info`), annotations
    (`panoptic_annotation`), categories (`panoptic_categories`)."""
    return {
        "info": {"description": "U2Seg panoptic pseudo labels"},
        "licenses": [],
        "images": list(images),
        "annotations": list(annotations),
        "categories": list(categories),
    }


def instances_dataset(
    images: Sequence[dict[str, Any]],
    annotations: Sequence[dict[str, Any]],
    categories: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """COCO instances JSON dict with the thing categories (1..K) of `categories` only.

    detectron2's `load_coco_json` makes its class list from these categories; stuff
    categories here would become extra instance classes.
    """
    return {
        "info": {"description": "U2Seg instance pseudo labels"},
        "licenses": [],
        "images": list(images),
        "annotations": list(annotations),
        "categories": [dict(c) for c in categories if c["isthing"]],
    }


def instances_from_panoptic(
    result: PanopticResult,
    image_id: int,
    first_annotation_id: int,
    instance_masks: Sequence[np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """COCO instance annotations (RLE, category_id = pseudo class 1..K) of the thing segments.

    Ids first_annotation_id, +1, ... in segment order. Each mask is the segment's visible
    pixels in `result.segments`, or, when the merge's `instance_masks` are passed, the whole
    input mask of that instance (upstream's choice: masks may then overlap).
    """
    annotations = []
    height, width = result.segments.shape
    things = [info for info in result.segments_info if info["isthing"]]
    for j, info in enumerate(things):
        if instance_masks is not None:
            mask = np.asarray(instance_masks[result.instance_index[j]], dtype=bool)
        else:
            # Compare inside the segment's box only: a thing is small next to the image.
            x, y, w, h = info["bbox"]
            mask = np.zeros((height, width), dtype=bool)
            mask[y : y + h, x : x + w] = result.segments[y : y + h, x : x + w] == info["id"]
        annotations.append(
            mask_to_annotation(mask, image_id, first_annotation_id + j, info["category_id"])
        )
    return annotations


def detectron2_metadata(
    num_things: int, num_stuff: int, categories: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Metadata for `register_coco_panoptic_separated` (see the module docstring).

    thing ids 1..K -> contiguous 0..K-1; stuff category K+1+c -> semantic class c+1, and 0 ->
    0 for the merged "things" class, as detectron2's COCO metadata does.
    """
    by_id = {c["id"]: c for c in categories}
    things = [by_id[k] for k in range(1, num_things + 1)]
    stuff = [by_id[num_things + 1 + c] for c in range(num_stuff)]
    stuff_map = {0: 0} | {num_things + 1 + c: c + 1 for c in range(num_stuff)}
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [list(c["color"]) for c in things],
        "thing_dataset_id_to_contiguous_id": {k: k - 1 for k in range(1, num_things + 1)},
        "stuff_classes": ["things"] + [c["name"] for c in stuff],
        "stuff_colors": [[128, 128, 128]] + [list(c["color"]) for c in stuff],
        "stuff_dataset_id_to_contiguous_id": stuff_map,
    }
