"""`u2seg plan` and the sizing every stage applies: settings left unset are decided by the
cluster, explicit ones win, and a plan the cluster cannot hold is refused before anything
runs, naming the setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import u2seg
from u2seg.cli import main
from u2seg.config import load_config
from u2seg.plan import PlanError, asks, check, described, size

from .helpers import DEMO_CONFIG, REPO

ONE_GPU = REPO / "configs" / "one-gpu.yaml"
WORKSTATION = ["--gpus", "1", "--cpus", "16", "--memory", "64"]
IMAGE_STAGES = ("features", "maskcut", "embed", "semantic", "predict")


def _plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:
    code = main(["plan", "--json", *args])
    out = capsys.readouterr()
    return code, json.loads(out.out), out.err


def _by_stage(plan: dict) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in plan["asks"]:
        rows.setdefault(row["stage"], []).append(row)
    return rows


@pytest.mark.parametrize("config", [None, ONE_GPU], ids=["default", "one-gpu"])
def test_one_gpu_workstation_fits_one_worker_and_one_gpu_actor_per_stage(
    capsys: pytest.CaptureFixture[str], config: Path | None
) -> None:
    args = [*WORKSTATION, *(["--config", str(config)] if config else [])]
    code, plan, _ = _plan(capsys, *args)
    assert code == 0 and plan["fits"], plan
    rows = _by_stage(plan)
    for stage in IMAGE_STAGES:
        pool = rows[stage][0]
        assert (pool["what"], pool["count"], pool["gpus"]) == ("actors", 1, 1.0), pool
    (train,) = rows["train"]
    assert (train["what"], train["count"], train["gpus"]) == ("deepspeed workers", 1, 1.0)
    assert plan["sized"]["train.use_gpu"] is True
    assert plan["sized"]["cluster.num_cpus"] == 16  # the k-means task: every CPU


def test_eight_gpus_give_the_papers_layout(capsys: pytest.CaptureFixture[str]) -> None:
    code, plan, _ = _plan(
        capsys, "--gpus", "8", "--cpus", "64", "--memory", "512", "semantic.method=stego"
    )
    assert code == 0 and plan["fits"]
    rows = _by_stage(plan)
    for stage in IMAGE_STAGES:
        assert (rows[stage][0]["count"], rows[stage][0]["gpus"]) == (8, 1.0)
    assert [(r["what"], r["count"], r["gpus"]) for r in rows["train"]] == [
        ("deepspeed workers", 8, 1.0)
    ]
    assert ("STEGO workers", 8, 1.0) in [
        (r["what"], r["count"], r["gpus"]) for r in rows["semantic"]
    ]


def test_more_workers_than_gpus_is_refused_naming_the_setting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, plan, err = _plan(capsys, *WORKSTATION, "train.num_workers=4")
    assert code == 2 and not plan["fits"]
    (train,) = _by_stage(plan)["train"]
    assert any("train.num_workers=4 asks for 4 GPUs" in p for p in train["problems"])
    assert "set train.num_workers=1" in " ".join(train["problems"])
    assert "does not fit" in err


def test_a_run_that_cannot_fit_is_refused_before_anything_is_written(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """No node anywhere has 4096 CPUs: the run stops before its output exists."""
    out = tmp_path / "run"
    args = ["run", "--config", str(DEMO_CONFIG), f"data.source={tmp_path}", f"output={out}"]
    assert main([*args, "train.cpus_per_worker=4096"]) == 2
    err = capsys.readouterr().err
    assert "lower train.cpus_per_worker" in err and "train:" in err
    assert not out.exists()


def test_a_stage_called_from_python_checks_its_plan_first(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(DEMO_CONFIG, [f"data.source={tmp_path}", f"output={out}",
                                    "maskcut.num_cpus=4096"])  # fmt: skip
    with pytest.raises(PlanError, match=r"maskcut\.num_cpus"):
        u2seg.run_maskcut(cfg)
    assert not out.exists()


def test_unset_settings_are_sized_and_explicit_ones_win() -> None:
    cfg = load_config(None, ["maskcut.concurrency=3", "train.num_workers=2"])
    cpu16 = described(16, 0, 64)
    sized = size(cfg, cpu16)
    # Without GPUs: one CPU actor per core the read tasks leave (0.5 of 16), a local trainer.
    assert sized.features.concurrency == 16 and sized.features.num_gpus == 0
    assert sized.embed.concurrency == 16
    assert sized.maskcut.concurrency == 3  # explicit
    assert sized.train.strategy == "local" and sized.train.num_workers == 2
    assert sized.semantic.train_workers == 0 and sized.cluster.num_cpus == 16
    assert size(sized, described(1, 8, 8)) == sized  # nothing left unset: idempotent
    # Whole-CPU actors leave room for the read tasks: 2 cores, reads 0.5 -> 1 actor.
    two = size(load_config(None, ["features.num_cpus=1"]), described(2, 0, 8))
    assert two.features.concurrency == 1
    # Several machines without GPUs: Ray Train workers, as many as the CPUs hold.
    nodes = size(load_config(None, []), described(4, 0, 16, nodes=3))
    assert nodes.train.strategy == "deepspeed" and nodes.train.num_workers == 11
    assert check(load_config(None, []), ["train"], described(4, 0, 16, nodes=3)).train == (
        nodes.train
    )


def test_an_autoscaler_turns_refusals_into_waits() -> None:
    cfg = load_config(None, ["train.use_gpu=true", "train.num_workers=8"])
    fixed = described(8, 0, 32)
    with pytest.raises(PlanError, match="set train.use_gpu=false"):
        check(cfg, ["train"], fixed)
    growing = described(8, 0, 32, autoscaler=True)
    sized = check(cfg, ["train"], growing)  # waits for GPU nodes (ray.gpu_wait_s)
    (train,) = asks(sized, ["train"])
    assert (train.count, train.gpus) == (8, 1.0)


def test_the_plan_of_this_machine_fits_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    code, plan, _ = _plan(capsys, "--config", str(DEMO_CONFIG))
    assert code == 0 and plan["fits"]
    assert plan["cluster"]["source"].startswith("this machine")
    assert len(plan["cluster"]["nodes"]) == 1


def test_node_groups_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from u2seg.plan import NODE_GROUPS_ENV, _autoscaler_groups

    groups = '[{"name": "gpu", "cpus": 8, "gpus": 1, "memory_gib": 64, "max": 16}]'
    monkeypatch.setenv(NODE_GROUPS_ENV, groups)
    assert _autoscaler_groups() == [(described(8, 1, 64).nodes[0], 16)]
    monkeypatch.setenv(NODE_GROUPS_ENV, '[{"name": "gpu"}]')
    with pytest.raises(PlanError, match=NODE_GROUPS_ENV):
        _autoscaler_groups()


def test_the_kmeans_task_asks_for_the_memory_of_the_vectors_once_they_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before embed has run the plan cannot know it; after, a task no node can hold is
    refused, naming the sharded mode."""
    out = tmp_path / "run"
    args = ["--gpus", "1", "--cpus", "16", "--memory", "64", "--stages", "cluster",
            f"output={out}", "backbone.name=dino_vitb8",
            "cluster.max_local_vectors=20000000"]  # fmt: skip
    code, plan, _ = _plan(capsys, *args)
    assert code == 0 and plan["asks"][0]["memory_gib"] == 0
    (out / "embed").mkdir(parents=True)
    (out / "embed" / "manifest.json").write_text(json.dumps({"counts": {"embedded": 10_000_000}}))
    code, plan, _ = _plan(capsys, *args)
    (task,) = plan["asks"]
    assert task["memory_gib"] == pytest.approx(12 * 10_000_000 * 768 / 2**30)  # 85.8 GiB
    assert code == 2 and "set cluster.mode=sharded" in task["problems"][0]
    code, plan, _ = _plan(capsys, *args, "cluster.mode=sharded")
    assert code == 0 and plan["asks"][0]["what"] == "k-means shard actors"
    code, plan, _ = _plan(capsys, *args[:-1])  # auto: above 5 M vectors it shards
    assert code == 0 and plan["asks"][0]["what"] == "k-means shard actors"
