"""Stage `maskcut` from masks made elsewhere: `maskcut.source`, a COCO instances JSON, in
place of the cut (`u2seg import-masks PATH`).

The stage writes what MaskCut writes (the same shards and columns, `instances.json`, the
manifest, the config guard and resume), so embed, cluster, panoptic and training run on the
imported masks unchanged. Its photos are the listing of `data.source` / `data.root`; the
file's images are matched to them by `file_name` (relative to `data.root`, or absolute
under it), which is also the match by id when the listing is the same COCO file.

The file is streamed twice (ijson): its `images`, then its `annotations`, which the driver
sorts into the decoding tasks they belong to and puts into Ray's object store every `CHUNK`
rows, so it holds one chunk at a time whatever the file's size (plus the listing and an
id -> photo map, one entry per image), and the annotations may come in any order. Ray then
runs at most `TASKS` tasks, each of whole shards, that check and encode their masks
(u2seg.data.mask_import) with the photos' sizes read from their headers; each shard is
written as its task returns. (Not a Ray Data groupby: its all-to-all shuffle ran the
import at a fifth of this speed: docs/benchmarks.md.) Each shard row
also keeps its rejected annotations (`rejected`: JSON [[id, reason], ...]). Photos without
masks become rows with an `error` (not in the file, listed without annotations, or all of
theirs rejected); annotations whose photo is not in the listing are counted by image. The
errors table lists every one of them, and the manifest counts them by reason.

A shard is reused on a re-run while its images and the file (size and modification time or
ETag) are unchanged; a killed import re-reads the file but decodes only missing shards.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import ijson
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import url_to_fs

from u2seg.artifacts import ShardWriter, StageDir, inputs_digest
from u2seg.config import PipelineConfig, depends_on, to_dict
from u2seg.data.images import ImageError, SourceError, image_size, list_images, listed_name
from u2seg.data.mask_import import pseudo_masks
from u2seg.runtime import ray_session
from u2seg.stages._image_loop import StageFailed, drain, plan_shards, shard_digests

STAGE = "maskcut"
#: Annotations held by the driver while the file streams past, before they go to Ray's
#: object store.
CHUNK = 20_000
#: At most this many decoding tasks, each of whole shards.
TASKS = 64
#: The value of the shards' `refine` column: the masks were not cut and refined here.
IMPORTED = "imported"
_ROWS = pa.schema(
    [
        ("shard", pa.int64()),
        ("order", pa.int64()),
        ("seq", pa.int64()),  # an annotation's place in the file (-1: an image row)
        ("annotation", pa.string()),  # JSON; null on an image row
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("path", pa.string()),
        ("error", pa.string()),  # the listing's refusal, "" when none
        ("file_width", pa.int64()),  # the size the mask file gives, -1 when none
        ("file_height", pa.int64()),
        ("in_file", pa.bool_()),
    ]
)
ERROR_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("annotation_id", pa.string()),
        ("reason", pa.string()),
    ]
)


def source_identity(source: str) -> str:
    """What says the mask file is unchanged: its size and its modification time or ETag."""
    fs, path = url_to_fs(source)
    if not fs.exists(path):
        raise SourceError(f"maskcut.source not found: {source}")
    info = fs.info(path)
    stamp = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified") if k in info), "")
    return f"{info.get('size')}:{stamp}"


@dataclass
class Matched:
    """The file's images matched to the listing (`pos_of`: file image id -> listing row)."""

    pos_of: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)  # listing row -> (w, h)
    unmatched: dict[int, str] = field(default_factory=dict)  # file image id -> its file_name
    repeated: dict[int, str] = field(default_factory=dict)  # a photo listed again: id -> why
    file_images: int = 0


def _size(entry: dict[str, Any]) -> tuple[int, int] | None:
    width, height = entry.get("width"), entry.get("height")
    if isinstance(width, (int, float)) and isinstance(height, (int, float)):
        return int(width), int(height)
    return None


