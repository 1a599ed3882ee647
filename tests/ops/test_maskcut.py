"""MaskCut core on hand-made feature grids whose correct cuts are known.

Features: one random orthonormal direction per label (background = label 0) plus Gaussian
noise, so that the 0/1 affinity at tau = 0.15 has noisy edges across objects, not blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from numpy.typing import NDArray
from scipy import ndimage

from u2seg.ops import maskcut as maskcut_ops
from u2seg.ops.maskcut import (
    EPS,
    bipartition,
    cosine_similarity,
    fiedler_vector,
    maskcut,
    maskcut_batch,
    maskcut_rounds,
    masks_of,
    nonfinite_images,
    seed_component,
)

DIM = 16


def grid_features(
    labels: NDArray[np.int_], noise: float = 0.15, seed: int = 0, common: float = 0.0
) -> NDArray[np.float32]:
    """(h, w, DIM) features: the direction of each patch's label plus noise, plus `common`
    times a direction shared by all patches (makes every cosine high)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    feats = basis[labels] + noise * rng.standard_normal((*labels.shape, DIM))
    return (feats + common * basis[-1]).astype(np.float32)


def labels_with(shape: tuple[int, int], *objects: tuple[slice, slice]) -> NDArray[np.int_]:
    """Label map: 0 background, object k (1-based) on the k-th (rows, cols) box."""
    labels = np.zeros(shape, dtype=int)
    for k, box in enumerate(objects, start=1):
        labels[box] = k
    return labels


