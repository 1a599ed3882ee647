"""Does training learn? The panoptic model trained for several step counts on one run's pseudo
labels, each scored against those pseudo labels (fit) and against the ground truth.

    python benchmarks/learning.py --run runs/demo [--steps 40,100,200] [--out DIR]
                                  [--json out.json] [key=value ...]

`--run`: a finished `u2seg demo` (or any run with `panoptic/` and evaluation settings):
its resolved config is reused, with `key=value` overrides on top (e.g.
`train.strategy=local`). Each step count is a complete run of its own schedule (warm-up,
the LR step at 3/4 of it), trained from the same start into `<out>/steps-<n>/`, then
`u2seg predict` and two `u2seg evaluate`s: against the run's pseudo labels (`panoptic/`,
the fit: how much of what it was shown the model reproduces) and against the run's ground
truth. Printed per step count: class-agnostic box / mask AP50 (fit and ground truth),
semantic mIoU, PQ (ground truth) and the number of predicted instances; the baseline is
the pseudo labels' own scores against the ground truth, measured in the same run's
`evaluate/`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import u2seg
from u2seg.config import load_config
from u2seg.runtime import ray_session


def _resolved(run: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((run / "evaluate" / "config.json").read_text())
    return config["resolved"]


def _scores(metrics: dict[str, Any], name: str) -> dict[str, float]:
    entry = metrics["predictions"][name]
    agnostic = entry["class_agnostic"]
    return {
        "box_ap50": agnostic["bbox"]["AP50"],
        "mask_ap50": agnostic["segm"]["AP50"],
        "miou": entry.get("semantic", {}).get("hungarian", {}).get("mIoU", float("nan")),
        "pq": entry.get("panoptic", {}).get("All", {}).get("PQ", float("nan")),
        "pq_st": entry.get("panoptic", {}).get("Stuff", {}).get("PQ", float("nan")),
        "aware_mask_ap50": entry.get("instance", {}).get("segm", {}).get("AP50", float("nan")),
    }


def _evaluate(base: Path, out: Path, predictions: str, gt: list[str], extra: list[str]) -> dict:
    cfg = load_config(base, [f"output={out}", f"evaluate.predictions=[{predictions}]",
                             "evaluate.overlays=0", *gt, *extra])  # fmt: skip
    u2seg.run_evaluate(cfg)
    return json.loads((out / "evaluate" / "metrics.json").read_text())


def point(run: Path, out: Path, steps: int, overrides: list[str]) -> dict[str, Any]:
    """Train, predict and score one step count."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "panoptic").unlink(missing_ok=True)
    (out / "panoptic").symlink_to((run / "panoptic").resolve(), target_is_directory=True)
    base = out / "config.json"
    base.write_text(json.dumps({**_resolved(run), "output": str(out)}))
    schedule = [
        f"train.max_iter={steps}",
        f"train.steps=[{max(1, steps * 3 // 4)}]",
        f"train.warmup_iters={min(10, steps // 4)}",
        f"train.checkpoint_every={steps}",
    ]
    cfg = load_config(base, [*schedule, *overrides])
    started = time.perf_counter()
    u2seg.run_train(cfg)
    trained = time.perf_counter() - started
    predicted = u2seg.run_predict(cfg)
    pseudo = run / "panoptic"
    fit = _evaluate(base, out / "fit", str(out / "predict"), [
        "evaluate.gt_format=coco-panoptic", f"evaluate.gt_panoptic_json={pseudo / 'panoptic.json'}",
        f"evaluate.gt_panoptic_root={pseudo / 'panoptic'}",
        f"evaluate.gt_instances={pseudo / 'instances.json'}",
    ], overrides)  # fmt: skip
    truth = _evaluate(base, out / "truth", str(out / "predict"), [], overrides)
    return {
        "steps": steps,
        "train_seconds": round(trained, 1),
        "instances": predicted["counts"]["instances"],
        "fit": _scores(fit, "predict"),
        "truth": _scores(truth, "predict"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished run")
    parser.add_argument("--steps", default="40,100,200", help="step counts, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("runs/learning"), help="work folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="key=value on top of the run's config")
    args = parser.parse_args()
    baseline = _scores(json.loads((args.run / "evaluate" / "metrics.json").read_text()),
                       "panoptic")  # fmt: skip
    # One Ray for every stage of every point (a start per stage is slow on a small machine).
    with ray_session(load_config(overrides=args.overrides).ray):
        points = [
            point(args.run, args.out / f"steps-{n}", int(n), args.overrides)
            for n in args.steps.split(",")
        ]
    print("\nclass-agnostic AP50 against the pseudo labels (fit) and the ground truth (gt)")
    print(
        "| steps | train s | instances | fit box | fit mask | gt box | gt mask | gt mIoU "
        "| gt PQ | gt PQ^St | gt aware mask AP50 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in points:
        f, t = p["fit"], p["truth"]
        print(f"| {p['steps']} | {p['train_seconds']:.0f} | {p['instances']} | "
              f"{f['box_ap50']:.1f} | {f['mask_ap50']:.1f} | {t['box_ap50']:.1f} | "
              f"{t['mask_ap50']:.1f} | {t['miou']:.1f} | {t['pq']:.1f} | {t['pq_st']:.1f} | "
              f"{t['aware_mask_ap50']:.1f} |")  # fmt: skip
    b = baseline
    print(
        f"| pseudo labels (baseline) | | | | | {b['box_ap50']:.1f} | {b['mask_ap50']:.1f} | "
        f"{b['miou']:.1f} | {b['pq']:.1f} | {b['pq_st']:.1f} | {b['aware_mask_ap50']:.1f} |"
    )
    last = points[-1]["truth"]
    ratio = last["mask_ap50"] / b["mask_ap50"] if b["mask_ap50"] else float("nan")
    print(f"last point's ground-truth mask AP50 / the pseudo labels': {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"baseline": baseline, "points": points}, indent=1))


if __name__ == "__main__":
    main()
