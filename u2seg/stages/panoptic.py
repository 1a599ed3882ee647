"""Stage `panoptic`: merge pseudo things and pseudo stuff into COCO panoptic pseudo labels.

For each image with at least one pseudo instance (docs/method.md stage 5): its MaskCut masks with
their k-means classes (things 1..K) are painted by descending box area, the stuff map of the
`semantic` stage fills the rest (stuff K+1..K+S, a class mostly under instances skipped).
One Ray task per shard writes the PNGs and returns the shard's rows; the driver keeps the
shards (resume) and streams the JSON files at the end. Outputs under `panoptic/`:

- `panoptic/<name>.png` (RGB-encoded segment ids) + `panoptic.json` (COCO panoptic);
- `semantic/<name>.png` (things 0, stuff 1..S, void 255);
- `instances.json` (COCO instances, category_id = pseudo class 1..K, RLE) for training.

A detectron2 user registers them with `register_coco_panoptic_separated` (see
u2seg.data.coco for the call and the metadata it needs).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from u2seg.artifacts import StageDir, inputs_digest, png_bytes, read_parquet
from u2seg.config import ConfigError, PipelineConfig, depends_on, to_dict
from u2seg.data.coco import (
    id_to_rgb,
    instances_from_panoptic,
    panoptic_annotation,
    panoptic_categories,
    panoptic_file_names,
    rle_to_mask,
)
from u2seg.lease import leased
from u2seg.ops.panoptic import background_masks, merge_panoptic, semantic_map
from u2seg.plan import planned
from u2seg.runtime import ray_session
from u2seg.stages.embed import shard_plan
from u2seg.stages.semantic import decode_labels

STAGE = "panoptic"
PANOPTIC_JSON = "panoptic.json"
INSTANCES_JSON = "instances.json"
ROW_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("png", pa.string()),  # null: no pseudo instance survived, image left out
        ("segments_info", pa.string()),
        ("annotations", pa.string()),
    ]
)


def write_file(url: str, data: bytes) -> None:
    """Write `url` under a temporary name, then rename (atomic on local disks)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    folder, _, base = path.rpartition("/")
    tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{base}"
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    fs.mv(tmp, path)


def merge_image(
    row: dict[str, Any], classes: dict[int, int], first_id: int, cfg: dict[str, Any], out_dir: str
) -> dict[str, Any]:
    """One image: its maskcut row and stuff PNG -> its row of the shard (`label_row`, which
    writes its label PNGs under `out_dir`). `row["png"]`: the name of its label PNGs
    (`panoptic_file_names`)."""
    anns = json.loads(row["annotations"])
    masks = [rle_to_mask(ann["segmentation"]) for ann in anns]
    background = background_masks(masks, cfg["stuff_border"])
    kept = [k for k in range(len(anns)) if first_id + k in classes]  # embedded: classified
    return label_row(
        row,
        [masks[k] for k in kept],
        [classes[first_id + k] for k in kept],
        decode_labels(row["labels_png"]),
        cfg,
        out_dir,
        background[kept],
    )


PAINT = ("area", "score")


def merge_options(cfg: PipelineConfig, k: int, s: int) -> dict[str, Any]:
    """What `label_row` needs of the config: K, S and the `panoptic` section (checked)."""
    if cfg.panoptic.paint not in PAINT:
        raise ConfigError(f"panoptic.paint={cfg.panoptic.paint!r} is not one of {', '.join(PAINT)}")
    return {"k": k, "s": s, **to_dict(cfg.panoptic)}