def iou(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    return float((a & b).sum() / max(int((a | b).sum()), 1))


def fiedler_vector_dense(
    similarity: NDArray[np.floating], tau: float, covered: NDArray[np.bool_] | None = None
) -> tuple[NDArray[np.float64], float]:
    """The published solver: dense generalized eigh of (D - A, D), second-smallest pair."""
    affinity = np.where(np.asarray(similarity, dtype=np.float64) > tau, 1.0, EPS)
    if covered is not None:
        affinity[covered, :] = EPS
        affinity[:, covered] = EPS
    degree = np.diag(affinity.sum(axis=1))
    values, vectors = scipy.linalg.eigh(degree - affinity, degree, subset_by_index=[1, 1])
    return vectors[:, 0], float(values[0])


def maskcut_dense(features: NDArray[np.float32], n_masks: int, tau: float) -> list[NDArray]:
    """The published loop written as upstream does it: zero the features of painted patches,
    recompute the affinity, dense eigh, corner/seed rules, reject by IoU with the previous
    round's (possibly zeroed) mask or by area. The sign convention (largest |entry| positive)
    is the one the library documents; upstream leaves it to LAPACK."""
    h, w, d = features.shape
    feats = features.reshape(h * w, d).astype(np.float64)
    painting = np.zeros(h * w, dtype=bool)
    current = np.zeros((h, w), dtype=bool)
    out: list[NDArray] = []
    for i in range(n_masks):
        x = np.where(painting[:, None], 0.0, feats)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        v, _ = fiedler_vector_dense(x @ x.T, tau)
        v = (v * np.sign(v[np.abs(v).argmax()])).reshape(h, w)
        side = v > v.mean()
        corners = int(side[0, 0]) + int(side[0, -1]) + int(side[-1, 0]) + int(side[-1, -1])
        if corners >= 3 or not side.flat[np.abs(v).argmax()]:
            side, v = ~side, -v
        labels, _ = ndimage.label(side)
        mask = labels == labels.flat[v.argmax()]
        if i >= 1 and (iou(current, mask) > 0.5 or mask.sum() / mask.size <= 0.01):
            mask = np.zeros((h, w), dtype=bool)
        current = mask
        painting |= mask.reshape(-1)
        union = np.any(out, axis=0) if out else np.zeros((h, w), dtype=bool)
        if (mask & ~union).any():
            out.append(mask & ~union)
    return out


def smooth_field(shape: tuple[int, int], seed: int) -> NDArray[np.float32]:
    """(h, w, 8) low-frequency random features: regions without hand-placed edges."""
    rng = np.random.default_rng(seed)
    field = rng.standard_normal((*shape, 8))
    return ndimage.gaussian_filter(field, sigma=(3, 3, 0)).astype(np.float32)


ONE_OBJECT = labels_with((20, 20), (slice(6, 12), slice(5, 13)))
THREE_OBJECTS = labels_with(
    (30, 30),
    (slice(3, 11), slice(3, 13)),
    (slice(16, 26), slice(5, 12)),
    (slice(12, 22), slice(17, 27)),
)
# A 10 x 8 object and a 2 x 2 one (4 patches = 1% of the grid); low noise so both separate.
BIG_AND_TINY = labels_with((20, 20), (slice(4, 14), slice(4, 12)), (slice(15, 17), slice(15, 17)))


def best_object(mask: NDArray[np.bool_], labels: NDArray[np.int_]) -> tuple[int, float]:
    """The object label (>= 1) that `mask` overlaps best, and that IoU."""
    scores = [iou(mask, labels == k) for k in range(1, int(labels.max()) + 1)]
    return int(np.argmax(scores)) + 1, max(scores)


# --------------------------------------------------------------------------
# Published algorithm
# --------------------------------------------------------------------------


def test_one_object_on_background() -> None:
    masks = maskcut(grid_features(ONE_OBJECT), n_masks=1, tau=0.15)
    assert len(masks) == 1
    assert iou(masks[0], ONE_OBJECT == 1) > 0.95


def test_three_objects_each_found_once() -> None:
    masks = maskcut(grid_features(THREE_OBJECTS, seed=1), n_masks=3, tau=0.15)
    assert len(masks) == 3
    found = [best_object(m, THREE_OBJECTS) for m in masks]
    assert sorted(k for k, _ in found) == [1, 2, 3]
    assert min(score for _, score in found) > 0.95


@pytest.mark.parametrize(
    ("labels", "noise", "seed"),
    [
        (THREE_OBJECTS, 0.15, 1),
        (BIG_AND_TINY, 0.05, 1),
        (ONE_OBJECT, 0.15, 4),
        (ONE_OBJECT, 0.35, 1),
        (ONE_OBJECT, 0.35, 3),
    ],
    ids=["three-objects", "big-and-tiny", "one-object", "noisy-a", "noisy-b"],
)
def test_same_masks_as_the_dense_published_loop(labels: NDArray, noise: float, seed: int) -> None:
    feats = grid_features(labels, noise=noise, seed=seed)
    ours = maskcut(feats, n_masks=3, tau=0.15)
    reference = maskcut_dense(feats, n_masks=3, tau=0.15)
    assert len(ours) == len(reference)
    assert all(np.array_equal(a, b) for a, b in zip(ours, reference, strict=True))


def test_masks_are_bool_patch_grids_and_disjoint() -> None:
    for labels, n in ((THREE_OBJECTS, 3), (ONE_OBJECT, 3)):
        masks = maskcut(grid_features(labels, seed=2), n_masks=n)
        assert masks
        for m in masks:
            assert m.dtype == np.bool_ and m.shape == labels.shape and m.any()
        assert int(np.sum(masks, axis=0).max()) == 1


def test_object_in_corner() -> None:
    labels = labels_with((20, 20), (slice(0, 8), slice(0, 8)))
    masks = maskcut(grid_features(labels, seed=3), n_masks=1)
    assert iou(masks[0], labels == 1) > 0.95


def test_corner_rule_overrides_seed_rule() -> None:
    # The peak of v (5.0) lies on the side v > mean, which also holds all four corners:
    # the corner rule flips to the other side, whose seed is argmax -v.
    v = np.ones((6, 6))
    v[0, 3] = 5.0
    v[2:4, 2:4] = -1.0
    v[3, 3] = -2.0
    side, seed = bipartition(v)
    assert np.array_equal(side, v < 0)
    assert seed == (3, 3)


def test_seed_rule_flips_when_peak_is_outside() -> None:
    # Two corners each side; the peak |v| is on the side v < mean, so that side is chosen.
    v = np.zeros((4, 4))
    v[:, :2] = 0.5
    v[:, 2:] = -1.0
    v[1, 2] = -3.0
    side, seed = bipartition(v)
    assert np.array_equal(side, v < v.mean())
    assert seed == (1, 2)


def test_seed_component_is_four_connected() -> None:
    partition = np.zeros((5, 5), dtype=bool)
    partition[1, 1] = partition[2, 2] = partition[2, 3] = True  # (1, 1) touches only diagonally
    assert np.array_equal(np.argwhere(seed_component(partition, (2, 3))), [[2, 2], [2, 3]])
    assert not seed_component(partition, (0, 0)).any()


def test_small_mask_is_rejected() -> None:
    feats = grid_features(BIG_AND_TINY, noise=0.05, seed=1)
    rounds = maskcut_rounds(feats, n_masks=3)
    assert [r.status for r in rounds] == ["accepted", "rejected: area", "rejected: area"]
    assert iou(rounds[0].component, BIG_AND_TINY == 1) > 0.95
    assert iou(rounds[1].component, BIG_AND_TINY == 2) == 1.0  # 4 patches = 1% of 400
    assert len(maskcut(feats, n_masks=3)) == 1


def test_repeated_mask_is_rejected_then_upstream_repeats_it() -> None:
    # After the object is masked out, the cheapest cut splits off the masked-out patches
    # (their only edges are eps): the same component again, rejected by IoU > 0.5.
    feats = grid_features(ONE_OBJECT, seed=4)
    rounds = maskcut_rounds(feats, n_masks=3)
    assert [r.status for r in rounds] == ["accepted", "rejected: iou", "empty"]
    assert all(np.array_equal(r.component, rounds[0].component) for r in rounds)
    # Upstream quirk: nothing was masked out, so round 3 repeats round 2, now compared with an
    # empty previous mask; it is accepted, and nothing of it is new.
    assert rounds[1].eigenvalue == rounds[2].eigenvalue
    fixed = maskcut_rounds(feats, n_masks=3, mask_rejected=True)
    assert [r.status for r in fixed] == ["accepted", "rejected: iou", "rejected: iou"]


def test_no_rounds_and_bad_arguments() -> None:
    feats = grid_features(ONE_OBJECT)
    assert maskcut(feats, n_masks=0) == []
    with pytest.raises(ValueError, match="foreground"):
        maskcut(feats, foreground="center")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tau_quantile"):
        maskcut(feats, tau_quantile=1.5)
    with pytest.raises(ValueError, match="features"):
        maskcut(feats[0])


# --------------------------------------------------------------------------
# Solver
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_fiedler_vector_matches_dense_generalized_eigh(seed: int) -> None:
    feats = smooth_field((20, 20), seed)
    sim = cosine_similarity(feats).numpy()
    tau = float(np.median(sim))
    covered = np.zeros(400, dtype=bool)
    covered[:120] = True  # also with patches masked out by an earlier round
    for mask in (None, covered):
        x, lam = fiedler_vector(sim, tau, mask)
        ref, ref_lam = fiedler_vector_dense(sim, tau, mask)
        cos = abs(x @ ref) / (np.linalg.norm(x) * np.linalg.norm(ref))
        assert cos > 0.999
        assert lam == pytest.approx(ref_lam, abs=1e-6)
        # Same normalisation as eigh (x^T D x = 1), sign fixed: peak entry positive.
        assert abs(x).max() == x.max()


def test_fiedler_vector_of_constant_graph_does_not_fail() -> None:
    # tau below every cosine: A is all ones and every vector orthogonal to 1 is a Fiedler
    # vector (what the published tau does to DINOv2 features). Returns one, lambda_2 = 1.
    feats = grid_features(ONE_OBJECT, common=5.0)
    x, lam = fiedler_vector(cosine_similarity(feats), tau=-1.0)
    assert x.shape == (400,) and np.isfinite(x).all()
    assert lam == pytest.approx(1.0)


# --------------------------------------------------------------------------
# Inputs and batching
# --------------------------------------------------------------------------


ROBUST = {"center": True, "tau_quantile": 0.5, "foreground": "border", "mask_rejected": True}


@pytest.mark.parametrize(
    "options", [{}, ROBUST, {"max_ncut": 0.6}], ids=["published", "robust", "max-ncut"]
)
def test_batched_equals_unbatched(options: dict) -> None:
    labels = [
        THREE_OBJECTS,
        np.pad(ONE_OBJECT, 5),
        np.pad(BIG_AND_TINY, 5),
    ]
    feats = np.stack([grid_features(lab, seed=i) for i, lab in enumerate(labels)])
    batched = maskcut_batch(torch.from_numpy(feats), 3, 0.15, **options)
    assert len(batched) == 3
    for image, rounds in zip(feats, batched, strict=True):
        masks, alone = masks_of(rounds), maskcut(image, 3, 0.15, **options)
        assert all(r.converged for r in rounds)
        assert len(masks) == len(alone)
        assert all(np.array_equal(a, b) for a, b in zip(masks, alone, strict=True))


def test_numpy_and_torch_inputs_agree() -> None:
    feats = grid_features(THREE_OBJECTS, seed=5)
    from_numpy = maskcut(feats, 3)
    from_torch = maskcut(torch.from_numpy(feats).double(), 3)
    assert len(from_numpy) == len(from_torch) == 3
    assert all(np.array_equal(a, b) for a, b in zip(from_numpy, from_torch, strict=True))


# --------------------------------------------------------------------------
# Robust options
# --------------------------------------------------------------------------


def test_center_and_quantile_cut_features_that_are_all_alike() -> None:
    feats = grid_features(ONE_OBJECT, noise=0.1, common=3.0)
    assert float(cosine_similarity(feats).min()) > 0.6  # like DINOv2 keys
    published = maskcut(feats, n_masks=1, tau=0.15)
    assert published == []  # A is all ones: lambda_2 = 1, no structure, no (random) mask
    robust = maskcut(feats, n_masks=1, center=True, tau_quantile=0.5)
    assert iou(robust[0], ONE_OBJECT == 1) > 0.95


def test_border_rule_does_not_return_the_background() -> None:
    # An object wider at the bottom, holding both bottom corners and larger than the
    # background: two corners each side, so the seed rule picks the smaller side, the
    # background. The background touches more of the frame, so the border rule does not.
    rows, cols = np.mgrid[0:20, 0:20]
    labels = ((rows >= 6) & (np.abs(cols - 9.5) <= (rows - 6) * 0.8 + 4)).astype(int)
    feats = grid_features(labels, seed=7)
    corners = maskcut(feats, n_masks=1)
    assert iou(corners[0], labels == 0) > 0.95
    border = maskcut(feats, n_masks=1, foreground="border")
    assert iou(border[0], labels == 1) > 0.95


def test_max_ncut_stops_after_the_last_object() -> None:
    rounds = maskcut_rounds(grid_features(ONE_OBJECT, seed=8), n_masks=3, max_ncut=0.6)
    assert [r.status for r in rounds] == ["accepted", "stopped: ncut"]
    assert rounds[0].eigenvalue < 0.6 < rounds[1].eigenvalue
    # Three objects: every cut is cheaper than the threshold, all three are found.
    masks = maskcut(grid_features(THREE_OBJECTS, seed=1), n_masks=3, max_ncut=0.6)
    assert len(masks) == 3
    assert maskcut(grid_features(ONE_OBJECT), n_masks=3, max_ncut=0.0) == []


def test_drop_covered_cuts_only_what_is_left() -> None:
    # The case where upstream re-finds the masked-out object (test above): with covered
    # patches out of the graph, round 2 cuts the rest and never touches round 1's mask.
    feats = grid_features(ONE_OBJECT, seed=4)
    rounds = maskcut_rounds(feats, n_masks=3, drop_covered=True, mask_rejected=True)
    assert iou(rounds[0].component, ONE_OBJECT == 1) > 0.95
    assert "rejected: iou" not in [r.status for r in rounds[1:]]
    for r in rounds[1:]:
        assert not (r.component & rounds[0].component).any()
    # Round 2's eigenvalue is lambda_2 of the pencil on the subgraph of uncovered patches.
    keep = ~rounds[0].component.reshape(-1)
    flat = feats.reshape(-1, feats.shape[-1]).astype(np.float64)[keep]
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    affinity = np.where(flat @ flat.T > 0.15, 1.0, EPS)
    degree = np.diag(affinity.sum(axis=1))
    dense = scipy.linalg.eigh(degree - affinity, degree, eigvals_only=True, subset_by_index=[1, 1])
    assert rounds[1].eigenvalue == pytest.approx(float(dense[0]), abs=1e-5)


def test_drop_covered_batched_equals_unbatched() -> None:
    feats = np.stack([grid_features(np.pad(ONE_OBJECT, 5), seed=4), grid_features(THREE_OBJECTS)])
    options = {"drop_covered": True, "mask_rejected": True}
    batched = maskcut_batch(torch.from_numpy(feats), 4, 0.15, **options)
    for image, rounds in zip(feats, batched, strict=True):
        masks, alone = masks_of(rounds), maskcut(image, 4, 0.15, **options)
        assert len(masks) == len(alone)
        assert all(np.array_equal(a, b) for a, b in zip(masks, alone, strict=True))


@pytest.mark.parametrize("grid", ["constant", "zeros"])
def test_a_grid_without_structure_gives_no_mask(grid: str) -> None:
    # Every cosine is equal: the affinity is all ones (or all eps), lambda_2 = 1 and every
    # vector is a Fiedler vector; the published loop still accepts round 0's random blob.
    features = np.ones((12, 12, 8)) if grid == "constant" else np.zeros((12, 12, 8))
    rounds = maskcut_rounds(features, n_masks=3)
    assert [r.status for r in rounds] == ["stopped: no structure"]
    assert rounds[0].eigenvalue == pytest.approx(1.0, abs=1e-4)
    assert maskcut(features, n_masks=3) == []


def test_non_finite_features_are_refused_not_masked_out() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 8, 8, 16))
    features[1, 3, 4, 0] = np.nan
    assert nonfinite_images(features) == [1]
    with pytest.raises(ValueError, match=r"features of images \[1\] hold NaN"):
        maskcut_batch(features, n_masks=2)
    assert len(maskcut_batch(features[:1], n_masks=2)) == 1


