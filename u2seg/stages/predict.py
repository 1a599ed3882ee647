"""Stage `predict`: the trained panoptic model over images, in the layout `evaluate` reads.

A Ray Data actor pool (GPUs when the cluster has them) holds the model of `train/model.pt`
(or `predict.model`); each image is resized to the test size (short side
`predict.short_side`, long side at most `predict.max_side`), predicted, and its outputs
brought back to the photo's own size. Shards of `data.shard_size` images are written as
they complete, so a killed run resumes; a new model file starts the shards afresh.
Outputs under `predict/`:

- `instances.json`: COCO instances (RLE masks, boxes, predicted thing classes 1..K,
  **scores**), every detection the model keeps (score >= `predict.score_thresh`);
- `panoptic.json` + `panoptic/<name>.png`: COCO panoptic, the Panoptic FPN merge of the
  instances and the semantic head (things 1..K, stuff K+1..K+S as in the pseudo labels);
- `semantic/<name>.png`: the semantic head's argmax (0 things, 1..S stuff).

`u2seg visualize --stage predict` draws them over the photos.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from u2seg.artifacts import ArtifactError, StageDir, png_bytes
from u2seg.config import PipelineConfig, depends_on, sized, to_dict
from u2seg.data.coco import id_to_rgb, mask_to_annotation, panoptic_file_names
from u2seg.data.images import ImageError, list_images, read_image
from u2seg.data.training import target_size
from u2seg.data.weights import check_state_dict, read_model_file
from u2seg.lease import leased
from u2seg.models.vit import autocast_dtype, check_precision
from u2seg.ops.panoptic import combine_predictions
from u2seg.ops.resize import FullMasks, mask_windows, resized_argmax
from u2seg.plan import planned
from u2seg.runtime import (
    actor_pool,
    gpus_per_actor,
    ray_session,
    resolve_device,
)
from u2seg.stages._image_loop import drain, plan_shards, shard_digests
from u2seg.stages._panoptic_model import build_from_spec
from u2seg.stages.panoptic import (
    INSTANCES_JSON,
    PANOPTIC_JSON,
    ROW_SCHEMA,
    write_file,
    write_outputs,
)
from u2seg.stages.train import MODEL_FILE
from u2seg.stages.train import STAGE as TRAIN

STAGE = "predict"
# The panoptic stage's rows (its writer streams the JSON files from them) and the error of
# an unreadable image.
_ROW_SCHEMA = ROW_SCHEMA.insert(4, pa.field("error", pa.string()))


class Predictor:
    """Ray Data actor: rows of images (path, ...) -> prediction rows; writes each image's
    panoptic and semantic PNGs under the stage directory."""

    def __init__(self, model: str, options: dict[str, Any], out_dir: str, device: str,
                 threads: int | None, max_pixels: int) -> None:  # fmt: skip
        self.device = resolve_device(device)
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        state, meta = read_model_file(model)
        self.spec = meta["spec"]
        self.model = build_from_spec(
            self.spec, self.device, score_thresh=options["score_thresh"],
            nms_thresh=options["nms_thresh"], detections_per_image=options["detections_per_image"],
        )  # fmt: skip
        check_state_dict(state, self.model.state_dict(), model)
        self.model.load_state_dict(state)
        self.model.eval()
        self.options, self.out_dir, self.max_pixels = options, out_dir, max_pixels
        self.autocast = autocast_dtype(options["precision"], self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for k in range(len(batch["path"])):
            row = {"image_id": int(batch["image_id"][k]), "file_name": str(batch["file_name"][k]),
                   "width": 0, "height": 0, "error": "", "png": str(batch["png"][k]),
                   "segments_info": "[]", "annotations": "[]"}  # fmt: skip
            try:
                if batch["error"][k]:
                    raise ImageError(str(batch["error"][k]))  # refused by the listing
                image = read_image(str(batch["path"][k]), self.max_pixels)
            except ImageError as exc:
                rows.append({**row, "error": str(exc), "png": ""})
                continue
            row["height"], row["width"] = image.shape[:2]
            try:
                rows.append({**row, **self.predict(image, row)})
            except (MemoryError, torch.OutOfMemoryError, RuntimeError) as exc:
                if isinstance(exc, RuntimeError) and "allocate" not in str(exc):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                reason = f"out of memory at {row['width']}x{row['height']}: {exc}"
                rows.append({**row, "error": reason[:500], "png": ""})
        # Strings, "" for none: Ray turns None in an object column into NaN.
        columns = {f.name: np.asarray([r[f.name] for r in rows]) for f in _ROW_SCHEMA}
        return {**columns, "shard": batch["shard"], "order": batch["order"]}

    @torch.inference_mode()
    def predict(self, image: np.ndarray, row: dict[str, Any]) -> dict[str, Any]:
        """One photo -> its annotations and segments (JSON) with its PNGs written."""
        opts = self.options
        height, width = image.shape[:2]
        size = target_size(height, width, opts["short_side"], opts["max_side"])
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None]
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        cast = self.autocast or torch.bfloat16
        with torch.autocast(self.device.type, dtype=cast, enabled=self.autocast is not None):
            out = self.model([pixels[0].to(self.device)])[0]
        # Back to the photo's size a window at a time: each mask only where it can be
        # non-zero, the logits in bands of rows (a 40-megapixel photo stays ~1 GB).
        windows = mask_windows(out["masks"][:, 0].float(), (height, width))
        semantic_np = resized_argmax(out["sem_seg"].float(), (height, width))
        scores = out["scores"].float().cpu().numpy()
        labels = out["labels"].cpu().numpy()
        annotations = [
            mask_to_annotation(w.full(), row["image_id"], 0, int(c), float(s))
            for w, s, c in zip(windows, scores, labels, strict=True)
            if w.any()
        ]
        result = combine_predictions(
            FullMasks(windows), scores, labels.tolist(), semantic_np, self.spec["num_things"],
            opts["instance_score"], opts["overlap"], opts["stuff_area"],
        )  # fmt: skip
        write_file(f"{self.out_dir}/panoptic/{row['png']}", png_bytes(id_to_rgb(result.segments)))
        write_file(f"{self.out_dir}/semantic/{row['png']}", png_bytes(semantic_np))
        return {
            "annotations": json.dumps(annotations),
            "segments_info": json.dumps(result.segments_info),
        }


def _to_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    columns = {f.name: pa.array(batch[f.name].tolist(), f.type) for f in _ROW_SCHEMA}
    for name in ("error", "png"):
        columns[name] = pa.array([v or None for v in batch[name].tolist()], pa.string())
    return pa.table(
        {**columns, "shard": pa.array(batch["shard"], pa.int64()),
         "order": pa.array(batch["order"], pa.int64())}
    )  # fmt: skip


def _model_url(cfg: PipelineConfig) -> str:
    if cfg.predict.model:
        return cfg.predict.model
    train = StageDir(cfg.output_dir, TRAIN)
    train.manifest()  # an error naming the stage when training has not completed
    return train.fs.unstrip_protocol(train.file(MODEL_FILE))


def _digest(url: str) -> str:
    digest = hashlib.sha256()
    with fsspec.open(url, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:32]


@planned("predict")
@leased
def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Predict every image of `predict.images` (default `data.source`); the manifest."""
    model = _model_url(cfg)
    _, meta = read_model_file(model)  # a bad file is refused before anything starts
    check_precision(cfg.predict.precision)
    source, root = (cfg.predict.images, cfg.predict.root) if cfg.predict.images else (
        cfg.data.source, cfg.data.root)  # fmt: skip
    refs = plan_shards(list_images(source, root), cfg.data.shard_size)
    listed = refs.to_pydict()
    names = panoptic_file_names([n for n, e in zip(listed["file_name"], listed["error"],
                                                    strict=True) if not e])  # fmt: skip
    refs = refs.append_column("png", pa.array([names.get(n, "") for n in listed["file_name"]]))
    stage = StageDir(cfg.output_dir, STAGE)
    stage.start(to_dict(cfg), {**depends_on(cfg, ["predict"]), "images": source,
                               "model": _digest(model)})  # fmt: skip
    digests = shard_digests(refs)
    done = stage.reusable_shards(digests)
    todo = refs.filter(pa.array(~np.isin(refs.column("shard").to_numpy(), list(done))))
    timing: dict[str, float] = {}
    if todo.num_rows:
        timing = _process(cfg, stage, todo, model, digests)
    errors = stage.error_rows(["image_id", "file_name"])
    if errors.num_rows == refs.num_rows:
        raise ArtifactError(f"predict: all {refs.num_rows} images failed to read")
    spec = meta["spec"]
    counts = write_outputs(stage, int(spec["num_things"]), int(spec["num_stuff"]),
                           "u2seg panoptic model predictions")  # fmt: skip
    counts.update(errors=errors.num_rows, shards=len(digests), resumed_shards=len(done))
    return stage.finish(counts, errors, {"model": model, "timing": timing,
                                         "files": [INSTANCES_JSON, PANOPTIC_JSON]})  # fmt: skip


