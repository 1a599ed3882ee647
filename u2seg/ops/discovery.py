"""Stage 2, candidate-pool discovery: many object masks per image, ranked (pure numeric core).

Published MaskCut (:mod:`u2seg.ops.maskcut`) takes one normalized cut per round and keeps the
side that holds the seed: on a scene of several objects of one kind (eight people around a
table, the items of a bin) that side is all of them at once, and a fixed N rounds caps the
count. Here every image gets a pool of candidate regions from several partitions of its
patch graph, a score that ranks objects first, and mask non-maximum suppression:

1. Candidates, on each feature map given (last-block keys and output tokens):
   - recursive bisection (the divide step of divide-and-conquer, without a trained model):
     a region's features are centred on the region's mean, its graph thresholded at the
     median pair similarity (A_ij = 1 above, eps below), split at the mean of the Fiedler
     vector; every 4-connected component of either side with at least `min_patches`
     patches is a candidate and is split again, `depth` levels deep. Several objects of one
     kind end up apart once their region holds nothing else;
   - spherical k-means of the centred features for k = 2..`max_k` (faiss, seeded): every
     4-connected component of every cluster. A cluster is one kind of thing; its
     components are the separate instances.
2. Score = contrast * attention * (1 + votes), all from the frozen ViT:
   - contrast: mean centred cosine similarity (first feature map) among the candidate's
     patches minus the mean between its patches and the ring of patches within 2 of it:
     an object is alike inside and unlike its surroundings;
   - attention: the share of the last block's CLS attention on the candidate's patches,
     divided by the square root of its share of the image: the geometric mean of the share
     (which alone favours unions of objects) and the density (which alone favours a few
     patches the ViT uses as registers). The ViT attends to objects, not to the sky, a wall
     or the floor;
   - votes: the sum of the IoUs above 0.5 with the other candidates: a region that several
     independent partitions agree on (the vote of VoteCut, here across partitions and
     feature maps of one model).
3. Greedy mask NMS at IoU `nms_iou`, best first, at most `n_masks` kept.

Everything runs on CPU in numpy (the partitions are small: n = h * w patches); the ViT
before and the CRF after run on the actor's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
from numpy.typing import NDArray
from scipy import linalg, ndimage

__all__ = ["PoolOptions", "bisection_candidates", "discover", "kmeans_candidates", "score"]

#: Affinity of a pair below the threshold (as in MaskCut), so every graph stays connected.
EPS = 1e-5
#: Votes count the other candidates with at least this IoU.
VOTE_IOU = 0.5
#: faiss wants this many points per centroid; smaller k are used on small grids.
_POINTS_PER_CENTROID = 39


@dataclass(frozen=True)
class PoolOptions:
    """Options of :func:`discover` (see the module docstring)."""

    n_masks: int = 20
    depth: int = 6
    max_k: int = 12
    min_patches: int = 3
    nms_iou: float = 0.4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_masks < 1 or self.depth < 1 or self.max_k < 2 or self.min_patches < 1:
            raise ValueError(f"invalid pool options {self}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {self.nms_iou}")


def _centred_unit(features: NDArray[np.floating]) -> NDArray[np.float64]:
    """(n, d) features minus their mean, L2-normalised (a zero row stays zero)."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _fiedler(similarity: NDArray[np.float64]) -> NDArray[np.float64]:
    """Fiedler vector (n,) of the graph A = [similarity > median pair similarity] (eps
    elsewhere), from the normalised affinity D^-1/2 A D^-1/2 (dense: the regions are small)."""
    n = len(similarity)
    pairs = similarity[np.triu_indices(n, 1)]
    tau = float(np.quantile(pairs, 0.5, method="lower"))
    affinity = np.where(similarity > tau, 1.0, EPS)
    inv_sqrt = 1.0 / np.sqrt(affinity.sum(axis=1))
    normalised = inv_sqrt[:, None] * affinity * inv_sqrt[None, :]
    _, vectors = linalg.eigh(normalised, subset_by_index=[n - 2, n - 1], driver="evr")
    return np.asarray(vectors[:, 0] * inv_sqrt)  # the second largest; x = D^-1/2 y


def _components(region: NDArray[np.bool_], min_patches: int) -> list[NDArray[np.bool_]]:
    """The 4-connected components of a bool (h, w) region with at least `min_patches`."""
    labels, count = ndimage.label(region)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    return [labels == c for c in range(1, count + 1) if sizes[c] >= min_patches]


def bisection_candidates(
    features: NDArray[np.floating], depth: int, min_patches: int
) -> list[NDArray[np.bool_]]:
    """Candidates of recursive normalized-cut bisection of an (h, w, d) patch grid: bool
    (h, w) masks, parents before their children (module docstring, step 1)."""
    h, w, d = features.shape
    flat = np.asarray(features, dtype=np.float64).reshape(h * w, d)
    found: list[NDArray[np.bool_]] = []

    def split(region: NDArray[np.bool_], levels: int) -> None:
        index = np.flatnonzero(region.ravel())
        if levels == 0 or len(index) < max(2 * min_patches, 3):
            return
        x = _centred_unit(flat[index])
        vector = _fiedler(x @ x.T)
        side = vector > vector.mean()
        for part in (side, ~side):
            grid = np.zeros(h * w, dtype=bool)
            grid[index[part]] = True
            for component in _components(grid.reshape(h, w), min_patches):
                found.append(component)
                split(component, levels - 1)

    split(np.ones((h, w), dtype=bool), depth)
    return found


