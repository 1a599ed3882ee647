"""Stage 4 numeric core: pseudo stuff classes (docs/method.md, stage 4).

Two methods give every pixel one of S stuff clusters:

* ``patch-kmeans`` (the cheap baseline): spherical k-means of frozen ViT patch tokens,
  fitted on a per-image random sample of patches (`sample_patches`, `fit_stuff_clusters`);
  every patch then gets its most cosine-similar centroid (`stuff_logits`,
  `assign_patches`), and the similarity maps are upsampled to pixels (`upsample_labels`).
* ``stego``: a small segmentation head on the frozen tokens (`u2seg.models.stego`), trained
  with STEGO's feature-correspondence loss (`correspondence_loss`; the training loop is
  `u2seg.stages._stego_train`),
  then a *cluster* probe: the same spherical k-means, on the head's codes
  (`fit_cluster_probe`). No probe here ever sees labels. At inference the codes (not
  the scores) are flip-averaged and upsampled before the probe scores them
  (`code_logits`), as STEGO's evaluation does.

Both share STEGO's inference extras: horizontal-flip averaging (`flip_average`) and the
multi-class dense CRF with STEGO's parameters (`crf_stuff_labels`, `STEGO_CRF`).

Everything takes and returns arrays or tensors: no file I/O, no `.cuda()`; tensors stay on
the device they arrive on. The Ray stage around this is `u2seg.stages.semantic`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from u2seg.ops import refine
from u2seg.ops.refine import CRFParams

Seed = int | Sequence[int]


ArrayLike = np.ndarray | torch.Tensor


class CodeHead(Protocol):
    """What the cluster probe needs of a segmentation head (`u2seg.models.stego`)."""

    def codes(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def eval(self) -> Any: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...


def as_numpy32(x: ArrayLike) -> np.ndarray:
    """Any tensor (any device) or array -> float32 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def _l2_normalise_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """float32 (N, D) with every row scaled to unit length (an all-zero row stays zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


def sample_patches(tokens: ArrayLike, count: int, seed: Seed) -> np.ndarray:
    """A deterministic random sample of one image's patch features, L2-normalised.

    Args:
        tokens: (h, w, D) patch tokens of one image (tensor on any device, or array).
        count: patches to draw, without replacement; an image with fewer than `count`
            patches gives all of them (in random order), since repeating patches would
            weight that image twice in the k-means.
        seed: anything `numpy.random.default_rng` takes; pass e.g. ``(cfg.seed, image_id)``
            so each image draws its own patches and a re-run draws the same ones.

    Returns:
        float32 (min(count, h*w), D), rows of unit length: the k-means is spherical (cosine),
        so normalising here makes every sampled patch weigh the same in the centroid means.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    grid = as_numpy32(tokens)
    if grid.ndim != 3:
        raise ValueError(f"tokens must be (h, w, D), got shape {grid.shape}")
    flat = grid.reshape(-1, grid.shape[-1])
    rng = np.random.default_rng(seed)
    pick = rng.choice(flat.shape[0], size=min(count, flat.shape[0]), replace=False)
    return _l2_normalise_rows(flat[pick])