def _process(
    cfg: PipelineConfig, stage: StageDir, todo: pa.Table, model: str, digests: dict[int, str]
) -> dict[str, float]:
    import ray.data

    from u2seg.artifacts import ShardWriter

    shards, sizes = np.unique(todo.column("shard").to_numpy(), return_counts=True)
    writer = ShardWriter(stage, dict(zip(shards.tolist(), sizes.tolist(), strict=True)), digests)
    p = cfg.predict
    options = {k: getattr(p, k) for k in ("short_side", "max_side", "score_thresh", "nms_thresh",
               "detections_per_image", "instance_score", "overlap", "stuff_area",
               "precision")}  # fmt: skip
    with ray_session(cfg.ray):
        num_gpus = gpus_per_actor("predict.num_gpus", p.num_gpus, cfg.ray.gpu_wait_s)
        batch = p.batch_size
        ds: Any = ray.data.from_arrow(
            [todo.slice(i, batch) for i in range(0, todo.num_rows, batch)]
        )
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={
                "model": model, "options": options,
                "out_dir": stage.fs.unstrip_protocol(stage.path),
                "device": "cuda" if num_gpus else "cpu", "threads": p.torch_threads,
                "max_pixels": cfg.data.max_pixels,
            },
            batch_size=batch,
            compute=actor_pool(sized(p.concurrency, "predict.concurrency"), p.max_concurrency),
            num_cpus=p.num_cpus, num_gpus=num_gpus,
        )  # fmt: skip
        return drain(ds, writer, _to_rows, todo.num_rows, STAGE, cfg.data.fail_after)
