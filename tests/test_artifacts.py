from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from u2seg.artifacts import MANIFEST, ArtifactError, ShardWriter, StageDir

ERRORS = pa.schema([("image_id", pa.int64()), ("reason", pa.string())])


def _rows(shard: int, ids: list[int]) -> pa.Table:
    return pa.table({"image_id": ids, "shard": [shard] * len(ids)})


def test_start_refuses_another_config(tmp_path: Path) -> None:
    stage = StageDir(str(tmp_path), "features")
    stage.start({"all": 1}, {"backbone": {"name": "a"}, "size": (1, 2)})
    # The same dependencies (a tuple and a list are equal) reopen the directory.
    again = StageDir(str(tmp_path), "features")
    again.start({"all": 2}, {"backbone": {"name": "a"}, "size": [1, 2]})
    with pytest.raises(ArtifactError, match=r"backbone\.name: 'a' -> 'b'"):
        again.start({}, {"backbone": {"name": "b"}, "size": [1, 2]})


def test_shard_writer_writes_each_shard_when_whole(tmp_path: Path) -> None:
    stage = StageDir(str(tmp_path), "s")
    stage.start({}, {})
    writer = ShardWriter(stage, {0: 3, 1: 2})
    assert writer.add(pa.concat_tables([_rows(0, [1, 2])])) == 0
    assert stage.complete_shards() == set()
    # One batch that finishes shard 0 and starts shard 1.
    assert writer.add(pa.concat_tables([_rows(0, [3]), _rows(1, [4])])) == 1
    assert stage.complete_shards() == {0}
    assert writer.incomplete == [1]
    assert writer.add(_rows(1, [5])) == 1
    assert writer.incomplete == []
    assert stage.read_table("part-00000.parquet").column("image_id").to_pylist() == [1, 2, 3]
    assert "shard" not in stage.read_table("part-00001.parquet").column_names


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