def fit_stuff_clusters(
    samples: ArrayLike, num_classes: int, niter: int = 50, seed: int = 0
) -> np.ndarray:
    """Spherical k-means (faiss) of patch features into S = `num_classes` stuff clusters.

    Args:
        samples: (N, D) features, e.g. stacked `sample_patches` outputs; rows are
            L2-normalised here again (a no-op for those), so the objective is cosine.
        num_classes: S, the number of clusters (27 on COCO-Stuff-27).
        niter: Lloyd iterations.
        seed: faiss's seed for the initial centroids.

    Returns:
        float32 (S, D) unit-length centroids.

    Raises:
        ValueError: S < 1, fewer samples than S, a non-2-D input, or NaN / inf values.

    faiss's `spherical=True` re-normalises the centroids after every update, i.e. k-means
    on the unit sphere. By default faiss silently subsamples to 256 points per centroid;
    here every sample is used (the caller already chose how many to draw).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    x = as_numpy32(samples)
    if x.ndim != 2:
        raise ValueError(f"samples must be (N, D), got shape {x.shape}")
    if x.shape[0] < num_classes:
        raise ValueError(
            f"k-means of {num_classes} clusters needs at least {num_classes} samples, "
            f"got {x.shape[0]}"
        )
    if not np.isfinite(x).all():
        raise ValueError("samples contain NaN or inf values")
    x = _l2_normalise_rows(x)
    kmeans = faiss.Kmeans(
        x.shape[1],
        num_classes,
        niter=niter,
        seed=int(seed),
        spherical=True,
        verbose=False,
        max_points_per_centroid=x.shape[0] // num_classes + 1,
        min_points_per_centroid=1,  # few samples are a caller's choice, not worth a warning
    )
    kmeans.train(x)
    return _l2_normalise_rows(np.asarray(kmeans.centroids, dtype=np.float32))


def stuff_logits(tokens: torch.Tensor, centroids: ArrayLike) -> torch.Tensor:
    """Cosine similarity of every patch to every stuff centroid.

    Args:
        tokens: (B, h, w, D) patch tokens (or STEGO codes), any device.
        centroids: (S, D) centroids, tensor or array; moved to `tokens.device`.

    Returns:
        float32 (B, S, h, w) similarities in [-1, 1], on `tokens.device`.
    """
    if tokens.ndim != 4:
        raise ValueError(f"tokens must be (B, h, w, D), got shape {tuple(tokens.shape)}")
    c = torch.as_tensor(centroids, dtype=torch.float32, device=tokens.device)
    if c.ndim != 2 or c.shape[1] != tokens.shape[-1]:
        raise ValueError(f"centroids must be (S, {tokens.shape[-1]}), got shape {tuple(c.shape)}")
    t = F.normalize(tokens.float(), dim=-1)
    return torch.einsum("bhwd,sd->bshw", t, F.normalize(c, dim=-1))


def assign_patches(tokens: torch.Tensor, centroids: ArrayLike) -> torch.Tensor:
    """Nearest centroid by cosine: int64 (B, h, w) cluster ids on `tokens.device`."""
    return stuff_logits(tokens, centroids).argmax(dim=1)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of per-class maps (B, S, h, w) to (B, S, H, W) = `size`, same device.

    align_corners=False, as STEGO's evaluation does: patch centres sit at half-patch offsets.
    """
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def code_logits(codes: torch.Tensor, centroids: ArrayLike, size: tuple[int, int]) -> torch.Tensor:
    """STEGO's inference order for one image: its (h, w, C) codes upsampled bilinearly to
    `size` (align_corners=False), then each pixel's cosine similarity to the (S, C)
    centroids: float32 (S, H, W) on `codes.device`. Normalising after upsampling scores the
    interpolated code, as STEGO's cluster probe does, not an average of two cosines."""
    if codes.ndim != 3:
        raise ValueError(f"codes must be (h, w, C), got shape {tuple(codes.shape)}")
    up = upsample_logits(codes.permute(2, 0, 1)[None], size)
    return stuff_logits(up.permute(0, 2, 3, 1), centroids)[0]


