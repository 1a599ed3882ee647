"""Candidate-pool discovery on hand-made patch grids: several objects of one kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from u2seg.ops import discovery

H = W = 24
SQUARES = [(slice(3, 9), slice(3, 9)), (slice(3, 9), slice(14, 20)), (slice(15, 21), slice(8, 14))]


def three_of_a_kind(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """An (H, W, 16) grid: three separate squares sharing one feature (three instances of a
    kind) on a two-tone background (a sky above, a floor below), with noise; a CLS
    attention that is higher on the squares; and the squares' masks."""
    rng = np.random.default_rng(seed)
    kinds = rng.normal(size=(3, 16))
    features = np.empty((H, W, 16))
    features[: H // 2] = kinds[0]
    features[H // 2 :] = kinds[1]
    truth = []
    for rows, cols in SQUARES:
        features[rows, cols] = kinds[2]
        mask = np.zeros((H, W), dtype=bool)
        mask[rows, cols] = True
        truth.append(mask)
    features += 0.3 * rng.normal(size=features.shape)
    attention = np.full((H, W), 1.0)
    for mask in truth:
        attention[mask] = 20.0  # DINO attention is peaked on objects
    return features.astype(np.float32), attention / attention.sum(), truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def test_discover_finds_each_instance_first_and_keeps_the_rules() -> None:
    features, attention, truth = three_of_a_kind()
    options = discovery.PoolOptions(n_masks=6, depth=4, max_k=5, nms_iou=0.4)
    maps = [t(features)[None], t(features[..., ::-1])[None]]
    (found,) = discovery.discover(maps, t(attention)[None], options)
    assert 1 <= len(found) <= 6
    masks = [m for m, _ in found]
    scores = [s for _, s in found]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    # The three instances are the three best masks, each on its own.
    for mask in masks[:3]:
        assert max(iou(mask, t) for t in truth) > 0.9
    assert {max(range(3), key=lambda k: iou(m, truth[k])) for m in masks[:3]} == {0, 1, 2}
    # Pairwise IoU under the NMS threshold.
    for i in range(len(masks)):
        for j in range(i):
            assert iou(masks[i], masks[j]) < 0.4


def test_bisection_separates_the_kinds_and_kmeans_the_instances() -> None:
    features, _, truth = three_of_a_kind(1)
    (tree,) = discovery.bisection_candidates([t(features)], depth=3, min_patches=3)
    assert tree and all(m.sum() >= 3 and m.shape == (H, W) for m in tree)
    assert all(max(iou(m, t) for m in tree) > 0.8 for t in truth)
    clusters = discovery.kmeans_candidates(t(features), max_k=4, min_patches=3)
    # k = 3 puts the squares in one cluster; its connected components are the instances.
    assert all(max(iou(m, t) for m in clusters) > 0.9 for t in truth)
    # A 6 x 6 grid has 36 patches, fewer than faiss's 39 per centroid for k = 2: no k-means.
    assert discovery.kmeans_candidates(t(features[:6, :6]), max_k=4, min_patches=1) == []


def test_score_ranks_an_object_over_background_and_zeroes_no_contrast() -> None:
    features, attention, truth = three_of_a_kind(2)
    sky = np.zeros((H, W), dtype=bool)
    sky[: H // 2] = True
    sky &= ~(truth[0] | truth[1])
    noise = np.zeros((H, W), dtype=bool)
    noise[::2, ::2] = True  # a scatter of patches of every kind: not alike inside
    masks = np.stack([truth[0], sky, noise])
    scores = discovery.score(t(masks), t(features), t(attention)).numpy()
    assert scores[0] > scores[1] > 0
    assert scores[2] < 0.01 * scores[0]


def test_bad_inputs_are_refused() -> None:
    features, attention, _ = three_of_a_kind()
    with pytest.raises(ValueError, match="grid"):
        discovery.discover([t(features)[None]], t(attention[:-1])[None])
    with pytest.raises(ValueError, match="at least one"):
        discovery.discover([], t(attention)[None])
    with pytest.raises(ValueError, match="nms_iou"):
        discovery.PoolOptions(nms_iou=0.0)
    with pytest.raises(ValueError, match="invalid"):
        discovery.PoolOptions(max_k=1)


def test_a_batch_finds_what_each_image_finds_alone() -> None:
    # The bisections of a level are solved in padded batches across images and maps. The
    # padding leaves each region's eigenproblem as it is, but float rounding differs with the
    # batch's shape and with the CPU's kernels (an AVX2-only MKL path splits otherwise than
    # AVX-512). A region with a clear cut is cut the same; a region with no structure left
    # (noise of one kind) has no preferred cut, any rounding may pick another, and its
    # pieces are low-ranked candidates. So the objects and the clear background regions
    # (every mask scored at least a fifth of the best) are the same masks at the same ranks.
    options = discovery.PoolOptions(n_masks=8, depth=4, max_k=5)
    for seeds in ((3, 4), (21, 28)):
        scenes = [three_of_a_kind(seed) for seed in seeds]
        features = t(np.stack([f for f, _, _ in scenes]))
        attention = t(np.stack([a for _, a, _ in scenes]))
        maps = [features, features.flip(-1).contiguous()]
        together = discovery.discover(maps, attention, options)
        for b, (_, _, truth) in enumerate(scenes):
            (alone,) = discovery.discover(
                [m[b : b + 1] for m in maps], attention[b : b + 1], options
            )
            assert len(alone) == len(together[b]) == options.n_masks
            clear = [k for k, (_, s) in enumerate(alone) if s >= 0.2 * alone[0][1]]
            assert len(clear) >= 3 and clear == list(range(len(clear)))
            for k in clear:
                (m, s), (n, u) = alone[k], together[b][k]
                assert np.array_equal(m, n) and s == pytest.approx(u, rel=1e-4)
            for instance in truth:  # each instance is one of the clear masks
                assert max(iou(alone[k][0], instance) for k in clear) > 0.9


def two_kinds(rng: np.random.Generator, n: int) -> torch.Tensor:
    """(n, 8) centred unit features of a region holding two kinds (every third row the
    other): a graph with one clear cut."""
    kinds = rng.normal(size=(2, 8))
    x = kinds[(np.arange(n) % 3 == 0).astype(int)] + 0.3 * rng.normal(size=(n, 8))
    return discovery._centred_unit(t(x))


def test_padded_eigen_solves_match_single_ones() -> None:
    rng = np.random.default_rng(5)
    # 40, 36, 31 and 30 share one padded solve; 12 is below 3/4 of 40 and solved apart.
    regions = [two_kinds(rng, n) for n in (40, 36, 31, 30, 12)]
    batched = discovery._fiedler_batch(regions)
    assert [len(v) for v in batched] == [40, 36, 31, 30, 12]
    for region, vector in zip(regions, batched, strict=True):
        (single,) = discovery._fiedler_batch([region])
        # Eigenvectors are defined up to sign; rounding differs with the padded shape.
        sign = torch.sign((single * vector).sum())
        assert torch.allclose(vector * sign, single, atol=1e-2 * single.abs().max().item())
        # The cut itself: the two kinds, whatever the batch.
        kind = torch.from_numpy(np.arange(len(region)) % 3 == 0)
        side = vector > vector.mean()
        assert torch.equal(side, kind) or torch.equal(side, ~kind)
