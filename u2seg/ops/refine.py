"""Refinement of MaskCut pseudo masks (METHOD.md stage 2, step 7): pure array functions.

A patch mask is upsampled to the square MaskCut frame (480x480), refined so that its edges
follow the image (dense CRF, or a cheap guided-filter fallback), hole-filled, dropped when the
refinement changed it too much and resized back to the photo's own size. No file I/O; the
COCO encoding of the result (step 8) is `u2seg.data.coco`.

The dense CRF comes from the optional extra `crf` (package `pydensecrf2`, module `pydensecrf`).
Without it, `backend="auto"` falls back to the guided filter, which is *not* the dense CRF:
pseudo masks made that way differ from the published ones, and the maskcut manifest says so
(`refinement`: images per backend that ran).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

# The one guarded import of the optional dense CRF (built from source by `pip install
# 'u2seg[crf]'`); everything else asks `has_densecrf`.
try:
    import pydensecrf.densecrf as dcrf

    has_densecrf = True
except ImportError:
    dcrf = None
    has_densecrf = False


BACKENDS = ("auto", "densecrf", "guided", "none")


CRF_EXTRA_HINT = (
    "the dense CRF needs the optional extra `crf` (package pydensecrf2): "
    "pip install 'u2seg[crf]', or pick backend='guided' (a cheaper edge snap, not the CRF) "
    "or 'none'"
)


def upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask (h, w) to bool (H, W) = `size`.

    Source index floor(i * h / H), the rule of torch's `interpolate(mode="nearest")`, so a
    60x60 patch mask becomes exact 8x8 blocks of the 480x480 frame.
    """
    h, w = mask.shape
    rows = (np.arange(size[0]) * h) // size[0]
    cols = (np.arange(size[1]) * w) // size[1]
    return np.asarray(mask, dtype=bool)[rows[:, None], cols[None, :]]


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask (H, W) to bool (H2, W2) = `size`: bilinear on float, then > 0.5.

    Pillow's bilinear widens its kernel when shrinking (antialiased), so a thin part of a
    mask fades by its coverage instead of being sampled at a few points.
    """
    height, width = size
    image = Image.fromarray(np.asarray(mask, dtype=np.float32))  # mode "F"
    resized = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized) > 0.5


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Bool mask (H, W) with every background region not connected to the border filled."""
    return np.asarray(ndimage.binary_fill_holes(mask), dtype=bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of the same shape; 0.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def resolve_backend(backend: str) -> str:
    """The concrete backend for `backend`: "auto" is "densecrf" when installed, else "guided".

    Raises ImportError naming the extra when "densecrf" is asked for and missing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"refine backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "densecrf" if has_densecrf else "guided"
    if backend == "densecrf" and not has_densecrf:
        raise ImportError(CRF_EXTRA_HINT)
    return backend


def softmax_unary(mask: np.ndarray) -> np.ndarray:
    """Bool mask (H, W) -> float32 (2, H*W) negative log of softmax([1 - m, m]) (bg, fg).

    The MaskCut unary: a hard mask becomes only 0.73 vs 0.27 confident, so the pairwise terms
    (compat 7 + 10) can move its edges by tens of pixels towards colour edges.
    """
    fg = np.asarray(mask, dtype=np.float64).reshape(1, -1)
    logits = np.concatenate([1.0 - fg, fg], axis=0)
    log_probs = logits - np.logaddexp(logits[0], logits[1])
    return np.ascontiguousarray(-log_probs, dtype=np.float32)


def densecrf_refine(
    image: np.ndarray,
    mask: np.ndarray,
    iterations: int,
    gaussian_sxy: float,
    gaussian_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
) -> np.ndarray:
    """Fully connected CRF (Kraehenbuehl and Koltun) on uint8 RGB (H, W, 3): bool (H, W).

    Mean-field inference from `softmax_unary(mask)` with a Gaussian (smoothness) and a
    bilateral (appearance) Potts kernel; the MAP label is the refined mask.
    """
    if dcrf is None:
        raise ImportError(CRF_EXTRA_HINT)
    height, width = mask.shape
    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.setUnaryEnergy(softmax_unary(mask))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy,
        srgb=bilateral_srgb,
        # The Cython binding takes a writable C-contiguous buffer (a PIL array is read-only).
        rgbim=np.require(image, dtype=np.uint8, requirements=["C", "W"]),
        compat=bilateral_compat,
    )
    q = np.asarray(crf.inference(iterations)).reshape(2, height, width)
    # argmax breaks a tie towards label 0 (background), as upstream does.
    return np.asarray(q.argmax(axis=0) == 1)


class GuidedFilter:
    """He et al.'s guided filter with a colour guide (H, W, 3), for filtering many inputs.

    The guide's local means and the inverses of its regularised 3x3 local covariances are
    computed once; each `__call__` then costs a handful of box filters on a (H, W) input.
    """

    def __init__(self, guide: np.ndarray, radius: int, eps: float) -> None:
        self.size = 2 * radius + 1
        self.guide = np.asarray(guide, dtype=np.float64) / 255.0
        self.mean_i = self.box(self.guide)
        products = self.guide[..., :, None] * self.guide[..., None, :]
        cov = self.box(products) - self.mean_i[..., :, None] * self.mean_i[..., None, :]
        self.inv_cov = np.linalg.inv(cov + eps * np.eye(3))

    def box(self, x: np.ndarray) -> np.ndarray:
        """Mean over a (2r+1)^2 window of each (H, W) plane of `x` (trailing axes kept)."""
        window = (self.size, self.size) + (1,) * (x.ndim - 2)
        return np.asarray(ndimage.uniform_filter(x, size=window, mode="reflect"))

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """Float (H, W) input -> float (H, W) output, locally a linear function of the guide."""
        mean_p = self.box(p)
        cov_ip = self.box(self.guide * p[..., None]) - self.mean_i * mean_p[..., None]
        a = np.einsum("hwij,hwj->hwi", self.inv_cov, cov_ip)
        b = mean_p - np.einsum("hwi,hwi->hw", a, self.mean_i)
        return np.einsum("hwi,hwi->hw", self.box(a), self.guide) + self.box(b)


def guided_refine(
    image: np.ndarray,
    mask: np.ndarray,
    iterations: int,
    compat: float,
    radius: int,
    eps: float,
) -> np.ndarray:
    """Cheap stand-in for the dense CRF: mean-field-like updates with a guided filter, bool out.

    Each of `iterations` steps sets q = sigmoid(u + compat * (2 * G(q) - 1)), with u = 2m - 1
    the log-odds of the same softmax([1 - m, m]) unary and G the guided filter of q with the
    image as guide: a binary Potts message in which the edge-aware guided filter stands for
    the CRF's bilateral kernel. Output q > 0.5. It is *not* the dense CRF: its kernel is a
    box of side 2 * radius + 1, not a Gaussian, and colour is compared through local linear
    models (eps on [0, 1] intensities) rather than per pixel pair.
    """
    unary = 2.0 * np.asarray(mask, dtype=np.float64) - 1.0
    filt = GuidedFilter(image, radius, eps)
    q = np.asarray(mask, dtype=np.float64)
    for _ in range(iterations):
        logit = unary + compat * (2.0 * filt(q) - 1.0)
        q = 0.5 * (1.0 + np.tanh(0.5 * logit))  # sigmoid, overflow-free
    return np.asarray(q > 0.5)


def crf_refine(
    image: np.ndarray,
    mask: np.ndarray,
    iterations: int = 10,
    gaussian_sxy: float = 3,
    gaussian_compat: float = 7,
    bilateral_sxy: float = 50,
    bilateral_srgb: float = 5,
    bilateral_compat: float = 10,
    backend: str = "auto",
    guided_radius: int = 8,
    guided_eps: float = 1e-3,
) -> np.ndarray:
    """Snap a bool mask (H, W) to the edges of uint8 RGB `image` (H, W, 3): bool (H, W).

    backend: "densecrf" (the published dense CRF; ImportError naming the extra when it is not
    installed), "guided" (`guided_refine`, using `iterations`, `bilateral_compat`,
    `guided_radius` and `guided_eps`), "none" (the mask unchanged), or "auto" (densecrf when
    installed, else guided). The guided defaults: a radius of one ViT-B/8 patch, because a
    patch-snapped edge is off by at most a patch; eps 1e-3 keeps edges of ~0.03 contrast.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask shape {mask.shape} does not match image {image.shape[:2]}")
    mask = np.asarray(mask, dtype=bool)
    chosen = resolve_backend(backend)
    if chosen == "densecrf":
        return densecrf_refine(
            image,
            mask,
            iterations,
            gaussian_sxy,
            gaussian_compat,
            bilateral_sxy,
            bilateral_srgb,
            bilateral_compat,
        )
    if chosen == "guided":
        return guided_refine(image, mask, iterations, bilateral_compat, guided_radius, guided_eps)
    return mask.copy()


def refine_mask(
    image: np.ndarray,
    mask: np.ndarray,
    backend: str = "auto",
    min_iou: float = 0.5,
    **crf_params: Any,
) -> np.ndarray | None:
    """Refine an upsampled pseudo mask, bool (H, W), on its uint8 RGB frame (H, W, 3).

    Upstream order (CutLER maskcut.py): CRF, fill holes of the CRF output, then compare with
    the mask before the CRF. Returns None (drop the mask) when that IoU is below `min_iou`,
    including when either mask is empty. `crf_params` go to `crf_refine`.
    """
    refined = fill_holes(crf_refine(image, mask, backend=backend, **crf_params))
    if not refined.any() or mask_iou(mask, refined) < min_iou:
        return None
    return refined
