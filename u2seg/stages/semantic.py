"""Stage `semantic`: S stuff pseudo classes per pixel (docs/method.md stage 4).

Two passes over the images on Ray Data. Fit, on at most `semantic.fit_images` images spread
over the dataset: "patch-kmeans" samples their patch tokens into a spherical faiss k-means
of S clusters; "stego" trains a STEGO head on their frozen token grids (Ray Train, or in
the driver) and fits the cluster probe, a k-means of the head's codes (`head.pt`).
`semantic/centroids.npy` keeps the result for resume. Label: every image's patches (or
codes) are scored against the centroids by cosine and the argmax stored as a PNG (uint8
stuff ids 0..S-1) in the shard row. STEGO's order for the head: its codes are averaged with
the mirrored image's and upsampled bilinearly to the original size, then scored; the
baseline's token scores are averaged and upsampled instead (tokens are 384 wide).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from u2seg.artifacts import StageDir, png_bytes
from u2seg.config import PipelineConfig, SemanticConfig, depends_on, sized, to_dict
from u2seg.data.images import SquareImages, list_images
from u2seg.lease import leased
from u2seg.models.stego import load_head
from u2seg.models.vit import input_size, normalise
from u2seg.ops.stuff import (
    code_logits,
    crf_stuff_labels,
    fit_cluster_probe,
    fit_stuff_clusters,
    flip_average,
    sample_patches,
    stuff_logits,
    upsample_logits,
)
from u2seg.plan import planned
from u2seg.runtime import gpus_asked, ray_session
from u2seg.stages._image_loop import (
    BackboneActor,
    ImageStage,
    backbone_pool,
    base_columns,
    plan_shards,
    run_image_stage,
)
from u2seg.stages._stego_train import train_loop_per_worker

STAGE = "semantic"
CENTROIDS = "centroids.npy"
HEAD = "head.pt"
METHODS = ("patch-kmeans", "stego")


class PatchSampler(BackboneActor):
    """Ray Data actor: square images -> a deterministic sample of each image's patch tokens."""

    def __init__(
        self,
        backbone: dict[str, Any],
        count: int,
        seed: int,
        threads: int | None = None,
        state: Any = None,
    ) -> None:
        super().__init__(backbone, threads, state)
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


