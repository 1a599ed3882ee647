"""The artifact store: one directory per stage under a run's output directory.

A stage directory holds data shards (`part-00000.parquet`, ...), `config.json` (written when
the stage first starts: the resolved config and the sections this stage depends on) and,
once every shard is written, `manifest.json` (schema version, config, counts, errors).
Every file is written under a temporary name and renamed, so a killed job never leaves a
half file that looks whole; a re-run skips complete shards and refuses a different config.
A failed attempt removes only the shards it wrote itself; shards an earlier run made that
the plan no longer gives (the listing changed) are moved aside to `superseded/` and put back
if the attempt fails, deleted only once the stage completes.
Paths may be local or fsspec URLs (s3://bucket/runs/x).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from PIL import Image

from u2seg.config import redact

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
ERRORS = "errors.parquet"
SUPERSEDED = "superseded"
#: Names in a stage directory that are not results: its config, temporary files and the
#: shards moved aside.
_NOT_RESULTS = re.compile(r"^(config\.json|\.tmp-.*|superseded)$")
_SHARD_RE = re.compile(r"^part-(\d{5})\.parquet$")
INPUTS_KEY = b"u2seg.inputs"


class ArtifactError(RuntimeError):
    """An artifact directory is missing, incomplete, or was made with another config."""


def _normalise(obj: Any) -> Any:
    """JSON round trip, so tuples and lists compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _only(stored: Any, current: Any) -> Any:
    """`stored` restricted to the keys of `current`, at every level: keys a stage no longer
    depends on (execution-only ones, say) are not compared."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return {k: _only(stored.get(k), v) for k, v in current.items() if k in stored}
    return stored


class StageDir:
    """The directory of one stage of one run."""

    def __init__(self, run_dir: str, stage: str) -> None:
        self.fs: fsspec.AbstractFileSystem
        self.fs, root = url_to_fs(run_dir)
        self.stage = stage
        self.path = f"{root.rstrip('/')}/{stage}"
        self.written: set[int] = set()  # the shards this object wrote (this attempt's)
        self.moved_aside: set[int] = set()  # earlier shards it moved to superseded/

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self.path)
        return bool(self.fs.exists(self.file(name)))

    # -- writing -------------------------------------------------------------------------

    @contextmanager
    def open_atomic(self, name: str) -> Iterator[BinaryIO]:
        """A binary file written under a temporary name and renamed to `name` on success.
        `name` may name a sub-folder ("set/mapping.json"); it is created."""
        folder, _, base = f"/{name}".rpartition("/")
        self.fs.makedirs(f"{self.path}{folder}", exist_ok=True)
        tmp = self.file(f"{folder.lstrip('/')}/.tmp-{uuid.uuid4().hex}-{base}".lstrip("/"))
        try:
            with self.fs.open(tmp, "wb") as fh:
                yield fh
        except BaseException:
            self.fs.rm(tmp)
            raise
        self.fs.mv(tmp, self.file(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """A file of `data`, written whole (`name` may hold sub-folders)."""
        with self.open_atomic(name) as fh:
            fh.write(data)

    def write_json(self, name: str, obj: Any) -> None:
        """A JSON file; secrets a config read from the environment are masked (`redact`)."""
        self.write_bytes(name, json.dumps(redact(obj), indent=2, sort_keys=True).encode())

    def write_json_arrays(
        self, name: str, fixed: dict[str, Any], arrays: dict[str, Iterable[Any]]
    ) -> dict[str, int]:
        """Write a JSON object whose `arrays` are streamed item by item (a COCO file of
        millions of annotations never sits in memory whole); returns each array's length."""
        counts: dict[str, int] = {}
        with self.open_atomic(name) as fh:
            head = json.dumps(fixed, separators=(",", ":"))[:-1]
            fh.write(head.encode())
            for key, items in arrays.items():
                fh.write(f'{"," if fixed or counts else ""}"{key}":['.encode())
                count = 0
                for item in items:
                    fh.write(
                        (b"," if count else b"") + json.dumps(item, separators=(",", ":")).encode()
                    )
                    count += 1
                fh.write(b"]")
                counts[key] = count
            fh.write(b"}")
        return counts

    def write_table(self, name: str, table: pa.Table, inputs: str | None = None) -> None:
        """A Parquet file; `inputs`, for a shard: the digest of the inputs it was made from
        (`inputs_digest`), kept in the file's metadata for `shard_inputs`."""
        if inputs is not None:
            table = table.replace_schema_metadata(
                {**(table.schema.metadata or {}), INPUTS_KEY: inputs.encode()}
            )
        sink = io.BytesIO()
        pq.write_table(table, sink)
        self.write_bytes(name, sink.getvalue())
        if match := _SHARD_RE.match(name):
            self.written.add(int(match.group(1)))

    def write_array(self, name: str, array: np.ndarray) -> None:
        """An `.npy` file (centroids and the like)."""
        sink = io.BytesIO()
        np.save(sink, array)
        self.write_bytes(name, sink.getvalue())

    # -- reading -------------------------------------------------------------------------

    def read_json(self, name: str) -> Any:
        with self.fs.open(self.file(name), "rb") as fh:
            return json.load(fh)

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        return read_parquet(self.fs.unstrip_protocol(self.file(name)), columns)

    def read_array(self, name: str) -> np.ndarray:
        with self.fs.open(self.file(name), "rb") as fh:
            return np.load(fh)

    # -- stage life cycle ----------------------------------------------------------------

    def start(
        self, resolved: dict[str, Any], depends_on: dict[str, Any], has_results: bool | None = None
    ) -> None:
        """Create the directory, or reopen it if it was made with the same `depends_on`.

        `depends_on`: the config sections that change this stage's output. A different
        value there is refused rather than mixed into the existing results (a directory with
        none yet takes the new config). `has_results`: whether the directory holds results
        to protect (default: `holds_results`; training passes whether a checkpoint exists).
        """
        depends_on = redact(_normalise(depends_on))  # as config.json holds it
        if has_results is None:
            has_results = self.holds_results()
        # A directory without results holds nothing to protect: a failed or killed first
        # start (a typo in the config, say) does not block the corrected run.
        if self.exists(CONFIG) and has_results:
            stored = self.read_json(CONFIG)
            diffs = _differences(_only(stored.get("depends_on"), depends_on), depends_on)
            if diffs:
                raise ArtifactError(
                    f"{self.path} was written with another config ({'; '.join(diffs[:5])}); "
                    "use another output directory or delete this stage's directory"
                )
            return
        self.write_json(
            CONFIG,
            {
                "schema_version": SCHEMA_VERSION,
                "stage": self.stage,
                "depends_on": depends_on,
                "resolved": _normalise(resolved),
            },
        )

    def _names(self, folder: str) -> list[str]:
        """The entries of `folder` by name ([] when it does not exist). Listed afresh: on
        object stores fsspec caches listings, and Ray's workers, another driver or a person
        may have written or removed files since this process looked."""
        self.fs.invalidate_cache(folder)
        if not self.fs.exists(folder):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]

    def holds_results(self) -> bool:
        """Whether the directory holds anything a stage made: shards, a manifest, label
        PNGs, assignments, centroids, a head... (anything but its config, temporary files
        and shards moved aside). One rule for every stage, whatever its results."""
        return any(not _NOT_RESULTS.match(n) for n in self._names(self.path))

    def _shards_in(self, folder: str) -> set[int]:
        return {int(m.group(1)) for n in self._names(folder) if (m := _SHARD_RE.match(n))}

    @staticmethod
    def shard_name(index: int) -> str:
        return f"part-{index:05d}.parquet"

    def complete_shards(self) -> set[int]:
        """Indices of the shards already written in full (temporary files are ignored),
        listed afresh."""
        return self._shards_in(self.path)

    def shard_inputs(self, index: int, folder: str = "") -> str | None:
        """The inputs digest a shard was written with (None for a shard without one);
        `folder`: a sub-folder holding it (`superseded`)."""
        name = f"{folder}/{self.shard_name(index)}" if folder else self.shard_name(index)
        with self.fs.open(self.file(name), "rb") as fh:
            metadata = pq.read_schema(fh).metadata or {}
        value = metadata.get(INPUTS_KEY)
        return value.decode() if value is not None else None

    def reusable_shards(self, digests: dict[int, str]) -> set[int]:
        """The complete shards made from the inputs the plan now gives them (`digests`:
        shard index -> `inputs_digest` of its inputs). The other complete shards (outside
        the plan, or made from other inputs) are moved aside to `superseded/`, so no reader
        picks them up and a failed attempt can put them back (`discard_attempt`); a shard
        there that the plan gives again (the listing changed back) is put back and reused."""
        complete, aside = self.complete_shards(), self._shards_in(self.file(SUPERSEDED))
        reusable = set()
        for index in sorted(complete | aside):
            want = digests.get(index)
            if want is not None and index in complete and self.shard_inputs(index) == want:
                reusable.add(index)
                continue
            name = self.shard_name(index)
            back = want is not None and index in aside
            back = back and self.shard_inputs(index, SUPERSEDED) == want
            if back:
                self.fs.mv(self.file(f"{SUPERSEDED}/{name}"), self.file(f".tmp-back-{name}"))
            if index in complete:
                self.fs.makedirs(self.file(SUPERSEDED), exist_ok=True)
                self.fs.mv(self.file(name), self.file(f"{SUPERSEDED}/{name}"))
                if not back:
                    self.moved_aside.add(index)
            if back:
                self.fs.mv(self.file(f".tmp-back-{name}"), self.file(name))
                reusable.add(index)
        return reusable

    def discard_attempt(self) -> None:
        """Undo this attempt's shards (a stage whose inputs all failed keeps nothing of its
        own): delete the shards it wrote and put back those it moved aside. Shards of
        earlier runs are never deleted by a failure."""
        for index in sorted(self.written):
            self.fs.rm(self.file(self.shard_name(index)))
        for index in sorted(self.moved_aside):
            name = self.shard_name(index)
            self.fs.mv(self.file(f"{SUPERSEDED}/{name}"), self.file(name))
        self.written.clear()
        self.moved_aside.clear()

    def shard_names(self) -> list[str]:
        return [self.shard_name(i) for i in sorted(self.complete_shards())]

    def error_rows(self, keys: list[str]) -> pa.Table:
        """The rows of every shard whose `error` is set, as `keys` + reason (a stage's error
        table); an empty table (string columns) when there is none."""
        parts = []
        for name in self.shard_names():
            table = self.read_table(name, columns=[*keys, "error"])
            bad = table.filter(pc.is_valid(table.column("error")))
            parts.append(bad.rename_columns([*keys, "reason"]))
        if parts:
            return pa.concat_tables(parts)
        return pa.table({k: pa.array([], pa.string()) for k in [*keys, "reason"]})

    def finish(
        self, counts: dict[str, int], errors: pa.Table, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write the error table and then the manifest, which marks the stage complete; the
        shards moved aside are deleted then."""
        self.write_table(ERRORS, errors)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "stage": self.stage,
            "config": self.read_json(CONFIG)["resolved"],
            "counts": counts,
            "shards": self.shard_names(),
            "errors": {"file": ERRORS, "count": errors.num_rows, "first": _first(errors, 20)},
            **(extra or {}),
        }
        self.write_json(MANIFEST, manifest)
        if self.fs.exists(self.file(SUPERSEDED)):
            self.fs.rm(self.file(SUPERSEDED), recursive=True)
        return manifest

    def manifest(self) -> dict[str, Any]:
        """The manifest of a complete stage; an error naming the stage if it is not."""
        if not self.exists(MANIFEST):
            raise ArtifactError(
                f"{self.path} has no {MANIFEST}: the '{self.stage}' stage has not completed; "
                f"run `u2seg {self.stage}` first"
            )
        data: dict[str, Any] = self.read_json(MANIFEST)
        return data


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file by local path or fsspec URL (also inside Ray tasks, given a shard's
    URL from `StageDir.fs.unstrip_protocol`)."""
    with fsspec.open(url, "rb") as fh:
        return pq.read_table(fh, columns=columns)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of a uint8 (H, W) or (H, W, 3) array (label maps, panoptic ids)."""
    sink = io.BytesIO()
    Image.fromarray(array).save(sink, format="PNG")
    return sink.getvalue()


def _first(table: pa.Table, n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = table.slice(0, n).to_pylist()
    return rows


class ShardWriter:
    """Collects result rows by shard and writes each shard once all its rows have arrived.

    `expected`: rows per shard index. Rows carry a `shard` column and an `order` column
    (their position in the plan); a shard's rows are written sorted by `order`, so the file
    does not depend on the order results arrived in, and both columns are dropped.
    `digests`: shard index -> `inputs_digest` of its inputs, stored in the file. Only the
    shards with rows in flight are held.
    """

    def __init__(self, stage: StageDir, expected: dict[int, int], digests: dict[int, str]) -> None:
        self.stage = stage
        self.expected = dict(expected)
        self.digests = digests
        self.pending: dict[int, list[pa.Table]] = {}
        self.received: dict[int, int] = {}

    def add(self, table: pa.Table) -> int:
        """Take a batch of rows; returns how many shards it completed."""
        shards = table.column("shard").to_numpy()
        written = 0
        for shard in sorted(set(shards.tolist())):
            part = table.filter(pa.array(shards == shard))
            self.pending.setdefault(shard, []).append(part)
            self.received[shard] = self.received.get(shard, 0) + part.num_rows
            if self.received[shard] == self.expected[shard]:
                rows = pa.concat_tables(self.pending.pop(shard)).sort_by("order")
                self.stage.write_table(
                    StageDir.shard_name(shard),
                    rows.drop_columns(["shard", "order"]),
                    self.digests[shard],
                )
                written += 1
        return written

    @property
    def incomplete(self) -> list[int]:
        return sorted(s for s, n in self.expected.items() if self.received.get(s, 0) != n)


def inputs_digest(rows: Iterable[Iterable[Any]]) -> str:
    """A digest of what a shard is made from: its input rows (e.g. image id and file name)
    in order. A shard is reused on resume only if its digest is unchanged."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(list(row), separators=(",", ":")).encode() + b"\n")
    return digest.hexdigest()[:32]