def kmeans_candidates(
    features: NDArray[np.floating], max_k: int, min_patches: int, seed: int = 0
) -> list[NDArray[np.bool_]]:
    """Candidates of spherical k-means of an (h, w, d) patch grid's centred features, k =
    2..max_k (capped so that each centroid has 39 points, faiss's minimum): the 4-connected
    components of every cluster, bool (h, w)."""
    h, w, d = features.shape
    x = np.ascontiguousarray(_centred_unit(features.reshape(h * w, d)), dtype=np.float32)
    found: list[NDArray[np.bool_]] = []
    for k in range(2, min(max_k, (h * w) // _POINTS_PER_CENTROID) + 1):
        km = faiss.Kmeans(d, k, niter=20, seed=seed + k, spherical=True, verbose=False)
        km.train(x)
        _, assign = km.index.search(x, 1)
        labels = assign.reshape(h, w)
        for cluster in range(k):
            found.extend(_components(labels == cluster, min_patches))
    return found


def _iou_matrix(masks: NDArray[np.float32]) -> NDArray[np.float32]:
    """(C, n) 0/1 masks -> (C, C) pairwise IoU."""
    inter = masks @ masks.T
    area = masks.sum(axis=1)
    return np.asarray(inter / (area[:, None] + area[None, :] - inter))


def score(
    masks: NDArray[np.bool_],
    features: NDArray[np.floating],
    attention: NDArray[np.floating],
    ious: NDArray[np.float32] | None = None,
) -> NDArray[np.float64]:
    """Scores (C,) of candidate masks (C, h, w) on an (h, w, d) grid with CLS attention (h, w):
    contrast * attention * (1 + votes) (module docstring, step 2)."""
    count, h, w = masks.shape
    flat = masks.reshape(count, h * w).astype(np.float64)
    ious = _iou_matrix(flat.astype(np.float32)) if ious is None else ious
    x = _centred_unit(np.asarray(features).reshape(h * w, -1))
    similarity = x @ x.T
    ring = np.stack([ndimage.binary_dilation(m, iterations=2) & ~m for m in masks])
    ring_flat = ring.reshape(count, h * w).astype(np.float64)
    through = flat @ similarity  # (C, n): summed similarity to each patch
    size = flat.sum(axis=1)
    inner = (through * flat).sum(axis=1) / size**2
    ring_size = ring_flat.sum(axis=1)
    outer = (through * ring_flat).sum(axis=1) / np.maximum(size * ring_size, 1.0)
    contrast = np.maximum(inner - np.where(ring_size > 0, outer, 0.0), 0.0)
    att = np.asarray(attention, dtype=np.float64).reshape(h * w)
    share = flat @ att / max(float(att.sum()), 1e-12)
    attended = share / np.sqrt(size / (h * w))
    others = np.where(ious >= VOTE_IOU, ious, 0.0)
    votes = others.sum(axis=1) - np.diag(others)
    return np.asarray(contrast * attended * (1.0 + votes))


def discover(
    feature_maps: Sequence[NDArray[np.floating]],
    attention: NDArray[np.floating],
    options: PoolOptions = PoolOptions(),
) -> list[tuple[NDArray[np.bool_], float]]:
    """Ranked object masks of one image: (bool (h, w) mask, score), best first, at most
    `options.n_masks`, pairwise IoU below `options.nms_iou`.

    Args:
        feature_maps: (h, w, d) patch grids of one image (e.g. keys, then tokens); the first
            one gives the contrast term.
        attention: (h, w) CLS attention of the last block (`ViTFeatures.attention`).
        options: :class:`PoolOptions`.
    """
    if not feature_maps:
        raise ValueError("discover needs at least one feature map")
    h, w = feature_maps[0].shape[:2]
    if any(f.shape[:2] != (h, w) for f in feature_maps) or attention.shape != (h, w):
        raise ValueError("feature maps and attention must share one (h, w) grid")
    candidates: list[NDArray[np.bool_]] = []
    for features in feature_maps:
        candidates += bisection_candidates(features, options.depth, options.min_patches)
        candidates += kmeans_candidates(features, options.max_k, options.min_patches, options.seed)
    if not candidates:
        return []
    masks = np.stack(candidates)
    ious = _iou_matrix(masks.reshape(len(masks), -1).astype(np.float32))
    scores = score(masks, feature_maps[0], attention, ious)
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] <= 0:
            break
        if all(ious[i, j] < options.nms_iou for j in kept):
            kept.append(int(i))
            if len(kept) == options.n_masks:
                break
    return [(masks[i], float(scores[i])) for i in kept]
