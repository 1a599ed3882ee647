from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from u2seg.artifacts import MANIFEST, ArtifactError, ShardWriter, StageDir, inputs_digest
from u2seg.config import depends_on, load_config

ERRORS = pa.schema([("image_id", pa.int64()), ("reason", pa.string())])


def _rows(shard: int, ids: list[int]) -> pa.Table:
    return pa.table({"image_id": ids, "shard": [shard] * len(ids), "order": ids})


def test_start_refuses_another_config_once_a_shard_exists(tmp_path: Path) -> None:
    stage = StageDir(str(tmp_path), "features")
    stage.start({"all": 1}, {"backbone": {"name": "a"}, "size": (1, 2)})
    # Nothing complete yet (a failed first start): another config is taken.
    again = StageDir(str(tmp_path), "features")
    again.start({"all": 2}, {"backbone": {"name": "c"}, "size": [1, 2]})
    assert again.read_json("config.json")["depends_on"]["backbone"] == {"name": "c"}
    again.start({"all": 2}, {"backbone": {"name": "a"}, "size": [1, 2]})
    again.write_table("part-00000.parquet", _rows(0, [1]))
    # The same dependencies (a tuple and a list are equal) reopen the directory.
    again.start({"all": 3}, {"backbone": {"name": "a"}, "size": (1, 2)})
    with pytest.raises(ArtifactError, match=r"backbone\.name: 'a' -> 'b'"):
        again.start({}, {"backbone": {"name": "b"}, "size": [1, 2]})


def test_shard_writer_writes_each_shard_when_whole_in_plan_order(tmp_path: Path) -> None:
    stage = StageDir(str(tmp_path), "s")
    stage.start({}, {})
    writer = ShardWriter(stage, {0: 3, 1: 2}, {0: "d0", 1: "d1"})
    assert writer.add(pa.concat_tables([_rows(0, [3, 1])])) == 0
    assert stage.complete_shards() == set()
    # One batch that finishes shard 0 and starts shard 1 (results arrive in any order).
    assert writer.add(pa.concat_tables([_rows(1, [5]), _rows(0, [2])])) == 1
    assert stage.complete_shards() == {0}
    assert writer.incomplete == [1]
    assert writer.add(_rows(1, [4])) == 1
    assert writer.incomplete == []
    assert stage.read_table("part-00000.parquet").column("image_id").to_pylist() == [1, 2, 3]
    assert stage.read_table("part-00001.parquet").column_names == ["image_id"]
    assert (stage.shard_inputs(0), stage.shard_inputs(1)) == ("d0", "d1")


def test_only_shards_of_unchanged_inputs_are_reused(tmp_path: Path) -> None:
    stage = StageDir(str(tmp_path), "s")
    stage.start({}, {})
    listing = [[1, "a.jpg"], [2, "b.jpg"], [3, "c.jpg"], [4, "d.jpg"], [5, "e.jpg"]]
    old = {k: inputs_digest(listing[2 * k : 2 * k + 2]) for k in range(3)}
    for k in range(3):
        stage.write_table(StageDir.shard_name(k), _rows(k, [k]), old[k])
    stage.write_table(StageDir.shard_name(3), _rows(3, [9]))  # no digest: never reused
    # "aaa.jpg" added first: every shard now holds other images; the listing still has 3.
    grown = [[0, "aaa.jpg"], *listing]
    new = {k: inputs_digest(grown[2 * k : 2 * k + 2]) for k in range(3)}
    assert stage.reusable_shards(new) == set()
    # The same listing again: shards 0-2 reused, shard 3 (outside the plan) deleted.
    assert stage.reusable_shards(old) == {0, 1, 2}
    assert stage.complete_shards() == {0, 1, 2}
    assert inputs_digest([[1, "a.jpg"]]) != inputs_digest([[1, "b.jpg"]])


def test_temporary_files_are_not_shards_and_manifest_marks_done(tmp_path: Path) -> None:
    stage = StageDir(str(tmp_path), "s")
    stage.start({"x": 1}, {})
    stage.write_table("part-00002.parquet", _rows(2, [1]))
    (tmp_path / "s" / ".tmp-abc-part-00003.parquet").write_bytes(b"half")
    assert stage.complete_shards() == {2}
    with pytest.raises(ArtifactError, match="has not completed"):
        stage.manifest()
    errors = pa.table({"image_id": [7], "reason": ["empty file"]}, schema=ERRORS)
    manifest = stage.finish({"images": 1}, errors)
    assert stage.exists(MANIFEST)
    assert manifest["config"] == {"x": 1}
    assert manifest["shards"] == ["part-00002.parquet"]
    assert manifest["errors"]["count"] == 1
    assert manifest["errors"]["first"] == [{"image_id": 7, "reason": "empty file"}]
    assert stage.manifest() == manifest
    assert stage.read_table("errors.parquet").num_rows == 1