def label_row(
    image: dict[str, Any],
    masks: list[np.ndarray],
    labels: list[int],
    stuff: np.ndarray,
    cfg: dict[str, Any],
    out_dir: str,
    background: np.ndarray | None = None,
) -> dict[str, Any]:
    """Thing masks with their classes over a stuff map (0..S-1, 255 void) -> the image's row
    of the shard; its panoptic RGB and semantic PNGs are written under `out_dir`
    (`panoptic/`, `semantic/`) unless no instance is left (then its png is None).
    `image`: image_id, file_name, width, height and png (its label PNGs' name).
    `background`: which masks are background (`merge_panoptic`)."""
    result = merge_panoptic(
        masks,
        labels,
        stuff,
        cfg["k"],
        cfg["s"],
        stuff_overlap=cfg["stuff_overlap"],
        # "score": listed best first, so the first has the smallest key and is painted last.
        areas=np.arange(len(masks), dtype=np.float64) if cfg["paint"] == "score" else None,
        min_visible=cfg["min_visible"],
        background=background,
    )
    out = {k: image[k] for k in ("image_id", "file_name", "width", "height")}
    if not any(s["isthing"] for s in result.segments_info):
        return {**out, "png": None, "segments_info": "[]", "annotations": "[]"}
    instances = instances_from_panoptic(result, image["image_id"], 0)
    write_file(f"{out_dir}/panoptic/{image['png']}", png_bytes(id_to_rgb(result.segments)))
    write_file(f"{out_dir}/semantic/{image['png']}", png_bytes(semantic_map(result)))
    out["png"] = image["png"]
    out["segments_info"] = json.dumps(result.segments_info)
    out["annotations"] = json.dumps(instances)
    return out


def merge_shard(
    maskcut_file: str,
    semantic_file: str,
    classes: dict[int, int],
    first_id: int,
    out_dir: str,
    cfg: dict[str, Any],
    pngs: dict[str, str],
) -> pa.Table:
    """Merge every image of one shard, writing its PNGs under `out_dir`; the shard's rows.
    `pngs`: image file name -> label PNG name."""
    cut = read_parquet(
        maskcut_file,
        ["image_id", "file_name", "width", "height", "error", "num_masks", "annotations"],
    )
    cut = cut.filter(pc.is_null(cut.column("error")))
    stuff = read_parquet(semantic_file, ["image_id", "error", "labels_png"])
    stuff = {r["image_id"]: r["labels_png"] for r in stuff.to_pylist() if r["error"] is None}
    rows = []
    for row in cut.to_pylist():
        start, first_id = first_id, first_id + row["num_masks"]
        if row["image_id"] not in stuff:
            continue  # the semantic stage could not read it: recorded in its error table
        rows.append(merge_image(
            {**row, "labels_png": stuff[row["image_id"]], "png": pngs[row["file_name"]]},
            classes, start, cfg, out_dir,
        ))  # fmt: skip
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _kept_rows(stage: StageDir) -> Iterator[dict[str, Any]]:
    for name in stage.shard_names():
        table = stage.read_table(name)
        yield from table.filter(pc.is_valid(table.column("png"))).to_pylist()


def _images(stage: StageDir) -> Iterator[dict[str, Any]]:
    for r in _kept_rows(stage):
        yield {
            "id": r["image_id"],
            "file_name": r["file_name"],
            "width": r["width"],
            "height": r["height"],
        }


def _panoptic_annotations(stage: StageDir) -> Iterator[dict[str, Any]]:
    for r in _kept_rows(stage):
        yield panoptic_annotation(r["image_id"], r["png"], json.loads(r["segments_info"]))


def _instance_annotations(stage: StageDir) -> Iterator[dict[str, Any]]:
    next_id = 1
    for r in _kept_rows(stage):
        for ann in json.loads(r["annotations"]):
            yield {**ann, "id": next_id}
            next_id += 1


def write_outputs(
    stage: StageDir, k: int, s: int, description: str = "u2seg panoptic pseudo labels"
) -> dict[str, int]:
    """Stream `panoptic.json` and `instances.json` from the shards (rows with a `png`:
    images left out have none)."""
    categories = panoptic_categories(k, s)
    info = {"description": description}
    panoptic = stage.write_json_arrays(
        PANOPTIC_JSON,
        {"info": info, "licenses": [], "categories": categories},
        {"images": _images(stage), "annotations": _panoptic_annotations(stage)},
    )
    things = [c for c in categories if c["isthing"]]
    instances = stage.write_json_arrays(
        INSTANCES_JSON,
        {"info": info, "licenses": [], "categories": things},
        {"images": _images(stage), "annotations": _instance_annotations(stage)},
    )
    return {"images": panoptic["images"], "instances": instances["annotations"]}


