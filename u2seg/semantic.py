"""Stage `semantic`: S stuff pseudo classes per pixel (METHOD.md stage 4, patch k-means).

Two passes over the images on Ray Data. Fit: the backbone's patch tokens of at most
`semantic.fit_images` images (spread over the dataset), `sample_patches` of each, go into
a spherical faiss k-means of S clusters (`semantic/centroids.npy`, kept for resume).
Label: every image's patches are scored against the centroids (cosine, optionally averaged
with the mirrored image), the scores upsampled bilinearly to the original size, and the
argmax stored as a PNG (uint8 stuff ids 0..S-1) in the shard row.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from u2seg.artifacts import StageDir
from u2seg.config import PipelineConfig, SemanticConfig, to_dict
from u2seg.imagestage import (
    BackboneActor,
    ImageStage,
    backbone_pool,
    base_columns,
    input_size,
    normalise,
    plan_shards,
    run_image_stage,
)
from u2seg.ingest import SquareImages, list_images
from u2seg.runtime import ray_session
from u2seg.stuff import (
    fit_stuff_clusters,
    flip_average,
    sample_patches,
    stuff_logits,
    upsample_labels,
)

STAGE = "semantic"
CENTROIDS = "centroids.npy"
METHODS = ("patch-kmeans",)


class PatchSampler(BackboneActor):
    """Ray Data actor: square images -> a deterministic sample of each image's patch tokens."""

    def __init__(self, backbone: dict[str, Any], count: int, seed: int, threads: int | None = None):
        super().__init__(backbone, threads)
        self.count, self.seed = count, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.flatnonzero(batch["error"] == "")
        side = batch["image"].shape[1] // self.model.patch_size
        count = min(self.count, side * side)  # a small image gives all its patches
        samples = np.zeros((len(batch["error"]), count, self.model.embed_dim), np.float32)
        if len(ok):
            with torch.inference_mode():
                tokens = self.model(normalise(batch["image"][ok], self.device), want_keys=False)
            for j, i in enumerate(ok):
                seed = self.seed + int(batch["image_id"][i])
                samples[i] = sample_patches(tokens.patch_tokens[j], count, seed)
        return {"image_id": batch["image_id"], "error": batch["error"], "samples": samples}


class StuffLabeler(BackboneActor):
    """Ray Data actor: square images -> stuff label map of the original size, as PNG bytes."""

    def __init__(
        self,
        backbone: dict[str, Any],
        centroids: np.ndarray,
        flip: bool,
        threads: int | None = None,
    ) -> None:
        super().__init__(backbone, threads)
        self.centroids = torch.as_tensor(centroids, device=self.device)
        self.flip = flip

    def scores(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, S', S', 3) -> float (B, S, h, w) cosine scores of every stuff class."""

        def forward(x: torch.Tensor) -> torch.Tensor:
            return stuff_logits(self.model(x, want_keys=False).patch_tokens, self.centroids)

        x = normalise(images, self.device)
        with torch.inference_mode():
            return flip_average(forward, x) if self.flip else forward(x)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.flatnonzero(batch["error"] == "")
        pngs = np.full(len(batch["error"]), b"", dtype=object)
        if len(ok):
            scores = self.scores(batch["image"][ok]).cpu()
            for j, i in enumerate(ok):
                size = (int(batch["height"][i]), int(batch["width"][i]))
                labels = upsample_labels(scores[j], size).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(labels).save(buffer, format="PNG")
                pngs[i] = buffer.getvalue()
        result = {k: v for k, v in batch.items() if k not in ("image", "path")}
        result["labels_png"] = pngs
        return result


def to_shard_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    return pa.table(
        {**base_columns(batch), "labels_png": pa.array(list(batch["labels_png"]), pa.binary())}
    )


def decode_labels(png: bytes) -> np.ndarray:
    """uint8 (H, W) stuff ids 0..S-1 of one shard row's `labels_png`."""
    return np.asarray(Image.open(io.BytesIO(png)))


def _fit(cfg: PipelineConfig) -> np.ndarray:
    """(S, D) float32 centroids from patches of up to `fit_images` images."""
    import ray.data

    sc: SemanticConfig = cfg.semantic
    refs = plan_shards(list_images(cfg.data.source, cfg.data.root), cfg.data.shard_size)
    stride = max(1, -(-refs.num_rows // sc.fit_images))
    subset = refs.take(pa.array(np.arange(0, refs.num_rows, stride)))
    size = input_size(sc.image_size, cfg.backbone.name)
    with ray_session(cfg.ray):
        ds: Any = ray.data.from_arrow(
            [subset.slice(i, sc.batch_size) for i in range(0, subset.num_rows, sc.batch_size)]
        )
        ds = ds.map_batches(
            SquareImages(size, cfg.data.max_pixels), batch_size=8, num_cpus=cfg.data.read_num_cpus
        )
        ds = backbone_pool(ds, cfg, sc, PatchSampler, {"count": sc.sample_patches, "seed": sc.seed})
        samples = [
            b["samples"][b["error"] == ""].reshape(-1, b["samples"].shape[-1])
            for b in ds.iter_batches(batch_size=None, batch_format="numpy")
        ]
    return fit_stuff_clusters(np.concatenate(samples), sc.num_classes, sc.niter, sc.seed)


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Stuff pseudo labels for every image; returns the stage manifest."""
    if cfg.semantic.method not in METHODS:
        raise ValueError(
            f"semantic.method={cfg.semantic.method!r} is not one of {', '.join(METHODS)}"
        )
    if not 1 <= cfg.semantic.num_classes <= 254:
        raise ValueError(f"semantic.num_classes={cfg.semantic.num_classes} must be in 1..254")
    stage = StageDir(cfg.output_dir, STAGE)
    stage.start(
        to_dict(cfg), {k: to_dict(getattr(cfg, k)) for k in ("data", "backbone", "semantic")}
    )
    if stage.exists(CENTROIDS):
        with stage.fs.open(stage.file(CENTROIDS), "rb") as fh:
            centroids = np.load(fh)
    else:
        centroids = _fit(cfg)
        buffer = io.BytesIO()
        np.save(buffer, centroids)
        with stage.open_atomic(CENTROIDS) as fh:
            fh.write(buffer.getvalue())
    spec = ImageStage(
        name=STAGE,
        depends_on=("data", "backbone", "semantic"),
        actor=StuffLabeler,
        actor_kwargs={"centroids": centroids, "flip": cfg.semantic.flip},
        actors=cfg.semantic,
        image_size=cfg.semantic.image_size,
        to_rows=to_shard_rows,
    )
    stage, result = run_image_stage(cfg, spec)
    counts = {**result["counts"], "classes": cfg.semantic.num_classes}
    return stage.finish(counts, result["errors"], {"timing": result["timing"]})