class TokenGrids(BackboneActor):
    """Ray Data actor: square images -> their patch token grids (h, w, D), float16."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        side = batch["image"].shape[1] // self.model.patch_size
        grids = np.zeros((len(ok), side, side, self.model.embed_dim), np.float16)
        if ok.any():
            with torch.inference_mode():
                out = self.model(normalise(batch["image"][ok], self.device), want_keys=False)
            grids[ok] = out.patch_tokens.cpu().numpy().astype(np.float16)
        return {"image_id": batch["image_id"], "error": batch["error"], "tokens": grids}


class StuffLabeler(BackboneActor):
    """Ray Data actor: square images -> stuff label map of the original size, as PNG bytes."""

    def __init__(
        self,
        backbone: dict[str, Any],
        centroids: np.ndarray,
        flip: bool,
        crf: bool = False,
        head: dict[str, torch.Tensor] | None = None,
        threads: int | None = None,
        state: Any = None,
    ) -> None:
        super().__init__(backbone, threads, state)
        self.centroids = torch.as_tensor(centroids, device=self.device)
        self.flip, self.crf = flip, crf
        # STEGO: classes are clusters of the head's codes, not of the tokens.
        self.head = load_head(head).to(self.device) if head is not None else None

    def grids(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, S', S', 3) -> what `labels` reads, at the patch grid: with a STEGO head
        its codes (B, h, w, C), which STEGO flip-averages and upsamples before the probe;
        else the tokens' cosine scores (B, S, h, w), averaged and upsampled as scores (the
        D-wide tokens are not worth upsampling to every pixel for the baseline)."""

        def forward(x: torch.Tensor) -> torch.Tensor:
            tokens = self.model(x, want_keys=False).patch_tokens
            if self.head is not None:
                return self.head.codes(tokens)
            return stuff_logits(tokens, self.centroids)

        x = normalise(images, self.device)
        width_dim = 2 if self.head is not None else -1
        with torch.inference_mode():
            return flip_average(forward, x, width_dim) if self.flip else forward(x)

    def logits(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """float (S, H, W) scores of one image's `grids` entry at `size`."""
        if self.head is not None:
            return code_logits(grid, self.centroids, size)
        return upsample_logits(grid[None], size)[0]

    def labels(self, image: np.ndarray, grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """uint8 (H, W) stuff ids of one image from its `grids` entry. With `crf` the dense
        CRF runs on the square network input (STEGO's inference resolution) and its labels
        are resized to the photo (nearest); else the scores at the photo's size (bilinear)
        are arg-maxed."""
        if not self.crf:
            return self.logits(grid, size).argmax(dim=0).numpy().astype(np.uint8)
        square = crf_stuff_labels(image, self.logits(grid, image.shape[:2])).astype(np.uint8)
        resized = Image.fromarray(square).resize((size[1], size[0]), Image.Resampling.NEAREST)
        return np.asarray(resized)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.flatnonzero(batch["error"] == "")
        pngs = np.full(len(batch["error"]), b"", dtype=object)
        if len(ok):
            grids = self.grids(batch["image"][ok]).cpu()
            for j, i in enumerate(ok):
                size = (int(batch["height"][i]), int(batch["width"][i]))
                pngs[i] = png_bytes(self.labels(batch["image"][i], grids[j], size))
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


def _fit_images(
    cfg: PipelineConfig, actor: type[BackboneActor], kwargs: dict[str, Any]
) -> tuple[int, Any]:
    """(how many, result batches) of `actor` over at most `fit_images` images spread over
    the dataset."""
    import ray.data

    sc: SemanticConfig = cfg.semantic
    refs = plan_shards(list_images(cfg.data.source, cfg.data.root), cfg.data.shard_size)
    stride = max(1, -(-refs.num_rows // sc.fit_images))
    subset = refs.take(pa.array(np.arange(0, refs.num_rows, stride)))
    size = input_size(sc.image_size, cfg.backbone.name, "semantic.image_size")
    blocks = [subset.slice(i, sc.batch_size) for i in range(0, subset.num_rows, sc.batch_size)]
    ds: Any = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        SquareImages(size, cfg.data.max_pixels), batch_size=8, num_cpus=cfg.data.read_num_cpus
    )
    ds = backbone_pool(ds, cfg, sc, actor, kwargs, "semantic")
    return subset.num_rows, ds.iter_batches(batch_size=None, batch_format="numpy")


def _fit_patch_kmeans(cfg: PipelineConfig) -> np.ndarray:
    """(S, D) float32 centroids of sampled patch tokens."""
    sc = cfg.semantic
    kwargs = {"count": sc.sample_patches, "seed": sc.seed}
    with ray_session(cfg.ray):
        samples = [
            b["samples"][b["error"] == ""].reshape(-1, b["samples"].shape[-1])
            for b in _fit_images(cfg, PatchSampler, kwargs)[1]
        ]
    return fit_stuff_clusters(np.concatenate(samples), sc.num_classes, sc.niter, sc.seed)


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry: the result is the checkpoint the loop reports."""
    train_loop_per_worker(config)


def _train_head(cfg: PipelineConfig, tokens_path: str, stage: StageDir) -> dict[str, torch.Tensor]:
    """The STEGO head's state dict, trained in this process or with Ray Train."""
    sc = cfg.semantic
    loop_config = {
        "tokens": tokens_path,
        "steps": sc.stego_steps,
        "code_dim": sc.stego_code_dim,
        "batch_size": sc.stego_batch_size,
        "seed": sc.seed,
    }
    workers = sized(sc.train_workers, "semantic.train_workers")
    if workers == 0:
        trained = train_loop_per_worker(loop_config)
        assert trained is not None
        state: dict[str, torch.Tensor] = trained["state_dict"]
        return state
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = gpus_asked("semantic.num_gpus", sc.num_gpus, workers, cfg.ray.gpu_wait_s)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name="stego", storage_path=str(Path(tokens_path).parent / "ray_train")
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"semantic: STEGO training left no checkpoint ({result.error})")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / HEAD, weights_only=True)
    return state


#: Bytes copied at once when the token cache is cut to the rows that came.
COPY_BYTES = 64 << 20


def write_rows(batches: Iterable[np.ndarray], most: int, path: Path) -> int:
    """Stream row batches (each (n, ...) of one dtype and row shape, n >= 0) into the `.npy`
    file `path`, at most `most` rows in all, without holding them: they fill a memory-mapped
    file of `most` rows, copied a slice at a time into one of the exact count when fewer
    came (unreadable images). Returns the count."""
    partial = path.with_name(f".tmp-{path.name}")
    rows, out = 0, None
    for batch in batches:
        if out is None:
            out = np.lib.format.open_memmap(partial, "w+", batch.dtype, (most, *batch.shape[1:]))
        out[rows : rows + len(batch)] = batch
        rows += len(batch)
    if out is None:
        return 0
    out.flush()
    if rows < most:
        exact = np.lib.format.open_memmap(path, "w+", out.dtype, (rows, *out.shape[1:]))
        step = max(1, COPY_BYTES // max(1, out[0].nbytes))
        for start in range(0, rows, step):
            exact[start : start + step] = out[start : min(rows, start + step)]
        exact.flush()
        del out, exact
        partial.unlink()
    else:
        del out
        partial.replace(path)
    return rows


def _fit_stego(cfg: PipelineConfig, stage: StageDir) -> np.ndarray:
    """(S, C) float32 centroids of the STEGO head's codes; writes `head.pt`.

    The token grids of the fit images stream into a local `tokens.npy` (never held whole by
    the driver) that every training worker memory-maps (Ray Train workers on other nodes
    need the run directory on shared storage).
    """
    sc = cfg.semantic
    with ray_session(cfg.ray):
        count, batches = _fit_images(cfg, TokenGrids, {})
        Path(stage.path).mkdir(parents=True, exist_ok=True)
        tokens_path = Path(stage.path).resolve() / "tokens.npy"
        ok = (b["tokens"][b["error"] == ""] for b in batches)
        if write_rows(ok, count, tokens_path) < 2:
            raise ValueError("semantic: STEGO needs at least 2 readable images to train on")
        tokens = np.load(tokens_path, mmap_mode="r")
        state = _train_head(cfg, str(tokens_path), stage)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with stage.open_atomic(HEAD) as fh:
        fh.write(buffer.getvalue())
    head = load_head(state)
    return fit_cluster_probe(head, tokens, sc.num_classes, sc.sample_patches, sc.niter, sc.seed)


@planned("semantic")
@leased
def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Stuff pseudo labels for every image; returns the stage manifest."""
    if cfg.semantic.method not in METHODS:
        raise ValueError(
            f"semantic.method={cfg.semantic.method!r} is not one of {', '.join(METHODS)}"
        )
    if not 1 <= cfg.semantic.num_classes <= 254:
        raise ValueError(f"semantic.num_classes={cfg.semantic.num_classes} must be in 1..254")
    stage = StageDir(cfg.output_dir, STAGE)
    stage.start(to_dict(cfg), depends_on(cfg, ("data", "backbone", "semantic")))
    if stage.exists(CENTROIDS):
        centroids = stage.read_array(CENTROIDS)
    else:
        if cfg.semantic.method == "stego":
            centroids = _fit_stego(cfg, stage)
        else:
            centroids = _fit_patch_kmeans(cfg)
        stage.write_array(CENTROIDS, centroids)
    head = None
    if cfg.semantic.method == "stego":
        with stage.fs.open(stage.file(HEAD), "rb") as fh:
            head = torch.load(fh, weights_only=True)
    spec = ImageStage(
        name=STAGE,
        depends_on=("data", "backbone", "semantic"),
        actor=StuffLabeler,
        actor_kwargs={
            "centroids": centroids,
            "flip": cfg.semantic.flip,
            "crf": cfg.semantic.crf,
            "head": head,
        },
        actors=cfg.semantic,
        image_size=cfg.semantic.image_size,
        to_rows=to_shard_rows,
    )
    stage, result = run_image_stage(cfg, spec)
    counts = {**result["counts"], "classes": cfg.semantic.num_classes}
    return stage.finish(counts, result["errors"], {"timing": result["timing"]})
