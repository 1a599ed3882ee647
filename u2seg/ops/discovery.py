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

Everything but the k-means and the connected components runs in torch on the device of the
features (the MaskCut actor's, beside the ViT and the CRF), in float32, every image of a
batch together: the bisections of one level are grouped by size into padded batches of one
`torch.linalg.eigh` each; faiss k-means (CPU) and the 4-connected components (scipy, on
the small patch grids) are the only host work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

__all__ = ["PoolOptions", "bisection_candidates", "discover", "kmeans_candidates", "score"]

#: Affinity of a pair below the threshold (as in MaskCut), so every graph stays connected.
EPS = 1e-5
#: Votes count the other candidates with at least this IoU.
VOTE_IOU = 0.5
#: faiss wants this many points per centroid; smaller k are used on small grids.
_POINTS_PER_CENTROID = 39
#: Regions of one padded eigen-solve: none smaller than this share of the largest, and at
#: most this many matrix entries in all.
_BUCKET_SHARE = 0.75
_BUCKET_ENTRIES = 1 << 23
#: The padding's eigenvalue, below every eigenvalue of a normalised affinity ([-1, 1]).
_PAD_EIGENVALUE = -2.0
#: The ring around a candidate for its contrast: the patches within 2 steps (4-connected),
#: as two binary dilations with the cross.
_RING = torch.tensor(
    [[abs(i) + abs(j) <= 2 for j in range(-2, 3)] for i in range(-2, 3)], dtype=torch.float32
)


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


def _centred_unit(x: torch.Tensor) -> torch.Tensor:
    """(n, d) features minus their mean, L2-normalised (a zero row stays zero), float32."""
    x = x.float()
    x = x - x.mean(dim=0)
    norm = x.norm(dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def _buckets(sizes: Sequence[int]) -> list[list[int]]:
    """Indices of `sizes` grouped for padded solves: largest first, each group's sizes within
    `_BUCKET_SHARE` of its first, its padded entries under `_BUCKET_ENTRIES`."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else None
        top = sizes[group[0]] if group else 0
        if (
            group
            and sizes[i] >= _BUCKET_SHARE * top
            and (len(group) + 1) * top**2 <= _BUCKET_ENTRIES
        ):
            group.append(i)
        else:
            groups.append([i])
    return groups


def _fiedler_batch(regions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Fiedler vectors of regions' graphs: for each (n_i, d) centred unit feature matrix, the
    graph A = [similarity > the lower median pair similarity] (eps elsewhere), the second
    largest eigenvector y of D^-1/2 A D^-1/2, returned as x = D^-1/2 y (n_i,).

    Regions of similar size share one batched `eigh`: each is padded to the group's largest
    n with a diagonal of -2, whose eigenvalues sit below the region's, so the two largest
    are the region's own."""
    vectors: list[torch.Tensor] = [torch.empty(0)] * len(regions)
    for group in _buckets([len(r) for r in regions]):
        n = len(regions[group[0]])
        device = regions[group[0]].device
        sizes = torch.tensor([len(regions[i]) for i in group], device=device)
        x = torch.zeros(len(group), n, regions[group[0]].shape[1], device=device)
        for row, i in enumerate(group):
            x[row, : len(regions[i])] = regions[i]
        valid = torch.arange(n, device=device)[None, :] < sizes[:, None]  # (g, n)
        pair_valid = valid[:, :, None] & valid[:, None, :]
        similarity = x @ x.transpose(1, 2)
        upper = pair_valid & torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
        pairs = torch.where(upper, similarity, torch.inf).flatten(1)
        # numpy's "lower" median of each region's pairs (the padding's inf sort last)
        ranks = [(len(regions[i]) * (len(regions[i]) - 1) // 2 - 1) // 2 + 1 for i in group]
        tau = torch.stack([pairs[row].kthvalue(k).values for row, k in enumerate(ranks)])[:, None]
        affinity = torch.where(similarity > tau[:, :, None], 1.0, EPS) * pair_valid
        inv_sqrt = torch.where(valid, affinity.sum(dim=2).clamp_min(EPS).rsqrt(), 0.0)
        normalised = inv_sqrt[:, :, None] * affinity * inv_sqrt[:, None, :]
        normalised = normalised + torch.diag_embed(torch.where(valid, 0.0, _PAD_EIGENVALUE))
        second = torch.linalg.eigh(normalised).eigenvectors[:, :, n - 2] * inv_sqrt
        for row, i in enumerate(group):
            vectors[i] = second[row, : len(regions[i])]
    return vectors


def _components(region: NDArray[np.bool_], min_patches: int) -> list[NDArray[np.bool_]]:
    """The 4-connected components of a bool (h, w) region with at least `min_patches`."""
    labels, count = ndimage.label(region)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    return [labels == c for c in range(1, count + 1) if sizes[c] >= min_patches]


def bisection_candidates(
    grids: Sequence[torch.Tensor], depth: int, min_patches: int
) -> list[list[NDArray[np.bool_]]]:
    """Candidates of recursive normalized-cut bisection of (h, w, d) patch grids (one list
    of bool (h, w) masks per grid, parents before their children; module docstring, step
    1). Every region of one level, over all grids, is solved in one pass."""
    found: list[list[NDArray[np.bool_]]] = [[] for _ in grids]
    flat = [grid.reshape(-1, grid.shape[-1]) for grid in grids]
    # (grid, region) pairs to split at this level.
    level = [(g, np.ones(grid.shape[:2], dtype=bool)) for g, grid in enumerate(grids)]
    for _ in range(depth):
        level = [(g, r) for g, r in level if r.sum() >= max(2 * min_patches, 3)]
        if not level:
            break
        index = [np.flatnonzero(r.ravel()) for _, r in level]
        at_device = torch.from_numpy(np.concatenate(index)).to(grids[0].device)
        picked = at_device.split([len(i) for i in index])
        regions = [_centred_unit(flat[g][p]) for (g, _), p in zip(level, picked, strict=True)]
        vectors = _fiedler_batch(regions)
        sides = torch.cat([v > v.mean() for v in vectors]).cpu().numpy()
        sides_of = np.split(sides, np.cumsum([len(i) for i in index])[:-1])
        following = []
        for (g, region), at, side in zip(level, index, sides_of, strict=True):
            for part in (side, ~side):
                grid = np.zeros(region.size, dtype=bool)
                grid[at[part]] = True
                for component in _components(grid.reshape(region.shape), min_patches):
                    found[g].append(component)
                    following.append((g, component))
        level = following
    return found


def kmeans_candidates(
    features: torch.Tensor, max_k: int, min_patches: int, seed: int = 0
) -> list[NDArray[np.bool_]]:
    """Candidates of spherical k-means of an (h, w, d) patch grid's centred features, k =
    2..max_k (capped so that each centroid has 39 points, faiss's minimum): the 4-connected
    components of every cluster, bool (h, w)."""
    h, w, d = features.shape
    x = np.ascontiguousarray(_centred_unit(features.reshape(h * w, d)).cpu().numpy())
    found: list[NDArray[np.bool_]] = []
    for k in range(2, min(max_k, (h * w) // _POINTS_PER_CENTROID) + 1):
        km = faiss.Kmeans(d, k, niter=20, seed=seed + k, spherical=True, verbose=False)
        km.train(x)
        _, assign = km.index.search(x, 1)
        labels = assign.reshape(h, w)
        for cluster in range(k):
            found.extend(_components(labels == cluster, min_patches))
    return found


def _iou_matrix(masks: torch.Tensor) -> torch.Tensor:
    """(C, n) 0/1 float masks -> (C, C) pairwise IoU."""
    inter = masks @ masks.T
    area = masks.sum(dim=1)
    return inter / (area[:, None] + area[None, :] - inter)


def score(
    masks: torch.Tensor,
    features: torch.Tensor,
    attention: torch.Tensor,
    ious: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores (C,) of candidate masks (bool C, h, w) on an (h, w, d) grid with CLS attention
    (h, w), all on one device: contrast * attention * (1 + votes) (module docstring, step
    2)."""
    count, h, w = masks.shape
    flat = masks.reshape(count, h * w).float()
    ious = _iou_matrix(flat) if ious is None else ious
    x = _centred_unit(features.reshape(h * w, -1))
    through = (flat @ x) @ x.T  # (C, n): summed similarity to each patch
    ring_kernel = _RING.to(masks.device)[None, None]
    dilated = torch.nn.functional.conv2d(flat.reshape(count, 1, h, w), ring_kernel, padding=2)
    ring_flat = ((dilated.reshape(count, h * w) > 0.5) & ~masks.reshape(count, h * w)).float()
    size = flat.sum(dim=1)
    inner = (through * flat).sum(dim=1) / size**2
    ring_size = ring_flat.sum(dim=1)
    outer = (through * ring_flat).sum(dim=1) / (size * ring_size).clamp_min(1.0)
    contrast = (inner - torch.where(ring_size > 0, outer, 0.0)).clamp_min(0.0)
    att = attention.float().reshape(h * w)
    share = flat @ att / att.sum().clamp_min(1e-12)
    attended = share / (size / (h * w)).sqrt()
    others = torch.where(ious >= VOTE_IOU, ious, 0.0)
    votes = others.sum(dim=1) - others.diagonal()
    return contrast * attended * (1.0 + votes)


def _suppress(
    scores: NDArray[np.float32], ious: NDArray[np.float32], options: PoolOptions
) -> list[int]:
    """Greedy mask NMS: indices of the kept candidates, best first (step 3)."""
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] <= 0:
            break
        if all(ious[i, j] < options.nms_iou for j in kept):
            kept.append(int(i))
            if len(kept) == options.n_masks:
                break
    return kept


def discover(
    feature_maps: Sequence[torch.Tensor],
    attention: torch.Tensor,
    options: PoolOptions = PoolOptions(),
) -> list[list[tuple[NDArray[np.bool_], float]]]:
    """Ranked object masks of each image of a batch: per image, (bool (h, w) mask, score)
    pairs, best first, at most `options.n_masks`, pairwise IoU below `options.nms_iou`.

    Args:
        feature_maps: (B, h, w, d) patch grids of the batch on one device (e.g. keys, then
            tokens); the first one gives the contrast term.
        attention: (B, h, w) CLS attention of the last block (`ViTFeatures.attention`).
        options: :class:`PoolOptions`.
    """
    if not feature_maps:
        raise ValueError("discover needs at least one feature map")
    shape = tuple(feature_maps[0].shape[:3])
    if any(tuple(f.shape[:3]) != shape for f in feature_maps) or tuple(attention.shape) != shape:
        raise ValueError("feature maps and attention must share one (B, h, w) grid")
    grids = [f[b] for b in range(shape[0]) for f in feature_maps]
    trees = bisection_candidates(grids, options.depth, options.min_patches)
    ranked: list[list[tuple[NDArray[np.bool_], float]]] = []
    for b in range(shape[0]):
        candidates: list[NDArray[np.bool_]] = []
        for m, features in enumerate(feature_maps):
            candidates += trees[b * len(feature_maps) + m]
            candidates += kmeans_candidates(
                features[b], options.max_k, options.min_patches, options.seed
            )
        if not candidates:
            ranked.append([])
            continue
        masks = np.stack(candidates)
        on_device = torch.from_numpy(masks).to(attention.device)
        ious = _iou_matrix(on_device.reshape(len(masks), -1).float())
        scores = score(on_device, feature_maps[0][b], attention[b], ious)
        on_host = scores.cpu().numpy()
        kept = _suppress(on_host, ious.cpu().numpy(), options)
        ranked.append([(masks[i], float(on_host[i])) for i in kept])
    return ranked