def upsample_labels(
    scores: ArrayLike, size: tuple[int, int], num_classes: int | None = None
) -> np.ndarray:
    """Patch-level stuff maps -> pixel labels, int64 (H, W) (or (B, H, W) for a batch).

    `scores` is either float per-class similarities / logits, (S, h, w) or (B, S, h, w),
    or integer patch labels, (h, w) or (B, h, w), which are one-hot encoded over
    `num_classes` (default: max label + 1) first. The S maps are upsampled bilinearly and
    the argmax taken per pixel. Unlike nearest-neighbour upsampling of the labels, which
    leaves staircase edges one patch (14-16 px) coarse, a boundary then falls where the
    interpolated scores of two classes cross: between patch centres, at sub-patch position,
    and following how confident each side is.
    """
    x = torch.as_tensor(scores)
    if not torch.is_floating_point(x):
        x = x.long()
        if x.ndim not in (2, 3):
            raise ValueError(f"integer labels must be (h, w) or (B, h, w), got {tuple(x.shape)}")
        if x.numel() and x.min() < 0:
            raise ValueError("integer labels must be >= 0")
        s = int(x.max()) + 1 if num_classes is None else num_classes
        x = F.one_hot(x, s).movedim(-1, -3).float()
    if x.ndim not in (3, 4):
        raise ValueError(f"scores must be (S, h, w) or (B, S, h, w), got {tuple(x.shape)}")
    batched = x.ndim == 4
    up = upsample_logits(x if batched else x[None], size).argmax(dim=1)
    labels = up.cpu().numpy().astype(np.int64)
    return labels if batched else labels[0]


def flip_average(
    model_forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    width_dim: int = -1,
) -> torch.Tensor:
    """Test-time horizontal-flip averaging (STEGO inference): (f(x) + flip(f(flip(x)))) / 2.

    Args:
        model_forward: images (B, 3, H, W) -> a spatial map whose width axis is `width_dim`,
            e.g. STEGO codes (B, C, h, w) or ViT patch tokens (B, h, w, D) (width_dim=2).
        images: (B, 3, H, W); W a multiple of the patch size, so that flipping the image
            flips the patch grid exactly.
        width_dim: the width axis of the forward's output.

    Average the features / codes, not the labels: the result is what a mirror-symmetric
    model would give, and a patch near a boundary gets the mean of two views.
    """
    out = model_forward(images)
    mirrored = model_forward(images.flip(dims=[-1])).flip(dims=[width_dim])
    return (out + mirrored) / 2


# STEGO's inference values (docs/method.md stage 4).
STEGO_CRF = CRFParams(
    iterations=10,
    gaussian_sxy=1.0,
    gaussian_compat=3.0,
    bilateral_sxy=67.0,
    bilateral_srgb=3.0,
    bilateral_compat=4.0,
)


def densecrf_probabilities(
    image: np.ndarray, probs: np.ndarray, params: CRFParams = STEGO_CRF
) -> np.ndarray:
    """Multi-class dense CRF: uint8 RGB (H, W, 3) and class probabilities (S, H, W) ->
    float32 (S, H, W) mean-field marginals.

    Unary -log(clip(p, 1e-5)) (pydensecrf's `unary_from_softmax`), a Gaussian smoothness
    and a bilateral appearance Potts kernel. STEGO feeds the image as BGR; the bilateral
    kernel weighs the three channels alike, so RGB gives the same result. Needs the
    optional extra `crf` (the one guarded import lives in `u2seg.ops.refine`).
    """
    if refine.dcrf is None:
        raise ImportError(refine.CRF_EXTRA_HINT)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"probs must be (S, {image.shape[0]}, {image.shape[1]}), got {probs.shape}"
        )
    s, height, width = probs.shape
    unary = -np.log(np.clip(probs, 1e-5, 1.0)).reshape(s, -1)
    crf = refine.dcrf.DenseCRF2D(width, height, s)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        # The Cython binding wants a writable C-contiguous buffer.
        rgbim=np.require(image, dtype=np.uint8, requirements=["C", "W"]),
        compat=params.bilateral_compat,
    )
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return q.reshape(s, height, width)


def crf_stuff_labels(
    image: np.ndarray,
    logits: ArrayLike,
    alpha: float = 2.0,
    params: CRFParams = STEGO_CRF,
) -> np.ndarray:
    """CRF-refined stuff labels: int64 (H, W) for uint8 RGB `image` (H, W, 3).

    `logits`: (S, h, w) cosine similarities (`stuff_logits` of one image, patch or pixel
    resolution). They are upsampled bilinearly to (H, W), turned into probabilities
    softmax(alpha * logits) (STEGO's cluster probe at inference: alpha = 2 on cosines),
    refined by `densecrf_probabilities`, and argmaxed. Run it at the network-input
    resolution (448 px) and resize the labels to the photo afterwards (nearest).
    """
    x = torch.as_tensor(logits).float()
    if x.ndim != 3:
        raise ValueError(f"logits must be (S, h, w), got {tuple(x.shape)}")
    height, width = np.asarray(image).shape[:2]
    up = upsample_logits(x[None], (height, width))[0]
    probs = torch.softmax(alpha * up, dim=0).cpu().numpy()
    q = densecrf_probabilities(image, probs, params)
    return np.asarray(q.argmax(axis=0), dtype=np.int64)


