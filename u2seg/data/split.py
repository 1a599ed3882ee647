"""`u2seg split`: a labelled subset of a COCO file and its complement, for fine-tuning on a
few labels (as CutLER's and U2Seg's semi-supervised splits: 1 %, 2 %, 5 % of COCO's images).

The images are drawn uniformly at random by a seed, from the file's images sorted by id, so
the same file, fraction (or count) and seed give the same two files on any machine; the two
are disjoint and together hold every image. Each keeps the annotations of its images (COCO
instances or COCO panoptic: both key theirs by `image_id`) and every category, so a model
fine-tuned on the subset has heads for all of the data set's classes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from fsspec.core import url_to_fs


class SplitError(ValueError):
    """The file or the requested size cannot be split as asked."""


def subset_size(total: int, fraction: float | None, count: int | None) -> int:
    """How many of `total` images the subset takes: `count`, or `fraction` of them rounded
    up (so 1 % of a small set is still an image)."""
    if (fraction is None) == (count is None):
        raise SplitError("give one of --fraction and --count")
    if count is not None:
        if not 1 <= count <= total:
            raise SplitError(f"--count {count}: the file has {total} images")
        return count
    assert fraction is not None
    if not 0 < fraction <= 1:
        raise SplitError(f"--fraction {fraction} is not in (0, 1]")
    return max(1, math.ceil(fraction * total))


def split_coco(
    data: dict[str, Any], fraction: float | None = None, count: int | None = None, seed: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(subset, complement) of a COCO instances or panoptic file."""
    images = data.get("images")
    if not isinstance(images, list) or not images:
        raise SplitError("the file lists no images (a COCO instances or panoptic JSON)")
    ids = sorted(int(im["id"]) for im in images)
    if len(set(ids)) != len(ids):
        raise SplitError("image ids repeat: the split would not be disjoint")
    size = subset_size(len(ids), fraction, count)
    chosen = {ids[k] for k in np.random.default_rng(seed).permutation(len(ids))[:size]}

    def part(keep: bool) -> dict[str, Any]:
        out = {k: v for k, v in data.items() if k not in ("images", "annotations")}
        out["images"] = [im for im in images if (int(im["id"]) in chosen) == keep]
        out["annotations"] = [
            a for a in data.get("annotations", []) if (int(a["image_id"]) in chosen) == keep
        ]
        return out

    return part(True), part(False)


def split_name(source: str, fraction: float | None, count: int | None, seed: int) -> str:
    """`instances_train2017.1pct.seed1` for 1 % of instances_train2017.json with seed 1."""
    stem = Path(source.rsplit("/", 1)[-1]).stem
    size = f"{count}img" if count is not None else f"{100 * (fraction or 0):g}pct"
    return f"{stem}.{size}.seed{seed}"


def write_split(
    source: str, out_dir: str, fraction: float | None, count: int | None, seed: int
) -> dict[str, Any]:
    """Write `<name>.json` (the subset) and `<name>.rest.json` (its complement) under
    `out_dir`; returns what was written."""
    try:
        with fsspec.open(source, "rt") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise SplitError(f"{source}: {exc}") from None
    subset, rest = split_coco(data, fraction, count, seed)
    name = split_name(source, fraction, count, seed)
    written = {}
    fs, root = url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    for suffix, part in (("", subset), (".rest", rest)):
        path = f"{root.rstrip('/')}/{name}{suffix}.json"
        with fs.open(f"{path}.tmp", "w") as fh:  # renamed when whole
            json.dump(part, fh)
        fs.mv(f"{path}.tmp", path)
        shown = fs.unstrip_protocol(path) if "://" in out_dir else path
        written[shown] = {"images": len(part["images"]), "annotations": len(part["annotations"])}
    return written
