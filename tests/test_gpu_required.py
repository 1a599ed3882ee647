"""Stages asked for GPUs by configuration never fall back to the CPU: on a Ray cluster
without GPUs they ask the autoscaler, wait `ray.gpu_wait_s` and fail naming the setting;
a worker whose CUDA is unusable fails with torch's reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, demo_config, save_photo
from tests.trainset import train_config, write_trainset
from u2seg.runtime import NoGpu
from u2seg.stages import features
from u2seg.stages import train as train_stage

pytestmark = pytest.mark.ray


def test_training_asked_for_gpus_fails_on_a_cpu_only_ray_naming_the_setting(
    tmp_path: Path,
) -> None:
    photos, run = write_trainset(tmp_path, images=2)
    cfg = train_config(photos, run, "train.use_gpu=true", "ray.gpu_wait_s=1",
                       "train.num_workers=2", "train.max_iter=2")  # fmt: skip
    with pytest.raises(NoGpu) as failed:
        train_stage.run(cfg)
    message = str(failed.value)
    assert "train.use_gpu=true asks for 2 GPU(s)" in message
    assert "ray.gpu_wait_s=1 s" in message and "set train.use_gpu=false" in message
    assert not (run / "train" / "model.pt").exists()  # nothing trained on the CPU instead


def test_a_labelling_stage_asked_for_gpus_fails_on_a_cpu_only_ray(
    tmp_path: Path, weights_cache: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(2):
        save_photo(photos / f"p{k}.jpg", (64, 48), seed=k)
    cfg = demo_config(photos, tmp_path / "run", weights_cache,
                      "features.num_gpus=1", "ray.gpu_wait_s=0.5")  # fmt: skip
    with pytest.raises(NoGpu, match=r"features\.num_gpus=1 asks for 1 GPU.*features\.num_gpus=0"):
        features.run(cfg)


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
