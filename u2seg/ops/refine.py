"""Refinement of MaskCut pseudo masks (docs/method.md stage 2, step 7): pure array functions.

A patch mask is upsampled to the square MaskCut frame (480x480), refined so that its edges
follow the image (dense CRF, or a cheap guided-filter fallback), hole-filled, dropped when the
refinement changed it too much and resized back to the photo's own size. Every mask of an
image goes through each step together, as one tensor on the ViT's device (the GPU's, when it
has one): no per-mask host loop between the ViT and the COCO encoding. No file I/O; the COCO
encoding of the result (step 8) is `u2seg.data.coco`.

The dense CRF has two implementations with the same model and inference: "torch"
(`lattice_crf_refine`: every mask of an image in one pass, on the ViT's device, CPU or GPU;
no extra needed) and "densecrf", pydensecrf's C++ (the optional extra `crf`, package
`pydensecrf2`, module `pydensecrf`), one mask at a time on the CPU. They give the same masks
(mean IoU 1.0 on the demo photos, `benchmarks/maskcut.py --sections refine`). The guided
filter is *not* the dense CRF: a cheaper edge snap, kept as an option.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from u2seg.ops.lattice import PermutohedralLattice

# The one guarded import of the optional C++ dense CRF (built from source by `pip install
# 'u2seg[crf]'`); everything else asks `has_densecrf`.
try:
    import pydensecrf.densecrf as dcrf

    has_densecrf = True
except ImportError:
    dcrf = None
    has_densecrf = False


BACKENDS = ("auto", "torch", "densecrf", "guided", "none")


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF settings: mean-field iterations, the Gaussian (smoothness) kernel's sxy and
    compat, the bilateral (appearance) kernel's sxy, srgb and compat. The defaults are
    MaskCut's (docs/method.md stage 2); the stuff labels use STEGO's
    (`u2seg.ops.stuff.STEGO_CRF`)."""

    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 7.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0


MASKCUT_CRF = CRFParams()


CRF_EXTRA_HINT = (
    "backend 'densecrf' needs the optional extra `crf` (package pydensecrf2): "
    "pip install 'u2seg[crf]', or pick backend='torch' (the same dense CRF in torch, "
    "no extra needed)"
)


def upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask (h, w) to bool (H, W) = `size`.

    Source index floor(i * h / H), the rule of torch's `interpolate(mode="nearest")`, so a
    60x60 patch mask becomes exact 8x8 blocks of the 480x480 frame.
    """
    return upsample_masks(torch.from_numpy(np.asarray(mask, dtype=bool))[None], size)[0].numpy()


def upsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`upsample_mask` of a stack: bool (K, h, w) -> bool (K, H, W), on the masks' device."""
    frames = F.interpolate(masks[:, None].to(torch.uint8), size=size, mode="nearest")
    return frames[:, 0].bool()


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize bool masks (K, H, W) to bool (K, H2, W2) = `size`: bilinear on float, then > 0.5,
    on the masks' device.

    Antialiased (the kernel widens when shrinking, as Pillow's bilinear), so a thin part of
    a mask fades by its coverage instead of being sampled at a few points.
    """
    if len(masks) == 0:
        return masks.new_zeros((0, *size))
    values = F.interpolate(
        masks[:, None].float(), size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return values[:, 0] > 0.5


#: 4-connected neighbours within each mask of a (K, H, W) stack, none across masks.
_PLANE_CROSS = np.pad(ndimage.generate_binary_structure(2, 1)[None], ((1, 1), (0, 0), (0, 0)))


def _spread(reach: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Along the last axis of bool (..., L) stacks: every run of `free` pixels that holds a
    `reach` pixel, whole."""
    length = free.shape[-1]
    run = torch.cumsum(~free, dim=-1)  # the pixels of one free run share their count
    lines = run[..., 0].numel()
    run += torch.arange(lines, device=free.device).view(*free.shape[:-1], 1) * (length + 1)
    hit = torch.zeros(lines * (length + 1), dtype=torch.bool, device=free.device)
    hit[run[reach]] = True
    return free & hit[run]


def fill_holes_by_runs(masks: torch.Tensor) -> torch.Tensor:
    """`fill_holes` in tensor operations, for accelerators: the background reached from the
    frame's border grows by whole runs of background pixels, along rows then columns, until
    it stops (as many rounds as the longest path to a background pixel has turns); every
    other pixel is the mask or a hole. The same 4-connectivity as scipy's."""
    free = ~masks
    border = torch.zeros_like(free)
    border[:, [0, -1], :] = True
    border[:, :, [0, -1]] = True
    reach = free & border
    while True:
        grown = _spread(reach, free)
        grown = _spread(grown.transpose(1, 2), free.transpose(1, 2)).transpose(1, 2)
        if torch.equal(grown, reach):
            return ~grown
        reach = grown


def fill_holes(masks: torch.Tensor) -> torch.Tensor:
    """Bool masks (K, H, W) with every background region not 4-connected to the border
    filled, on the masks' device: scipy's `binary_fill_holes` on the CPU (the whole stack in
    one call, faster there), `fill_holes_by_runs` elsewhere."""
    if masks.device.type != "cpu":
        return fill_holes_by_runs(masks)
    filled = ndimage.binary_fill_holes(masks.numpy(), structure=_PLANE_CROSS)
    return torch.from_numpy(np.asarray(filled, dtype=bool))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of the same shape; 0.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def resolve_backend(backend: str) -> str:
    """The concrete backend for `backend`: "auto" is "torch" (always installed, the same
    masks as "densecrf" and faster). Raises ImportError naming the extra when "densecrf" is
    asked for and missing."""
    if backend not in BACKENDS:
        raise ValueError(f"refine backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "torch"
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


@functools.lru_cache(maxsize=4)
def _pixel_positions(height: int, width: int, device: str) -> torch.Tensor:
    """(H * W, 2) float32 pixel coordinates (x, y) in row-major order, as pydensecrf's."""
    rows, cols = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([cols, rows], dim=-1).reshape(-1, 2)


@functools.lru_cache(maxsize=4)
def _spatial_lattice(height: int, width: int, sxy: float, device: str) -> PermutohedralLattice:
    """The lattice of the Gaussian kernel, which depends on the frame size only: built once
    per size and device (a quarter of the CRF's set-up time per image)."""
    return PermutohedralLattice(_pixel_positions(height, width, device) / sxy)


def lattice_crf_refine(
    image: np.ndarray, masks: torch.Tensor, params: CRFParams = MASKCUT_CRF
) -> torch.Tensor:
    """The dense CRF of `densecrf_refine` in torch, for K masks of one image at once.

    The same model and inference as pydensecrf's: unary `softmax_unary`, a Gaussian and a
    bilateral Potts kernel, both filtered on a permutohedral lattice
    (`u2seg.ops.lattice`) with symmetric normalisation (message n * K(n * Q), n = K(1)^-1/2),
    and mean-field updates Q <- softmax(-U + sum_m compat_m * message_m). With two labels the
    update is one logit per pixel, u + sum_m compat_m * n_m (2 K_m(n_m q) - K_m(n_m)), u = 2m - 1
    and q the foreground marginal; the lattices and K_m(n_m) are built once per image and
    every mask of the image is a channel of the same filter calls, on the masks' device.

    Args:
        image: uint8 RGB (H, W, 3).
        masks: bool (K, H, W), on the device the CRF runs on (the ViT's).

    Returns:
        bool (K, H, W) on the masks' device: q > 0.5 (a tie goes to the background, as
        pydensecrf's argmax).
    """
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be (K, H, W) of the image's size, got {masks.shape}")
    if len(masks) == 0:
        return masks.clone()
    device = masks.device
    height, width = image.shape[:2]
    position = _pixel_positions(height, width, str(device))
    colour = torch.from_numpy(np.array(image, dtype=np.float32).reshape(-1, 3)).to(device)
    p = params
    kernels = [
        (_spatial_lattice(height, width, p.gaussian_sxy, str(device)), p.gaussian_compat),
        (
            PermutohedralLattice(
                torch.cat([position / p.bilateral_sxy, colour / p.bilateral_srgb], dim=-1)
            ),
            p.bilateral_compat,
        ),
    ]
    ones = position.new_ones(1, height * width)
    normalised = []
    for lattice, compat in kernels:
        norm = 1.0 / torch.sqrt(lattice.filter(ones) + 1e-20)
        normalised.append((lattice, compat, norm, lattice.filter(norm)))
    fg = masks.reshape(len(masks), -1).float()  # (K, N)
    unary = 2.0 * fg - 1.0
    q = torch.sigmoid(unary)
    for _ in range(p.iterations):
        logit = unary.clone()
        for lattice, compat, norm, filtered_norm in normalised:
            logit += compat * norm * (2.0 * lattice.filter(norm * q) - filtered_norm)
        q = torch.sigmoid(logit)
    return (q > 0.5).reshape(masks.shape)


def densecrf_refine(
    image: np.ndarray, mask: np.ndarray, params: CRFParams = MASKCUT_CRF
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
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        # The Cython binding takes a writable C-contiguous buffer (a PIL array is read-only).
        rgbim=np.require(image, dtype=np.uint8, requirements=["C", "W"]),
        compat=params.bilateral_compat,
    )
    q = np.asarray(crf.inference(params.iterations)).reshape(2, height, width)
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
    masks: np.ndarray,
    params: CRFParams = MASKCUT_CRF,
    backend: str = "auto",
    guided_radius: int = 8,
    guided_eps: float = 1e-3,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Snap bool masks to the edges of uint8 RGB `image` (H, W, 3): one mask (H, W) or a
    stack (K, H, W) of the image's masks; bool of the same shape.

    backend: "torch" (`lattice_crf_refine`, the whole stack at once on `device`),
    "densecrf" (the C++ dense CRF, mask by mask; ImportError naming the extra when it is not
    installed), "guided" (`guided_refine`, using the iterations and bilateral compat of
    `params`, `guided_radius` and `guided_eps`), "none" (the masks unchanged), or "auto" ("torch").
    The guided defaults: a radius of one ViT-B/8 patch, because a patch-snapped edge is off
    by at most a patch; eps 1e-3 keeps edges of ~0.03 contrast.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim not in (2, 3) or masks.shape[-2:] != image.shape[:2]:
        raise ValueError(f"mask shape {masks.shape} does not match image {image.shape[:2]}")
    stack = masks.reshape(-1, *image.shape[:2])
    chosen = resolve_backend(backend)
    if chosen == "torch":
        out = lattice_crf_refine(image, torch.from_numpy(stack).to(device), params).cpu().numpy()
    elif chosen == "densecrf":
        out = np.stack([densecrf_refine(image, m, params) for m in stack])
    elif chosen == "guided":
        p = params
        out = np.stack(
            [
                guided_refine(image, m, p.iterations, p.bilateral_compat, guided_radius, guided_eps)
                for m in stack
            ]
        )
    else:
        out = stack.copy()
    return out.reshape(masks.shape)


def refine_stack(
    image: np.ndarray,
    masks: torch.Tensor,
    backend: str = "auto",
    min_iou: float = 0.5,
    params: CRFParams = MASKCUT_CRF,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine the upsampled pseudo masks of one uint8 RGB frame (H, W, 3), every mask at
    once on their device: bool (K, H, W) -> (refined bool (K, H, W), kept bool (K,)).

    Upstream order (CutLER maskcut.py): CRF, fill holes of the CRF output, then compare with
    the mask before the CRF; not kept (the mask is dropped) when that IoU is below `min_iou`,
    including when either mask is empty. The "torch" CRF runs on the masks' device; the
    other backends are host code, mask by mask.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be a stack (K, H, W), got shape {tuple(masks.shape)}")
    if resolve_backend(backend) == "torch":
        crf = lattice_crf_refine(image, masks, params)
    else:
        crf = torch.from_numpy(crf_refine(image, masks.cpu().numpy(), params, backend))
    refined = fill_holes(crf.to(masks.device))
    inter = (refined & masks).flatten(1).sum(1).double()
    union = (refined | masks).flatten(1).sum(1).double()
    kept = refined.flatten(1).any(1) & (inter >= min_iou * union)
    return refined, kept
