"""`u2seg train` and `u2seg predict` on tiny images: DeepSpeed ZeRO-2 on 2 Ray Train
workers, the same first step under every strategy, a worker killed mid-run, a killed
driver resumed, refused checkpoints, and predictions that evaluate and pycocotools read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import u2seg
from tests.helpers import DEMO_CONFIG, REPO, fault_when
from tests.trainset import SMALL_TRAIN, train_config, write_trainset
from u2seg.config import ConfigError, load_config, to_dict
from u2seg.data.weights import read_model_file
from u2seg.stages import _checkpoints as ckpt
from u2seg.stages import train as train_stage
from u2seg.stages._panoptic_model import build_from_spec

# The cluster configs' loader (the demo's decodes in the workers).
DEEPSPEED_2 = ["train.strategy=deepspeed", "train.zero_stage=2", "train.num_workers=2",
               "train.ims_per_batch=2", "train.loader=ray-data"]  # fmt: skip


def _ray_checkpoints(run: Path) -> list[Path]:
    return sorted((run / "train" / "ray").glob("checkpoint_*"))


def _registered_step(run: Path) -> int:
    """The step of the last checkpoint Ray Train has registered (0: none yet). A
    checkpoint folder on disk is not one yet: every rank must have reported it."""
    try:
        snapshot = json.loads(
            (run / "train" / "ray" / "checkpoint_manager_snapshot.json").read_text()
        )
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("step", 0))


@pytest.fixture(scope="module", autouse=True)
def _one_ray(local_ray: None) -> None:
    """One local Ray for the module's in-process stages (each would start its own)."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A DeepSpeed ZeRO-2 run of 3 steps on 2 workers fed by Ray Data."""
    photos, run = write_trainset(tmp_path_factory.mktemp("ds"))
    cfg = train_config(photos, run, *DEEPSPEED_2, "train.max_iter=3", "train.checkpoint_every=2",
                       "train.keep=1")  # fmt: skip
    return photos, run, u2seg.run_train(cfg)