@planned("panoptic")
@leased
def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Panoptic pseudo labels from the maskcut, cluster and semantic stages."""
    import ray

    maskcut, semantic, cluster = (
        StageDir(cfg.output_dir, n) for n in ("maskcut", "semantic", "cluster")
    )
    for needed in (maskcut, semantic, cluster):
        needed.manifest()  # an error naming the stage when it has not completed
    if maskcut.shard_names() != semantic.shard_names():
        raise ValueError(
            "panoptic: maskcut and semantic shards differ: run both with the same data.*"
        )
    merge_cfg = merge_options(cfg, cfg.cluster.k, cfg.semantic.num_classes)
    stage = StageDir(cfg.output_dir, STAGE)
    depends = ("data", "backbone", "maskcut", "embed", "cluster", "semantic", "panoptic")
    stage.start(to_dict(cfg), depends_on(cfg, depends))
    plan = shard_plan(maskcut)
    assigned = cluster.read_table("assignments.parquet", columns=["annotation_id", "category_id"])
    ids, categories = (
        assigned.column("annotation_id").to_numpy(),
        assigned.column("category_id").to_numpy(),
    )
    # A shard is made from its maskcut shard, its semantic shard and its masks' classes.
    classes_of = {}
    for r in plan.to_pylist():
        inside = (ids >= r["first_id"]) & (ids < r["first_id"] + r["masks"])
        classes_of[r["shard"]] = dict(
            zip(ids[inside].tolist(), categories[inside].tolist(), strict=True)
        )
    # Label PNGs are named by the photo's stem, unless two photos share one.
    names = {r["shard"]: r["file_names"] for r in plan.to_pylist()}
    pngs = panoptic_file_names([n for shard in names.values() for n in shard])
    digests = {
        r["shard"]: inputs_digest(
            [
                [r["inputs"], semantic.shard_inputs(r["shard"])],
                *classes_of[r["shard"]].items(),
                *((n, pngs[n]) for n in names[r["shard"]]),
            ]
        )
        for r in plan.to_pylist()
    }
    done = stage.reusable_shards(digests)
    out_dir = stage.fs.unstrip_protocol(stage.path)
    todo = [r for r in plan.to_pylist() if r["shard"] not in done]
    if todo:
        with ray_session(cfg.ray):
            task = ray.remote(num_cpus=cfg.data.read_num_cpus)(merge_shard)
            pending = {}
            for r in todo:
                classes = classes_of[r["shard"]]
                semantic_file = semantic.fs.unstrip_protocol(
                    semantic.file(stage.shard_name(r["shard"]))
                )
                shard_pngs = {n: pngs[n] for n in names[r["shard"]]}
                ref = task.remote(
                    r["file"], semantic_file, classes, r["first_id"], out_dir, merge_cfg, shard_pngs
                )
                pending[ref] = r["shard"]
            while pending:
                ready, _ = ray.wait(list(pending))
                shard = pending.pop(ready[0])
                stage.write_table(stage.shard_name(shard), ray.get(ready[0]), digests[shard])
    counts = write_outputs(stage, cfg.cluster.k, cfg.semantic.num_classes)
    rows = sum(stage.read_table(n, ["image_id"]).num_rows for n in stage.shard_names())
    counts = {**counts, "dropped_images": rows - counts["images"], "resumed_shards": len(done)}
    empty = pa.table({"image_id": pa.array([], pa.int64())})
    return stage.finish(counts, empty, {"files": [PANOPTIC_JSON, INSTANCES_JSON]})