def match_images(source: str, refs: pa.Table, root: str) -> Matched:
    """Stream the file's `images` and match each to a photo of the listing by file name."""
    names = refs.column("file_name").to_pylist()
    usable = pc.equal(refs.column("error"), "").to_pylist()
    row_of = {n: k for k, (n, ok) in enumerate(zip(names, usable, strict=True)) if ok}
    out = Matched()
    taken: dict[int, int] = {}  # listing row -> the file's image id that took it
    with fsspec.open(source, "rb") as fh:
        try:
            for k, entry in enumerate(ijson.items(fh, "images.item", use_float=True)):
                if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
                    raise SourceError(
                        f"{source}: images[{k}] needs an 'id' and a 'file_name': {entry!r:.80}"
                    )
                if not isinstance(entry["id"], int) or isinstance(entry["id"], bool):
                    raise SourceError(f"{source}: images[{k}] has a non-integer id: {entry!r:.80}")
                image_id, name = entry["id"], listed_name(root, str(entry["file_name"]))[0]
                if image_id in out.pos_of or image_id in out.unmatched:
                    raise SourceError(f"{source}: image id {image_id} is used twice")
                out.file_images += 1
                row = row_of.get(name)
                if row is None:
                    out.unmatched[image_id] = name
                elif row in taken:
                    out.unmatched[image_id] = name
                    out.repeated[image_id] = f"listed before, as image {taken[row]}"
                else:
                    taken[row] = image_id
                    out.pos_of[image_id] = row
                    if (size := _size(entry)) is not None:
                        out.sizes[row] = size
        except ijson.JSONError as exc:
            raise SourceError(f"{source} is not a COCO JSON: {exc}") from None
    if not out.file_images:
        raise SourceError(f"{source} lists no images (a COCO instances JSON is expected)")
    return out


@dataclass
class Stray:
    """Annotations no photo of the listing takes, counted by the file's image id."""

    missing_photo: Counter[int] = field(default_factory=Counter)
    unknown_image: Counter[Any] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    total: int = 0