def test_fsspec_run_directory() -> None:
    stage = StageDir("memory://runs/r1", "features")
    stage.start({}, {"a": 1})
    stage.write_table(stage.shard_name(0), _rows(0, [1]))
    assert stage.complete_shards() == {0}
    assert stage.read_table("part-00000.parquet").num_rows == 1


def test_execution_only_settings_do_not_block_a_resume(tmp_path: Path) -> None:
    # A run written when the section still held an execution setting, then resumed with
    # more actors: only what changes the output is compared.
    stage = StageDir(str(tmp_path), "maskcut")
    stage.start({}, {"maskcut": {"tau": 0.15, "concurrency": 2}, "data": {"fail_after": None}})
    stage.write_table("part-00000.parquet", _rows(0, [1]))
    cfg = load_config(None, ["maskcut.concurrency=8", "maskcut.max_concurrency=16"])
    current = depends_on(cfg, ("maskcut",))
    assert "concurrency" not in current["maskcut"] and current["maskcut"]["tau"] == 0.15
    stage.start({}, {"maskcut": {"tau": 0.15}, "data": {}})
    with pytest.raises(ArtifactError, match=r"maskcut\.tau: 0\.15 -> 0\.2"):
        stage.start({}, {"maskcut": {"tau": 0.2}})


@pytest.mark.parametrize(
    "result",
    ["manifest.json", "assignments.parquet", "centroids.npy", "head.pt", "panoptic/x.png",
     "ray/checkpoint_000001/model.pt"],
)  # fmt: skip
def test_every_kind_of_result_protects_its_config(tmp_path: Path, result: str) -> None:
    stage = StageDir(str(tmp_path), "s")
    stage.start({}, {"cluster": {"k": 15}})
    stage.write_bytes(".tmp-dead-part-00000.parquet", b"partial")  # not a result
    stage.start({}, {"cluster": {"k": 10}})  # nothing made yet: the new config is taken
    stage.write_bytes(result, b"made")
    with pytest.raises(ArtifactError, match=r"cluster\.k: 10 -> 15"):
        StageDir(str(tmp_path), "s").start({}, {"cluster": {"k": 15}})
    assert stage.read_json("config.json")["depends_on"] == {"cluster": {"k": 10}}


def _shards(stage: StageDir) -> dict[str, bytes]:
    return {n: stage.fs.cat(stage.file(n)) for n in stage.shard_names()}


def test_a_failed_attempt_removes_only_what_it_wrote(tmp_path: Path) -> None:
    earlier = StageDir(str(tmp_path), "s")
    earlier.start({}, {})
    old = {k: f"old{k}" for k in range(4)}
    for k in range(4):
        earlier.write_table(StageDir.shard_name(k), _rows(k, [k]), old[k])
    before = _shards(earlier)
    # The next attempt's plan: shard 1 holds other images now, shard 4 is new.
    attempt = StageDir(str(tmp_path), "s")
    plan = {**old, 1: "new1", 4: "new4"}
    assert attempt.reusable_shards(plan) == {0, 2, 3}
    assert attempt.complete_shards() == {0, 2, 3}  # shard 1 moved aside, no reader sees it
    attempt.write_table(StageDir.shard_name(1), _rows(1, [10]), "new1")
    attempt.write_table(StageDir.shard_name(4), _rows(4, [11]), "new4")
    attempt.discard_attempt()  # it failed
    assert _shards(attempt) == before
    assert attempt.holds_results()  # the earlier shards are still results
    # The plan again, and it completes: the old shard 1 is deleted only then.
    again = StageDir(str(tmp_path), "s")
    assert again.reusable_shards(plan) == {0, 2, 3}
    again.write_table(StageDir.shard_name(1), _rows(1, [10]), "new1")
    again.write_table(StageDir.shard_name(4), _rows(4, [11]), "new4")
    again.finish({}, pa.table({"image_id": pa.array([], pa.int64())}))
    assert not (tmp_path / "s" / "superseded").exists()
    assert again.shard_inputs(1) == "new1"


def test_a_shard_moved_aside_is_put_back_when_the_plan_gives_it_again(tmp_path: Path) -> None:
    stage = StageDir(str(tmp_path), "s")
    stage.start({}, {})
    stage.write_table(StageDir.shard_name(0), _rows(0, [1]), "a")
    assert StageDir(str(tmp_path), "s").reusable_shards({0: "b"}) == set()  # killed after this
    # The listing changed back before the stage completed: the shard is reused, not redone.
    assert StageDir(str(tmp_path), "s").reusable_shards({0: "a"}) == {0}
    assert stage.shard_inputs(0) == "a"
