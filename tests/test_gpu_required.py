"""Stages asked for GPUs by configuration never fall back to the CPU: on a machine that
cannot have them the plan refuses before anything runs; on a Ray cluster that may grow they
ask the autoscaler, wait `ray.gpu_wait_s` and fail naming the setting; a worker whose CUDA
is unusable fails with torch's reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from tests.helpers import REPO, demo_config, save_photo
from tests.trainset import train_config, write_trainset
from u2seg.plan import PlanError
from u2seg.runtime import NoGpu
from u2seg.stages import features
from u2seg.stages import train as train_stage

pytestmark = pytest.mark.ray


def _photos(tmp_path: Path) -> Path:
    photos = tmp_path / "two"
    photos.mkdir()
    for k in range(2):
        save_photo(photos / f"p{k}.jpg", (64, 48), seed=k)
    return photos


def test_gpus_asked_of_this_cpu_only_machine_are_refused_before_anything_runs(
    tmp_path: Path, weights_cache: Path
) -> None:
    # A local Ray has no autoscaler: no GPU will ever join, so the plan refuses at once.
    photos, run = write_trainset(tmp_path, images=2)
    cfg = train_config(photos, run, "train.use_gpu=true", "train.num_workers=2")
    with pytest.raises(PlanError, match=r"train: .*asks for GPUs.*set train\.use_gpu=false"):
        train_stage.run(cfg)
    assert not (run / "train").exists()  # nothing trained on the CPU instead
    cfg = demo_config(_photos(tmp_path), tmp_path / "labels", weights_cache, "features.num_gpus=1")
    with pytest.raises(PlanError, match=r"features: .*asks for GPUs.*set features\.num_gpus=0"):
        features.run(cfg)
    assert not (tmp_path / "labels" / "features").exists()
    assert not ray.is_initialized()  # refused before any Ray started


def test_on_a_cluster_that_may_grow_stages_wait_for_gpus_then_fail_naming_the_setting(
    tmp_path: Path, weights_cache: Path
) -> None:
    # A Ray this process joined (not one u2seg started) may have an autoscaler: the stages
    # ask it for GPUs, wait ray.gpu_wait_s and fail naming the setting.
    photos, run = write_trainset(tmp_path, images=2)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        cfg = train_config(photos, run, "train.use_gpu=true", "ray.gpu_wait_s=1",
                           "train.num_workers=2", "train.max_iter=2")  # fmt: skip
        with pytest.raises(NoGpu) as failed:
            train_stage.run(cfg)
        message = str(failed.value)
        assert "train.use_gpu=true asks for 2 GPU(s)" in message
        assert "ray.gpu_wait_s=1 s" in message and "set train.use_gpu=false" in message
        assert not (run / "train" / "model.pt").exists()  # nothing trained on the CPU instead
        cfg = demo_config(_photos(tmp_path), tmp_path / "labels", weights_cache,
                          "features.num_gpus=1", "ray.gpu_wait_s=0.5")  # fmt: skip
        with pytest.raises(NoGpu, match=r"features\.num_gpus=1 asks for 1 GPU.*num_gpus=0"):
            features.run(cfg)
    finally:
        ray.shutdown()


def test_a_cuda_device_torch_cannot_use_is_refused_with_torch_s_reason() -> None:
    # No device visible to CUDA, whatever this machine has: the same path as a driver too
    # old for torch's CUDA, which torch also reports from torch.cuda.init().
    code = (
        "from u2seg.runtime import NoGpu, resolve_device\n"
        "assert str(resolve_device('auto')) == 'cpu'\n"
        "try:\n    resolve_device('cuda')\nexcept NoGpu as e:\n    print(e)\n"
        "else:\n    raise SystemExit('cuda was accepted')\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "device 'cuda' asked for, but torch cannot use CUDA" in done.stdout
    assert "CUDA_VISIBLE_DEVICES=''" in done.stdout and "torch 2." in done.stdout
