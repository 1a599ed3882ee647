"""The features stage end to end on a local Ray: bad files, resume, config refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.helpers import save_photo, write_bad_files
from u2seg.artifacts import MANIFEST, ArtifactError, StageDir
from u2seg.cli import main
from u2seg.config import PipelineConfig, load_config
from u2seg.models.vit import input_size
from u2seg.stages._image_loop import StageFailed
from u2seg.stages.features import run

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _config(images: Path, out: Path, cache: Path, *extra: str) -> PipelineConfig:
    return load_config(
        overrides=[
            f"data.source={images}",
            "data.shard_size=3",
            "data.max_pixels=1000000",
            "backbone.name=dinov2_vits14",
            "backbone.weights=packaged",
            f"backbone.cache_dir={cache}",
            "features.image_size=56",
            "features.batch_size=2",
            f"output={out}",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("images")
    bad = write_bad_files(folder / "bad")
    for i in range(6):
        save_photo(folder / f"img{i}.jpg", (40 + 8 * i, 36), seed=i)
    return folder, bad


def _photos(tmp_path: Path, count: int) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(count):
        save_photo(folder / f"img{i}.jpg", (48, 40), seed=i)
    return folder


def _shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / "features").glob("part-*.parquet")}


def _rows(stage: StageDir) -> dict[int, dict]:
    rows = {}
    for name in stage.shard_names():
        for row in stage.read_table(name).to_pylist():
            rows[row["image_id"]] = row
    return rows


def test_bad_files_are_recorded_and_nothing_else_lost(
    local_ray: None, images: tuple[Path, dict[str, str]], tmp_path: Path, weights_cache: Path
) -> None:
    folder, bad = images
    manifest = run(_config(folder, tmp_path / "run", weights_cache))
    assert manifest["counts"]["images"] == 10
    assert manifest["counts"]["ok"] == 6
    assert manifest["counts"]["errors"] == 4
    assert manifest["counts"]["shards"] == 4
    timing = manifest["timing"]  # start-up (to the first result) apart from the steady rate
    assert 0 < timing["startup_s"] < timing["seconds"]
    assert timing["steady_images_per_s"] > 0 and timing["images_per_s"] > 0
    reasons = {r["file_name"]: r["reason"] for r in manifest["errors"]["first"]}
    assert set(reasons) == {f"bad/{name}" for name in bad}
    for name, reason in bad.items():
        assert reasons[f"bad/{name}"].startswith(reason)
    rows = _rows(StageDir(str(tmp_path / "run"), "features"))
    assert len(rows) == 10
    good = [r for r in rows.values() if r["error"] is None]
    assert len(good) == 6
    for row in good:
        cls = np.asarray(row["cls"])
        assert cls.shape == (384,) and np.isfinite(cls).all() and np.abs(cls).sum() > 0
        assert row["width"] >= 40 and row["height"] == 36
    # Different images give different vectors.
    assert not np.allclose(good[0]["patch_mean"], good[1]["patch_mean"])


def test_resume_after_kill_writes_only_missing_shards(
    local_ray: None, images: tuple[Path, dict[str, str]], tmp_path: Path, weights_cache: Path
) -> None:
    folder, _ = images
    out = tmp_path / "run"
    cfg = _config(folder, out, weights_cache)
    run(cfg)
    stage = StageDir(str(out), "features")
    clean = _rows(stage)
    # A job killed half way: no manifest, one shard missing, a temporary file left over.
    (out / "features" / MANIFEST).unlink()
    (out / "features" / "part-00002.parquet").unlink()
    (out / "features" / ".tmp-dead-part-00002.parquet").write_bytes(b"partial")
    mtime = (out / "features" / "part-00000.parquet").stat().st_mtime_ns
    manifest = run(cfg)
    assert manifest["counts"]["resumed_shards"] == 3
    assert (out / "features" / "part-00000.parquet").stat().st_mtime_ns == mtime
    resumed = _rows(stage)
    assert resumed.keys() == clean.keys()
    for image_id, row in clean.items():
        assert resumed[image_id]["error"] == row["error"]
        if row["cls"] is not None:
            np.testing.assert_allclose(resumed[image_id]["cls"], row["cls"], rtol=1e-5, atol=1e-5)


def test_other_config_is_refused(
    images: tuple[Path, dict[str, str]], tmp_path: Path, weights_cache: Path
) -> None:
    folder, _ = images
    out = tmp_path / "run"
    stage = StageDir(str(out), "features")
    stage.start({}, {"data": {}, "backbone": {}, "features": {}})
    stage.write_table(stage.shard_name(0), pa.table({"image_id": [1]}))
    with pytest.raises(ArtifactError, match="another config"):
        run(_config(folder, out, weights_cache, "features.image_size=112"))


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ("data.source={missing}", "not found|does not exist|no such"),
        ("features.image_size=5", "features.image_size=5 is smaller than a patch"),
        ("backbone.name=resnet50", "resnet50"),
        ("backbone.weights={missing}.pth", "does not exist"),
        ("features.batch_size=0", "features.batch_size=0: must be >= 1"),
    ],
    ids=["source", "image-size", "backbone", "weights", "batch-size"],
)
def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_run(
    local_ray: None,
    images: tuple[Path, dict[str, str]],
    tmp_path: Path,
    weights_cache: Path,
    mistake: str,
    message: str,
) -> None:
    folder, _ = images
    out = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(_config(folder, out, weights_cache, mistake.format(missing=tmp_path / "nope")))
    assert not (out / "features" / "config.json").exists()
    assert run(_config(folder, out, weights_cache))["counts"]["images"] == 10


def test_input_size_rounds_down_to_patch_grid() -> None:
    assert input_size(480, "dinov2_vits14") == 476
    assert input_size(480, "dino_vitb8") == 480
    with pytest.raises(ValueError, match="smaller than a patch"):
        input_size(10, "dinov2_vits14")
    with pytest.raises(ValueError, match="dino_vitb8"):
        input_size(480, "vit_huge")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), r"all 10 images failed, 7 x too many pixels \(e\.g\. too many pixels: 2000x2000"),
        (("data.fail_after=2",), r"the first \d+ inputs all failed, \d+ x too many pixels"),
    ],
    ids=["every-image", "leading-images"],
)
def test_a_stage_whose_images_all_fail_stops_and_keeps_nothing(
    local_ray: None,
    images: tuple[Path, dict[str, str]],
    tmp_path: Path,
    weights_cache: Path,
    extra: tuple[str, ...],
    message: str,
) -> None:
    folder, _ = images
    out = tmp_path / "run"
    with pytest.raises(StageFailed, match=message):
        run(_config(folder, out, weights_cache, "data.max_pixels=1", *extra))
    assert not list((out / "features").glob("part-*.parquet"))
    assert not (out / "features" / MANIFEST).exists()
    # The command says why and exits non-zero.
    overrides = [f"data.source={folder}", "data.max_pixels=1", f"output={out}"]
    assert main(["features", "backbone.weights=packaged", "backbone.name=dinov2_vits14",
                 f"backbone.cache_dir={weights_cache}", "features.image_size=56",
                 *overrides]) == 2  # fmt: skip
    # The corrected run is not refused as "another config".
    assert run(_config(folder, out, weights_cache))["counts"]["ok"] == 6


def test_resume_redoes_the_shards_whose_images_changed(
    local_ray: None, tmp_path: Path, weights_cache: Path
) -> None:
    folder = _photos(tmp_path, 4)
    out = tmp_path / "run"
    assert run(_config(folder, out, weights_cache, "data.shard_size=2"))["counts"]["shards"] == 2
    stage = StageDir(str(out), "features")
    before = _shard_files(out)
    # A new photo sorts first: every shard of the listing now holds other images.
    save_photo(folder / "aaa.jpg", (48, 40), seed=9)
    manifest = run(_config(folder, out, weights_cache, "data.shard_size=2"))
    assert manifest["counts"]["resumed_shards"] == 0
    names = [r["file_name"] for n in stage.shard_names() for r in stage.read_table(n).to_pylist()]
    assert names == ["aaa.jpg", "img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg"]
    # Removing it again gives back the first listing: the rewritten shards match the first.
    (folder / "aaa.jpg").unlink()
    manifest = run(_config(folder, out, weights_cache, "data.shard_size=2"))
    assert manifest["counts"]["shards"] == 2
    after = _shard_files(out)
    assert after.keys() == before.keys()  # the third shard of the longer listing is gone
    # Unchanged listing, nothing to redo.
    assert (
        run(_config(folder, out, weights_cache, "data.shard_size=2"))["counts"]["resumed_shards"]
        == 2
    )


def test_actors_build_the_backbone_from_the_drivers_weights(
    local_ray: None, tmp_path: Path
) -> None:
    """The weights reach the actors through Ray's object store: an actor on a node that has
    neither the checkpoint file nor a cache (here the file is gone once the driver read
    it) builds the same backbone."""
    import ray
    import ray.data
    import torch

    from u2seg.config import BackboneConfig, to_dict
    from u2seg.models import vit
    from u2seg.workers.vit import FeatureExtractor

    torch.manual_seed(0)
    path = tmp_path / "vits16.pth"
    torch.save(vit._create_model("dino_vits16").state_dict(), path)
    backbone = to_dict(BackboneConfig(name="dino_vits16", weights=str(path), device="cpu"))
    rng = np.random.default_rng(0)
    batch = {
        "image_id": np.arange(2),
        "error": np.array(["", ""], dtype=object),
        "image": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
    }
    expected = FeatureExtractor(backbone, 1)(dict(batch))["cls"]
    state = ray.put(vit.backbone_state("dino_vits16", str(path)))
    path.unlink()
    ds = ray.data.from_items([{k: v[i] for k, v in batch.items()} for i in range(2)])
    ds = ds.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"backbone": backbone, "threads": 1, "state": state},
        batch_size=2,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    got = np.concatenate([b["cls"] for b in ds.iter_batches(batch_size=None)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(vit.WeightsUnavailableError, match="vits16.pth"):  # really gone
        vit.backbone_state("dino_vits16", str(path))


def test_a_failed_attempt_keeps_the_shards_of_earlier_runs(
    local_ray: None, tmp_path: Path, weights_cache: Path
) -> None:
    # A complete run of 8 photos (4 shards), then 4 unreadable photos listed after them (new
    # shards), then before them (every shard now holds other images): each attempt's first
    # images all fail and it stops; the earlier shards are all still there, byte for byte.
    folder = _photos(tmp_path, 8)
    out = tmp_path / "run"
    assert run(_config(folder, out, weights_cache, "data.shard_size=2"))["counts"]["ok"] == 8
    before = _shard_files(out)
    assert len(before) == 4
    for prefix in ("zz", "aa"):
        for i in range(4):
            (folder / f"{prefix}_bad{i}.jpg").write_bytes(b"not a photo")
        with pytest.raises(StageFailed, match="the first 2 inputs all failed"):
            run(_config(folder, out, weights_cache, "data.shard_size=2", "data.fail_after=2"))
        assert _shard_files(out) == before
        for bad in folder.glob(f"{prefix}_bad*.jpg"):
            bad.unlink()
    # The bad photos removed again, the run is complete as it was, nothing redone.
    manifest = run(_config(folder, out, weights_cache, "data.shard_size=2"))
    assert manifest["counts"]["resumed_shards"] == 4 and manifest["counts"]["ok"] == 8