def stream_annotations(
    source: str, matched: Matched, bucket_of: dict[int, int], shard_size: int, stray: Stray
) -> Iterator[tuple[int, pa.Table]]:
    """The file's annotations of photos in the shards of `bucket_of` (shard -> decoding
    task), as (task, rows) pieces: at most `CHUNK` rows are held, then every task's rows
    go out. The annotations of the other photos are counted in `stray`."""
    held: dict[int, dict[str, list[Any]]] = {}
    count = 0

    def pieces() -> Iterator[tuple[int, pa.Table]]:
        for bucket, columns in sorted(held.items()):
            size = len(columns["seq"])
            nulls = {n: pa.nulls(size, _ROWS.field(n).type) for n in _ROWS.names[4:]}
            yield bucket, pa.table({**columns, **nulls}, schema=_ROWS)
        held.clear()

    with fsspec.open(source, "rb") as fh:
        try:
            for seq, ann in enumerate(ijson.items(fh, "annotations.item", use_float=True)):
                stray.total += 1
                image_id = ann.get("image_id") if isinstance(ann, dict) else None
                if not isinstance(image_id, int) or isinstance(image_id, bool):
                    stray.malformed["an annotation without an integer image_id"] += 1
                    continue
                row = matched.pos_of.get(image_id)
                if row is None:
                    if image_id in matched.unmatched:
                        stray.missing_photo[image_id] += 1
                    else:
                        stray.unknown_image[image_id] += 1
                    continue
                bucket = bucket_of.get(row // shard_size)
                if bucket is None:  # a shard done by an earlier run
                    continue
                columns = held.setdefault(
                    bucket, {"shard": [], "order": [], "seq": [], "annotation": []}
                )
                columns["shard"].append(row // shard_size)
                columns["order"].append(row)
                columns["seq"].append(seq)
                columns["annotation"].append(json.dumps(ann, separators=(",", ":")))
                count += 1
                if count % CHUNK == 0:
                    yield from pieces()
        except ijson.JSONError as exc:
            raise SourceError(f"{source}: its annotations are not valid JSON: {exc}") from None
    yield from pieces()


def image_rows(todo: pa.Table, matched: Matched) -> pa.Table:
    """The rows that carry each photo to its shard's group."""
    order = todo.column("order").to_pylist()
    sizes = [matched.sizes.get(k, (-1, -1)) for k in order]
    in_file = set(matched.pos_of.values())
    n = todo.num_rows
    return pa.table(
        {
            "shard": todo.column("shard"),
            "order": todo.column("order"),
            "seq": pa.array(np.full(n, -1, dtype=np.int64)),
            "annotation": pa.nulls(n, pa.string()),
            "image_id": todo.column("image_id"),
            "file_name": todo.column("file_name"),
            "path": todo.column("path"),
            "error": todo.column("error"),
            "file_width": pa.array([w for w, _ in sizes], pa.int64()),
            "file_height": pa.array([h for _, h in sizes], pa.int64()),
            "in_file": pa.array([k in in_file for k in order]),
        },
        schema=_ROWS,
    )


def _one_photo(image: dict[str, Any], anns: list[Any], max_pixels: int) -> tuple[Any, ...]:
    """(error, width, height, masks JSON, rejected JSON) of one photo."""
    if image["error"]:
        return image["error"], 0, 0, "[]", "[]"
    try:
        width, height = image_size(image["path"], max_pixels)
    except ImageError as exc:
        return str(exc), 0, 0, "[]", "[]"
    if not image["in_file"]:
        return "no masks: not among the mask file's images", width, height, "[]", "[]"
    said = image["file_width"], image["file_height"]
    if said != (-1, -1) and said != (width, height):
        reason = f"the mask file gives {said[0]}x{said[1]}, the photo is {width}x{height}"
        return reason, width, height, "[]", "[]"
    masks, rejected = pseudo_masks(anns, height, width)
    error = ""
    if not masks:
        error = (
            f"no masks: all {len(anns)} of the mask file's rejected"
            if anns
            else "no masks: the mask file lists no annotation for it"
        )
    return error, width, height, json.dumps(masks), json.dumps(rejected)


def import_group(group: pa.Table, max_pixels: int) -> dict[str, np.ndarray]:
    """The image rows of some photos and all their annotation rows -> their result rows
    (the columns of `to_shard_rows`, numpy)."""
    is_image = pc.equal(group.column("seq"), -1)
    images = group.filter(is_image).sort_by("order").to_pylist()
    anns: dict[int, list[Any]] = {}
    for row in group.filter(pc.invert(is_image)).sort_by("seq").to_pylist():
        anns.setdefault(row["order"], []).append(json.loads(row["annotation"]))
    out = [_one_photo(image, anns.get(image["order"], []), max_pixels) for image in images]
    errors, widths, heights, masks, rejected = zip(*out, strict=True) if out else ([],) * 5

    def column(key: str, dtype: Any) -> np.ndarray:
        return np.asarray([r[key] for r in images], dtype=dtype)

    return {
        "image_id": column("image_id", np.int64),
        "file_name": column("file_name", object),
        "path": column("path", object),
        "shard": column("shard", np.int64),
        "order": column("order", np.int64),
        "width": np.asarray(widths, dtype=np.int64),
        "height": np.asarray(heights, dtype=np.int64),
        "error": np.asarray(errors, dtype=object),
        "annotations": np.asarray(masks, dtype=object),
        "converged": np.asarray(
            [json.dumps([True] * len(json.loads(m))) for m in masks], dtype=object
        ),
        "refine": np.full(len(images), IMPORTED, dtype=object),
        "rejected": np.asarray(rejected, dtype=object),
    }


def to_shard_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    """MaskCut's shard columns, and the rejected annotations of each photo."""
    from u2seg.stages.maskcut import to_shard_rows as cut_rows

    rejected = [str(r) for r in batch["rejected"]]
    return cut_rows(batch).append_column("rejected", pa.array(rejected, pa.string()))


def reason_class(reason: str) -> str:
    """A reason without its numbers, sizes and names: what the manifest counts by."""
    return re.sub(r"\d+(\.\d+)?", "N", re.sub(r"\[[^\]]*\]", "[...]", reason))


def error_table(stage: StageDir, matched: Matched, stray: Stray) -> tuple[pa.Table, int, int]:
    """Every photo without masks, every rejected annotation (by id) and the annotations no
    photo takes (counted by the file's image id), with the reason; and how many photos and
    annotations of the shards are in it."""
    parts: list[tuple[Any, ...]] = []
    failed = rejected = 0
    for name in stage.shard_names():
        table = stage.read_table(name, columns=["image_id", "file_name", "error", "rejected"])
        for row in table.to_pylist():
            if row["error"] is not None:
                failed += 1
                parts.append((row["image_id"], row["file_name"], None, row["error"]))
            for ann_id, reason in json.loads(row["rejected"] or "[]"):
                rejected += 1
                ann = None if ann_id is None else str(ann_id)
                parts.append((row["image_id"], row["file_name"], ann, reason))
    for image_id, count in sorted(stray.missing_photo.items()):
        why = matched.repeated.get(image_id, "not among data.source's photos")
        reason = f"{count} masks of the file's image {image_id}: its photo is {why}"
        parts.append((None, matched.unmatched[image_id], None, reason))
    for image_id, count in sorted(stray.unknown_image.items()):
        reason = f"{count} masks of image_id {image_id}, which the file's images lack"
        parts.append((None, "", None, reason))
    for reason, count in sorted(stray.malformed.items()):
        parts.append((None, "", None, f"{count} x {reason}"))
    columns = [[p[k] for p in parts] for k in range(len(ERROR_SCHEMA))]
    table = pa.table(dict(zip(ERROR_SCHEMA.names, columns, strict=True)), schema=ERROR_SCHEMA)
    return table, failed, rejected


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """`maskcut/` from the masks of `cfg.maskcut.source`; returns the stage manifest."""
    source = cfg.maskcut.source
    identity = source_identity(source)
    listing = list_images(cfg.data.source, cfg.data.root)
    refs = plan_shards(listing, cfg.data.shard_size)
    digests = {k: inputs_digest([[d, source, identity]]) for k, d in shard_digests(refs).items()}
    stage = StageDir(cfg.output_dir, STAGE)
    matched = match_images(source, refs, _listing_root(refs))
    if not matched.pos_of:
        example = next(iter(matched.unmatched.values()))
        raise SourceError(
            f"{source}: none of its {matched.file_images} images is among data.source's "
            f"photos (file names are matched: the file's {example!r}, the listing's "
            f"{refs.column('file_name')[0].as_py()!r}); set data.root to the folder its "
            "file_name values are relative to"
        )
    stage.start(to_dict(cfg), depends_on(cfg, ("data", "maskcut")))
    shards = refs.column("shard").to_numpy()
    done = stage.reusable_shards(digests)
    todo = refs.filter(pa.array(~np.isin(shards, list(done))))
    stray = Stray()
    timing: dict[str, float] = {}
    try:
        with ray_session(cfg.ray):
            timing = _decode(cfg, stage, todo, matched, digests, stray)
    except StageFailed:
        stage.discard_attempt()
        raise
    from u2seg.stages.maskcut import write_instances

    _, n_masks = write_instances(stage)
    errors, failed, rejected = error_table(stage, matched, stray)
    reasons = Counter(reason_class(r) for r in errors.column("reason").to_pylist())
    counts = {
        "images": refs.num_rows,
        "ok": refs.num_rows - failed,
        "errors": failed,
        "shards": int(shards.max()) + 1,
        "resumed_shards": len(done),
        "masks": n_masks,
        "unconverged_masks": 0,
        "file_images": matched.file_images,
        "file_annotations": stray.total,
        "rejected_masks": rejected,
        "masks_without_photo": sum(stray.missing_photo.values())
        + sum(stray.unknown_image.values()),
    }
    extra = {
        "timing": timing,
        "file": "instances.json",
        "source": source,
        "refinement": {IMPORTED: refs.num_rows - failed},
        "reasons": dict(reasons.most_common()),
    }
    return stage.finish(counts, errors, extra)


def decode_task(max_pixels: int, images: pa.Table, *pieces: pa.Table) -> dict[str, np.ndarray]:
    """A Ray task: the photos of some whole shards and every annotation of theirs -> their
    result rows."""
    return import_group(pa.concat_tables([images, *pieces]), max_pixels)


def _decode(
    cfg: PipelineConfig,
    stage: StageDir,
    todo: pa.Table,
    matched: Matched,
    digests: dict[int, str],
    stray: Stray,
) -> dict[str, float]:
    """Stream the annotations into Ray's object store, then decode the shards of `todo` in
    at most `TASKS` tasks of whole shards (fewer, larger pieces while the file streams),
    writing each shard as its task returns; returns the timing."""
    import ray

    todo_shards = np.unique(todo.column("shard").to_numpy()).tolist()
    tasks = min(len(todo_shards), TASKS)
    bucket_of = {shard: k * tasks // len(todo_shards) for k, shard in enumerate(todo_shards)}
    pieces: dict[int, list[Any]] = {b: [] for b in range(tasks)}
    for bucket, piece in stream_annotations(
        cfg.maskcut.source, matched, bucket_of, cfg.data.shard_size, stray
    ):
        pieces[bucket].append(ray.put(piece))
    if not todo_shards:
        return {}
    rows = image_rows(todo, matched)
    row_bucket = pa.array([bucket_of[s] for s in todo.column("shard").to_pylist()])
    decode = ray.remote(decode_task).options(num_cpus=cfg.data.read_num_cpus)
    running = [
        decode.remote(cfg.data.max_pixels, rows.filter(pc.equal(row_bucket, b)), *pieces[b])
        for b in range(tasks)
    ]
    del pieces  # the tasks hold the pieces now: each is freed once its task is done

    def results() -> Iterator[dict[str, np.ndarray]]:
        waiting = list(running)
        running.clear()
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            yield ray.get(ready[0])

    shards, sizes = np.unique(todo.column("shard").to_numpy(), return_counts=True)
    writer = ShardWriter(stage, dict(zip(shards.tolist(), sizes.tolist(), strict=True)), digests)
    # No early stop: the file may cover only the later photos of the listing.
    return drain(results(), writer, to_shard_rows, todo.num_rows, "import masks", todo.num_rows + 1)


def _listing_root(refs: pa.Table) -> str:
    """The folder the listing's file names are relative to (from a path and its name)."""
    for path, name in zip(refs.column("path").to_pylist(), refs.column("file_name").to_pylist(),
                          strict=True):  # fmt: skip
        if path and path.endswith(f"/{name}"):
            return path[: -len(name) - 1]
    return ""