def test_lanczos_that_does_not_converge_is_recorded_per_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A negative tolerance no residual can meet: every restart runs out and the best Ritz
    # vector is used; each round says so.
    feats = grid_features(np.pad(THREE_OBJECTS, 2), seed=3)
    clean = maskcut_rounds(feats, n_masks=2)
    assert [r.converged for r in clean] == [True, True]
    monkeypatch.setattr(maskcut_ops, "FIEDLER_TOL", -1.0)
    rounds = maskcut_rounds(feats, n_masks=2)
    assert [r.converged for r in rounds] == [False, False]
    # The best Ritz vector of a well-separated graph is still the right cut.
    assert all(np.array_equal(a, b) for a, b in zip(masks_of(rounds), masks_of(clean), strict=True))
    with pytest.warns(RuntimeWarning, match="Lanczos did not reach residual"):
        fiedler_vector(cosine_similarity(feats), 0.15, tol=-1.0)


def test_lanczos_on_a_clear_cut_stops_once_converged(monkeypatch: pytest.MonkeyPatch) -> None:
    # Work, not time: on graphs with a clear cut every round converges within one Krylov
    # cycle, and no restart runs after that (a converged cycle once restarted up to
    # _MAX_RESTARTS times: ~870 products per round instead of a few dozen).
    products = 0
    matvec = maskcut_ops._NormalizedAffinity.matvec

    def counted(
        self: maskcut_ops._NormalizedAffinity, y: torch.Tensor, inv_sqrt_degree: torch.Tensor
    ) -> torch.Tensor:
        nonlocal products
        products += 1
        return matvec(self, y, inv_sqrt_degree)

    monkeypatch.setattr(maskcut_ops._NormalizedAffinity, "matvec", counted)
    feats = np.stack([grid_features(np.pad(THREE_OBJECTS, 2), seed=s) for s in range(4)])
    results = maskcut_batch(feats, n_masks=3)
    rounds = [r for image in results for r in image]
    assert len(rounds) == 12 and all(r.converged for r in rounds)
    # 3 batched rounds, each within one Krylov cycle of _KRYLOV_DIM products (28 in all on
    # the development machine; the restarts after convergence made 2620).
    assert products <= 3 * maskcut_ops._KRYLOV_DIM, products