@dataclass(frozen=True)
class CorrespondenceLossConfig:
    """Weights (lambda) and shifts (b) of STEGO's three correspondence terms.

    Defaults: the values active in STEGO's published `train_config.yml` (dataset
    cocostuff27, ViT-S/8, code dim 70): b_self 0.18, b_knn 0.12, b_rand 0.46 and lambda
    0.67 / 0.25 / 0.63 (the file's comment over them says "IAROA vit small"). Its
    commented-out "Cocostuff27 vit small" set has b 0.08 / 0.02 / 0.66 at the same
    lambdas. The shifts are tuned per backbone, since they set which feature similarities
    count as attraction (fd > b) or repulsion: re-tune them for DINOv2 features.
    `feature_samples`: an n x n grid of random points per image; `neg_samples`: random
    partner images per step. `pointwise`: centre the feature correlation per query point;
    `zero_clamp`: clamp code correlations at 0 (only attraction is rewarded).
    """

    self_weight: float = 0.67
    knn_weight: float = 0.25
    rand_weight: float = 0.63
    self_shift: float = 0.18
    knn_shift: float = 0.12
    rand_shift: float = 0.46
    feature_samples: int = 11
    neg_samples: int = 5
    pointwise: bool = True
    zero_clamp: bool = True


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine correlation of two sampled maps (B, C, n, n) -> (B, n, n, n, n)."""
    return torch.einsum("bchw,bcij->bhwij", F.normalize(a, dim=1), F.normalize(b, dim=1))


def _pair_loss(
    f1: torch.Tensor,
    f2: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    shift: float,
    cfg: CorrespondenceLossConfig,
) -> torch.Tensor:
    """-clamp(code corr) * (feature corr - shift), per point pair: (B, n, n, n, n).

    Feature correlations are targets only (frozen backbone), so they carry no gradient.
    """
    with torch.no_grad():
        fd = _correlation(f1, f2)
        if cfg.pointwise:
            # Remove each query point's mean similarity so that a point similar to
            # everything (e.g. a flat region) does not attract all codes; keep the
            # global mean so the shift keeps its meaning.
            old_mean = fd.mean()
            fd = fd - fd.mean(dim=(3, 4), keepdim=True)
            fd = fd - fd.mean() + old_mean
    cd = _correlation(c1, c2)
    cd = cd.clamp(min=0.0) if cfg.zero_clamp else cd
    return -cd * (fd - shift)


def _random_derangement(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A random permutation of range(n) with no fixed point (a random n-cycle), n >= 2."""
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm.to(device)