@pytest.mark.slow
@pytest.mark.ray
def test_deepspeed_zero2_on_two_workers_keeps_the_ranks_equal(trained) -> None:
    _, run, manifest = trained
    info = manifest["training"]
    assert info["deepspeed"] and info["zero_stage"] == 2 and info["world_size"] == 2
    assert info["loader"] == "ray-data" and info["precision"] == "fp32"
    assert info["ranks_agree"] is True  # the weights are the same on both ranks
    assert [e["step"] for e in manifest["curve"]] == [1, 2, 3]
    assert all(e["loss"] > 0 for e in manifest["curve"])
    assert manifest["counts"]["restarts"] == 0
    assert 0 <= manifest["timing"]["data_wait_share"] <= 1
    assert manifest["timing"]["peak_rss_mib"] > 100  # a worker holding torch and the model
    # Ray keeps the last checkpoint only (keep=1), with one ZeRO optimizer shard per rank.
    snapshot = json.loads((run / "train" / "ray" / "checkpoint_manager_snapshot.json").read_text())
    (kept,) = snapshot["checkpoint_results"]
    last = run / "train" / "ray" / kept["checkpoint_dir_name"]
    assert kept["metrics"]["step"] == 3
    shards = sorted(p.name for p in last.glob("step*/zero_pp_rank_*_optim_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    state, meta = read_model_file(str(run / "train" / "model.pt"))
    assert meta["step"] == 3 and meta["spec"]["num_things"] == 2
    model = build_from_spec(meta["spec"], torch.device("cpu"))
    model.load_state_dict(state)  # a plain weights-only file of this architecture


@pytest.mark.slow
@pytest.mark.ray
def test_predictions_load_in_evaluate_and_pycocotools(trained) -> None:
    photos, run, _ = trained
    cfg = train_config(photos, run, "predict.short_side=128", "predict.max_side=128")
    manifest = u2seg.run_predict(cfg)
    assert manifest["counts"]["images"] == 4 and manifest["counts"]["errors"] == 0
    out = run / "predict"
    gt = COCO(str(run / "panoptic" / "instances.json"))
    detections = json.loads((out / "instances.json").read_text())["annotations"]
    assert detections and all(0 <= d["score"] <= 1 for d in detections)
    result = gt.loadRes(detections)
    evaluator = COCOeval(gt, result, "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert -1 <= evaluator.stats[0] <= 1
    panoptic = json.loads((out / "panoptic.json").read_text())
    assert len(panoptic["annotations"]) == 4
    assert all((out / "panoptic" / a["file_name"]).is_file() for a in panoptic["annotations"])
    assert len(list((out / "semantic").glob("*.png"))) == 4
    u2seg.run_evaluate(
        train_config(
            photos, run, "evaluate.predictions=[predict]", "evaluate.gt_format=coco",
            f"evaluate.gt_instances={run / 'panoptic' / 'instances.json'}", "evaluate.overlays=0",
        )
    )  # fmt: skip
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    scores = metrics["predictions"]["predict"]
    assert 0 <= scores["instance"]["segm"]["AP"] <= 100  # the pseudo labels as ground truth
    again = u2seg.run_predict(cfg)  # complete shards are kept
    assert again["counts"]["resumed_shards"] == manifest["counts"]["shards"] == 2


@pytest.mark.slow
@pytest.mark.ray
def test_listed_names_never_write_outside_the_output(trained, tmp_path: Path) -> None:
    # A listing whose names climb out of the image root, or name a file elsewhere: recorded
    # with the reason, nothing written beside the output; the photos under the root predicted.
    photos, run, _ = trained
    root = tmp_path / "data" / "set" / "images"
    root.mkdir(parents=True)
    (root / "p0.png").write_bytes((photos / "p0.png").read_bytes())
    (tmp_path / "photo.png").write_bytes((photos / "p1.png").read_bytes())
    # From the root and from <output>/predict/panoptic alike, ../../../ climbs 3 folders.
    names = ["p0.png", "../../../photo.png", str(tmp_path / "photo.png"), str(root / "p0.png")]
    listing = tmp_path / "data" / "listing.json"
    listing.write_text(json.dumps({"images": [{"id": k, "file_name": n}
                                              for k, n in enumerate(names, 1)]}))  # fmt: skip
    before = sorted(p for p in tmp_path.rglob("*"))
    out = tmp_path / "runs" / "out"
    cfg = train_config(photos, out, f"data.source={listing}", f"data.root={root}",
                       f"predict.model={run / 'train' / 'model.pt'}", "predict.short_side=128",
                       "predict.max_side=128")  # fmt: skip
    manifest = u2seg.run_predict(cfg)
    after = sorted(
        p for p in tmp_path.rglob("*") if out not in p.parents and p not in (out, out.parent)
    )
    assert after == before
    reasons = {(r["file_name"], r["reason"]) for r in manifest["errors"]["first"]}
    assert reasons == {
        ("../../../photo.png", "a file name with a '..' part (outputs are named after file names)"),
        (str(tmp_path / "photo.png"), f"outside data.root ({root}): set data.root to a folder "
         "holding it"),
        ("p0.png", "listed before, as image 1"),  # the absolute name under the root
    }  # fmt: skip
    panoptic = json.loads((out / "predict" / "panoptic.json").read_text())
    pngs = [a["file_name"] for a in panoptic["annotations"]]
    assert pngs == ["p0.png"]
    assert all((out / "predict" / "panoptic" / png).is_file() for png in pngs)


_BIG = """
import json, resource, sys
limit = int(sys.argv[4]) << 30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import numpy as np
from u2seg.stages.predict import Predictor
model, options, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
predictor = Predictor(model, options, out, "cpu", 2, 10**9)
batch = {"image_id": np.array([1, 2]), "file_name": np.array(["big.jpg", "p1.png"]),
         "path": np.array(sys.argv[5:7]), "png": np.array(["big.png", "p1.png"]),
         "error": np.array(["", ""]), "shard": np.array([0, 0]), "order": np.array([0, 1])}
rows = predictor(batch)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"error": rows["error"].tolist(), "annotations": rows["annotations"].tolist(),
                  "width": rows["width"].tolist(), "peak_gib": peak}))
"""


@pytest.mark.slow
@pytest.mark.ray
def test_a_40_megapixel_photo_is_predicted_in_bounded_memory(trained, tmp_path: Path) -> None:
    # Resized whole, a 40 MP photo's 100 masks alone are 16 GB of float32: under an 8 GiB
    # address-space limit the photo is predicted, beside a small one, in the same batch.
    from PIL import Image

    from u2seg.data.coco import rle_to_mask

    photos, run, _ = trained
    big = tmp_path / "big.jpg"
    Image.open(photos / "p0.png").convert("RGB").resize((7744, 5184)).save(big, quality=85)
    cfg = train_config(photos, run, "predict.score_thresh=0.0")
    options = {**to_dict(cfg.predict), "short_side": 128, "max_side": 128}
    done = subprocess.run(
        [sys.executable, "-c", _BIG, str(run / "train" / "model.pt"), json.dumps(options),
         str(tmp_path / "out"), "8", str(big), str(photos / "p1.png")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] == ["", ""] and result["width"] == [7744, 128]
    annotations = json.loads(result["annotations"][0])
    assert len(annotations) >= 50  # score_thresh 0: the detections_per_image cap decides
    mask = rle_to_mask(annotations[0]["segmentation"])
    assert mask.shape == (5184, 7744) and mask.any()
    panoptic = Image.open(tmp_path / "out" / "panoptic" / "big.png")
    assert panoptic.size == (7744, 5184)
    assert result["peak_gib"] < 4


@pytest.mark.slow
@pytest.mark.ray
def test_predict_precision_bf16_and_fp32_agree(trained, tmp_path: Path) -> None:
    """`predict.precision`: the bf16 forward (what "auto" runs on a GPU, forced here on the
    CPU) gives the fp32 forward's semantic map on almost every pixel and its best score;
    a wrong value is refused before any work."""
    from u2seg.data.coco import rle_to_mask
    from u2seg.data.images import read_image
    from u2seg.stages.predict import Predictor

    photos, run, _ = trained
    cfg = train_config(photos, run, "predict.score_thresh=0.0")
    options = to_dict(cfg.predict)
    image = read_image(str(sorted(photos.glob("*.png"))[0]), 10**8)
    row = {"image_id": 1, "png": "a.png"}
    out: dict[str, dict] = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor(str(run / "train" / "model.pt"), {**options, "precision": precision},
                              str(tmp_path / precision), "cpu", 1, 10**8)  # fmt: skip
        assert predictor.autocast == (torch.bfloat16 if precision == "bf16" else None)
        out[precision] = predictor.predict(image, row)
    semantic = {p: read_image(str(tmp_path / p / "semantic" / "a.png"), 10**8) for p in out}
    assert (semantic["fp32"] == semantic["bf16"]).mean() > 0.95
    # Three steps leave every score near 1/3 (two classes and background): the ranking is a
    # tie that bf16 breaks differently, the scores themselves agree.
    scores = {p: [a["score"] for a in json.loads(out[p]["annotations"])] for p in out}
    assert scores["fp32"] and len(scores["bf16"]) > 0
    assert abs(scores["fp32"][0] - scores["bf16"][0]) < 0.01
    assert rle_to_mask(json.loads(out["bf16"]["annotations"])[0]["segmentation"]).any()
    with pytest.raises(ValueError, match="precision"):
        u2seg.run_predict(train_config(photos, run, "predict.precision=fp16"))


def _first_step(tmp: Path, *strategy: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The losses of one step from the same start, and the weights after it (full learning
    rate from step 0, so that the update is large enough to show how it was clipped)."""
    photos, run = write_trainset(tmp, images=2)
    cfg = train_config(photos, run, *strategy, "train.max_iter=1", "train.ims_per_batch=2",
                       "train.loader=workers", "train.flip=false",
                       "train.warmup_iters=0")  # fmt: skip
    (entry,) = u2seg.run_train(cfg)["curve"]
    weights, _ = read_model_file(str(run / "train" / "model.pt"))
    return {k: v for k, v in entry.items() if k.startswith("loss_")}, weights


@pytest.mark.slow
@pytest.mark.ray
def test_ray_data_pastes_instances_between_the_records_of_a_pair(tmp_path: Path) -> None:
    """The `ray-data` loader's samples: copy-paste ran on the CPU tasks (an image with
    more than its own two instances), every sample consistent."""
    import ray.data

    from u2seg.config import RayConfig, to_dict
    from u2seg.data.training import read_training_set
    from u2seg.ops.copy_paste import boxes_of
    from u2seg.runtime import ray_session
    from u2seg.stages.train import TrainingSamples

    photos, run = write_trainset(tmp_path, images=6)
    cfg = train_config(photos, run, "train.copy_paste_scale=[0.3,0.6]")
    names = {p.name: str(p) for p in photos.iterdir()}
    records = read_training_set(str(run / "panoptic"), names).records
    with ray_session(RayConfig(num_cpus=2)):
        ds = ray.data.from_items(records).map_batches(
            TrainingSamples(to_dict(cfg.train), cfg.data.max_pixels), batch_size=2, num_cpus=0.5
        )
        rows = list(ds.iter_rows())
    assert len(rows) == 6
    for row in rows:
        masks = row["masks"].astype(bool)
        assert masks.shape[1:] == row["image"].shape[:2] == row["semantic"].shape
        assert len(masks) == len(row["labels"]) and masks.any(axis=(1, 2)).all()
        assert (row["boxes"] == boxes_of(masks)).all()
        assert (row["semantic"][masks.any(axis=0)] == 0).all()
    assert max(len(row["labels"]) for row in rows) > 2  # pasted: more than its own two


@pytest.mark.slow
@pytest.mark.ray
def test_every_strategy_computes_the_same_first_step(tmp_path: Path) -> None:
    # The same losses, and the same update: each gradient tensor clipped to norm 1.0 on its
    # own (detectron2's rule) under DeepSpeed ZeRO-2 too, not one global norm over them.
    local, after = _first_step(tmp_path / "local", "train.strategy=local")
    ddp = _first_step(tmp_path / "ddp", "train.strategy=ddp", "train.num_workers=1")
    deepspeed = _first_step(tmp_path / "ds", "train.strategy=deepspeed", "train.num_workers=1")
    assert len(local) == 10 and local["loss_sem_seg"] > 0
    _, meta = read_model_file(str(tmp_path / "local" / "run" / "train" / "model.pt"))
    torch.manual_seed(0)  # train.seed: the initial weights of every strategy
    start = build_from_spec(meta["spec"], torch.device("cpu")).state_dict()
    moved = [k for k in after if not torch.equal(after[k], start[k])]
    assert len(moved) > 20  # the step changed the heads' weights
    for losses, weights in (ddp, deepspeed):
        assert losses.keys() == local.keys()
        for key, value in local.items():
            assert losses[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        for key in moved:
            assert torch.allclose(weights[key], after[key], rtol=1e-4, atol=1e-6), key


def _train_workers(pid: int, since: float) -> list[psutil.Process]:
    """The live Ray Train worker processes under `pid` started after `since` (workers of
    an earlier run of this test process may still be exiting)."""
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if (p.create_time() >= since and p.status() != psutil.STATUS_ZOMBIE
                    and any("RayTrainWorker" in part for part in p.cmdline())):  # fmt: skip
                found.append(p)
        except psutil.Error:  # gone meanwhile
            continue
    return found


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(tmp_path: Path) -> None:
    photos, run = write_trainset(tmp_path)
    cfg = train_config(photos, run, *DEEPSPEED_2, "train.max_iter=8", "train.checkpoint_every=2",
                       "train.max_failures=1")  # fmt: skip
    killed: dict[str, int] = {}
    since = time.time()

    def kill_after_first_checkpoint() -> bool:
        step = _registered_step(run)
        workers = _train_workers(os.getpid(), since)
        if not (step and len(workers) == 2):
            return False
        killed["after_step"] = step
        workers[1].send_signal(signal.SIGKILL)
        return True

    with fault_when(kill_after_first_checkpoint):
        manifest = u2seg.run_train(cfg)
    assert killed, "no worker was killed"
    assert manifest["counts"]["restarts"] == 1 and manifest["counts"]["steps"] == 8
    first, second = manifest["attempts"]
    assert first["start_step"] == 0
    # The restart resumed from a checkpoint at or after the one on disk at the kill...
    assert second["start_step"] >= killed["after_step"] and second["start_step"] % 2 == 0
    # ...and the curve holds every step once: nothing before that checkpoint was redone.
    assert [e["step"] for e in manifest["curve"]] == list(range(1, 9))
    assert manifest["training"]["ranks_agree"] is True


def _train_command(photos: Path, run: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "u2seg.cli", "train", "--config", str(DEMO_CONFIG),
        f"data.source={photos}", f"output={run}", "data.shard_size=2",
        f"backbone.cache_dir={REPO / '.cache' / 'weights'}",
        *SMALL_TRAIN, *DEEPSPEED_2, "train.max_iter=8", "train.checkpoint_every=2",
        "train.loader=workers", *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_driver_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    photos, run = write_trainset(tmp_path)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(_train_command(photos, run), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 400
    while not _registered_step(run):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no checkpoint while training ran"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run / "train" / "manifest.json").exists()
    time.sleep(3)  # the watchdog stops the killed driver's Ray
    resumed = subprocess.run(_train_command(photos, run), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step" in resumed.stdout
    manifest = json.loads((run / "train" / "manifest.json").read_text())
    first, second = manifest["attempts"]
    assert second["start_step"] >= 2 and manifest["counts"]["steps"] == 8
    assert [e["step"] for e in manifest["curve"]] == list(range(1, 9))


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A 2-step local run's last checkpoint directory, the run and the model spec."""
    photos, run = write_trainset(tmp_path_factory.mktemp("local"), images=2)
    cfg = train_config(photos, run, "train.strategy=local", "train.max_iter=2",
                       "train.ims_per_batch=1", "train.checkpoint_every=1")  # fmt: skip
    u2seg.run_train(cfg)
    (last,) = sorted((run / "train" / "checkpoints").glob("step-*"))[-1:]
    _, meta = read_model_file(str(run / "train" / "model.pt"))
    return last, run, meta["spec"]


def test_local_checkpoints_keep_the_last_ones(local_checkpoint) -> None:
    last, run, spec = local_checkpoint
    assert last.name == "step-00000002"
    assert [p.name for p in sorted((run / "train" / "checkpoints").iterdir())] == [
        "step-00000001",
        "step-00000002",
    ]  # keep=3 by default: both kept
    model = build_from_spec(spec, torch.device("cpu"))
    progress = ckpt.verify(last, "local", 1, model.state_dict())
    # 2 images, 1 per step: both batches of epoch 0 are done
    assert (progress["step"], progress["epoch"], progress["batches"]) == (2, 0, 2)


def test_a_truncated_checkpoint_is_refused_by_name(local_checkpoint, tmp_path: Path) -> None:
    last, _, spec = local_checkpoint
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for item in last.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    data = (copy / ckpt.STATE).read_bytes()
    (copy / ckpt.STATE).write_bytes(data[: len(data) // 2])
    model = build_from_spec(spec, torch.device("cpu"))
    with pytest.raises(ckpt.CheckpointFileError, match=r"state\.pt: truncated or not a torch"):
        ckpt.verify(copy, "local", 1, model.state_dict())
    (copy / ckpt.PROGRESS).unlink()
    with pytest.raises(ckpt.CheckpointFileError, match=r"incomplete checkpoint, no progress"):
        ckpt.verify(copy, "local", 1, model.state_dict())


def test_a_checkpoint_of_another_architecture_is_refused_by_name(local_checkpoint) -> None:
    last, _, spec = local_checkpoint
    other = {**spec, "num_things": 5, "heads": {**spec["heads"], "box_head_dim": 64}}
    model = build_from_spec(other, torch.device("cpu"))
    with pytest.raises(ckpt.CheckpointFileError, match=r"state\.pt holds another architecture"):
        ckpt.verify(last, "local", 1, model.state_dict())
    with pytest.raises(ckpt.CheckpointFileError, match="written by train.strategy=local"):
        ckpt.verify(last, "ddp", 1, model.state_dict())


class _Payload:
    """Any class a pickle could name (a weights-only load refuses to build it)."""


def test_a_checkpoint_holding_pickled_objects_is_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "rng-0.pt"
    torch.save({"state": _Payload()}, path)
    with pytest.raises(ckpt.CheckpointFileError, match=r"rng-0\.pt: holds a pickled .*_Payload"):
        ckpt.safe_load(path, deepspeed=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.strategy=horovod"], r"train\.strategy='horovod'"),
        (["train.num_workers=2", "train.ims_per_batch=3"], "not a multiple of the 2 workers"),
        (["train.steps=[50,20]"], r"train\.steps=\[50, 20\]: must be increasing"),
        (["train.copy_paste_scale=[0.8,0.3]"], r"train\.copy_paste_scale=\[0\.8, 0\.3\]"),
        (["train.weights=/nowhere.pth"], "set train.backbone=resnet50"),
        (["train.backbone=resnet50", "train.weights=/nowhere.pth"], "checkpoint not found"),
        (["train.backbone=resnet50", "train.weights=''"], "would start from random weights"),
        (
            ["train.num_workers=8", "train.ims_per_batch=8", "train.cpus_per_worker=0.1"],
            "4 training images for 8 workers",
        ),
    ],
)
def test_bad_training_settings_are_refused_by_name(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    photos, run = write_trainset(tmp_path)
    with pytest.raises(ConfigError, match=message):
        u2seg.run_train(train_config(photos, run, *overrides))
    assert not (run / "train").exists()  # refused before anything was written


def test_paper_configs_name_the_resnet_checkpoint_and_random_init_is_asked_for() -> None:
    # A paper config without a train section trained ResNet-50 from random weights, silently.
    for name in ("coco", "cityscapes", "imagenet"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.train.backbone == "resnet50", name
        assert cfg.train.weights.endswith(".pth"), name
    scratch = load_config(
        overrides=[
            "train.backbone=resnet50",
            "train.weights=random",
            "train.strategy=deepspeed",
            "train.num_workers=8",
        ]
    )
    assert train_stage._check(scratch) == scratch.train.num_workers


def test_the_default_resnet_weights_are_dinos_from_torch_hub(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """train.weights=hub (the default) loads DINO's ResNet-50 through torch.hub's cache; the
    download itself is replaced here (no network), the wiring is not."""
    from torchvision.models import resnet50

    from u2seg.models import pyramid

    published = resnet50().state_dict()
    asked = []

    def fetch(url: str, **kwargs: object) -> dict:
        asked.append(url)
        return {k: v for k, v in published.items()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fetch)
    assert load_config().train.weights == pyramid.HUB
    model = pyramid.ResNetFPN()
    pyramid.load_resnet_checkpoint(model, pyramid.HUB)
    assert asked == [pyramid.DINO_RESNET50_URL]
    loaded = model.resnet.state_dict()
    assert all(torch.equal(loaded[k], published[k]) for k in published if not k.startswith("fc."))

    def offline(url: str, **kwargs: object) -> dict:
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(pyramid.CheckpointError, match="set train.weights=<that file>"):
        pyramid.load_resnet_checkpoint(model, pyramid.HUB)


def test_a_local_checkpoint_on_an_object_store_is_whole_before_its_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On S3 a folder is not renamed at once: whatever the store does, the completion marker
    # must not be readable before every file of its checkpoint is.
    from u2seg.artifacts import StageDir

    stage = StageDir(f"memory://{tmp_path.name}/run", "train")
    session = train_stage._LocalSession(stage, keep=1)
    written = tmp_path / "ckpt"
    written.mkdir()
    names = [ckpt.STATE, ckpt.rng_file(0), "zz-extra.pt", ckpt.PROGRESS]
    for name in names:
        (written / name).write_bytes(name.encode() * 100)
    fs = stage.fs
    final = f"{stage.file(train_stage.LOCAL_CHECKPOINTS)}/step-00000007"
    seen = []

    def checked(method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if fs.exists(f"{final}/{ckpt.PROGRESS}"):
                present = {n for n in names if fs.exists(f"{final}/{n}")}
                seen.append(present)
                assert present == set(names), f"the marker landed before {set(names) - present}"
            return result

        return call

    for op in ("put_file", "cp_file", "mv", "pipe_file"):
        monkeypatch.setattr(fs, op, checked(getattr(fs, op)))
    session.save(written, 7, {})
    assert seen and [p.rsplit("/", 1)[-1] for p in session._complete()] == ["step-00000007"]