def _sample_grid(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of (B, C, h, w) at coords (B, n, n, 2) in [-1, 1] -> (B, C, n, n)."""
    return F.grid_sample(t, coords, mode="bilinear", padding_mode="border", align_corners=True)


def correspondence_loss(
    feats: torch.Tensor,
    feats_pos: torch.Tensor,
    code: torch.Tensor,
    code_pos: torch.Tensor,
    cfg: CorrespondenceLossConfig | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """STEGO's contrastive feature-correspondence loss for one batch.

    Args:
        feats: (B, D, h, w) frozen backbone features of B images.
        feats_pos: (B, D, h, w) features of a kNN neighbour of each image.
        code, code_pos: (B, C, h, w) head outputs for the same images.
        cfg: weights and shifts; default `CorrespondenceLossConfig()`.
        generator: CPU generator for the sample points and negatives (reproducible runs).

    Returns:
        The scalar loss lambda_self * L(x, x) + lambda_knn * L(x, kNN(x)) + lambda_rand *
        L(x, random other image), each L the mean over point pairs of `_pair_loss`, and the
        three terms as floats (for logging).

    Points are drawn uniformly in the image (n x n per image, bilinear samples), one set for
    the image and one for its partner; random partners are derangements of the batch, so a
    batch needs B >= 2.
    """
    cfg = cfg or CorrespondenceLossConfig()
    batch = feats.shape[0]
    if batch < 2:
        raise ValueError("the correspondence loss needs at least 2 images per batch")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = feats.device
    shape = (batch, cfg.feature_samples, cfg.feature_samples, 2)
    coords1 = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
    coords2 = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
    f1, c1 = _sample_grid(feats, coords1), _sample_grid(code, coords1)
    f2, c2 = _sample_grid(feats_pos, coords2), _sample_grid(code_pos, coords2)
    self_loss = _pair_loss(f1, f1, c1, c1, cfg.self_shift, cfg).mean()
    knn_loss = _pair_loss(f1, f2, c1, c2, cfg.knn_shift, cfg).mean()
    rand_terms = []
    for _ in range(cfg.neg_samples):
        perm = _random_derangement(batch, gen, device)
        f_neg = _sample_grid(feats[perm], coords2)
        c_neg = _sample_grid(code[perm], coords2)
        rand_terms.append(_pair_loss(f1, f_neg, c1, c_neg, cfg.rand_shift, cfg).mean())
    rand_loss = torch.stack(rand_terms).mean() if rand_terms else self_loss.new_zeros(())
    loss = cfg.self_weight * self_loss + cfg.knn_weight * knn_loss + cfg.rand_weight * rand_loss
    parts = {
        name: float(term.detach())
        for name, term in (("self", self_loss), ("knn", knn_loss), ("rand", rand_loss))
    }
    return loss, parts


def nearest_neighbours(global_feats: ArrayLike, k: int) -> np.ndarray:
    """kNN images by cosine of their global features: (N, D) -> int64 (N, k), self excluded.

    STEGO's positive pairs: each image is paired with one of its k = 7 nearest neighbours
    in the backbone's mean-pooled patch features (`features/` artifact: `mean_patch`).
    """
    x = _l2_normalise_rows(as_numpy32(global_feats))
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} images, got {k}")
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, found = index.search(x, k + 1)
    # Drop each image itself; with duplicate images it may not come first, so filter.
    rows = [[j for j in row if j != i][:k] for i, row in enumerate(found)]
    return np.asarray(rows, dtype=np.int64)


@torch.no_grad()
def fit_cluster_probe(
    head: CodeHead,
    tokens: ArrayLike,
    num_classes: int,
    samples_per_image: int = 256,
    niter: int = 50,
    seed: int = 0,
    batch_size: int = 16,
) -> np.ndarray:
    """STEGO's cluster probe, unsupervised: spherical k-means of the head's codes.

    Args:
        head: a trained head (put in eval mode here: no dropout at inference).
        tokens: (N, h, w, D) frozen patch tokens of the images to fit on.
        num_classes: S clusters.
        samples_per_image, niter, seed: as `sample_patches` / `fit_stuff_clusters`.

    Returns:
        float32 (S, C) unit centroids in code space; `stuff_logits(head.codes(t), probe)`
        then scores patches. STEGO learns its probe by SGD on the same objective
        (maximise each code's cosine to its nearest centroid); k-means reaches it directly.
    """
    head.eval()
    device = next(head.parameters()).device
    samples = []
    for start in range(0, len(tokens), batch_size):
        chunk = torch.as_tensor(np.asarray(tokens[start : start + batch_size]))
        codes = head.codes(chunk.to(device))
        for i, grid in enumerate(codes):
            samples.append(sample_patches(grid, samples_per_image, (seed, start + i)))
    return fit_stuff_clusters(np.concatenate(samples), num_classes, niter, seed)
