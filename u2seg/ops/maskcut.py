"""Stage 2, MaskCut: iterated normalized cuts of one image's patch graph (pure numeric core).

For patch features F (h, w, d) of one image, each round builds the graph of docs/method.md stage 2,

    A_ij = 1 if cos(f_i, f_j) > tau else eps (eps = 1e-5),   D = diag(A 1),

takes the Fiedler vector of (D - A) x = lambda D x, splits it at its mean, keeps the 4-connected
component of the foreground side that holds the seed patch, and masks the covered patches out
before the next round. :func:`maskcut` called as ``maskcut(features, n_masks, tau)`` follows the
published CutLER code rule for rule; the keyword options (defaults = published) fix the ways it
degenerates on DINOv2 features, whose patches are all alike (last-block keys of the packaged
ViT-S/14 on the demo photos: least pair cosine 0.51-0.69, mean 0.84-0.91), so that tau = 0.15
makes A all ones, lambda_2 = 1 and the Fiedler vector arbitrary.

Speed. The published code recomputes F F^T and solves a dense 3600 x 3600 generalized ``eigh``
every round. Here the similarity is computed and thresholded once per image and kept as a 0/1
float32 matrix B; covering patches never rewrites it (see :class:`_NormalizedAffinity`), and
the eigenproblem goes through Lanczos with matrix-vector products only (:func:`fiedler_vector`).
On a 60 x 60 grid of 768-d features on 2 CPU cores that is ~0.15-0.25 s per image for N = 3,
against ~8 s for the dense solver (``benchmarks/maskcut_core.py``).

Orientation. An eigenvector has no sign, yet the published corner and seed rules do not give the
same mask for v and -v (they differ when the side holding the peak of |v| has 3 or 4 corners:
the corner rule wins for one sign, the seed rule for the other), so the published mask depends
on the sign LAPACK happens to return. We fix it: the Fiedler vector is oriented so that its
entry of largest magnitude is positive; the seed then always lies on the ``v > mean`` side and
the corner rule has the last word, which is what the rule is for.

Rejection (the upstream quirk). Upstream replaces a rejected mask by zeros and masks out only
that zero mask, so the next round sees the very same graph, finds the same component, compares
it with the empty "previous mask" (IoU 0) and accepts it unless it is too small: an IoU
rejection only delays a mask by one round. Nothing of a rejected component is masked out (the
painting accumulates the zeroed mask). The default, ``mask_rejected=False``, reproduces that
exactly, without recomputing: an unchanged graph has an unchanged Fiedler vector, so it is
reused. ``mask_rejected=True`` is the fix: a rejected component is masked out as well and stays
the "previous mask", so the next round looks elsewhere.

Covered patches (``drop_covered``). Upstream masks a found object out by zeroing its features,
which joins its patches to everything with eps. The covered set is then one loose cluster whose
cut from the rest costs about (uncovered share of the grid): on DINOv2 grids that is usually
the cheapest cut there is, so round 2 finds round 1's object again and the IoU rule rejects it
(6 of the 8 demo photos). ``drop_covered=True`` removes covered patches from the graph instead:
later rounds cut only the patches not yet explained, and the split, the seed and the
foreground rules look at those patches only.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

__all__ = [
    "EPS",
    "FIEDLER_TOL",
    "MaskCutRound",
    "bipartition",
    "cosine_similarity",
    "fiedler_vector",
    "maskcut",
    "maskcut_batch",
    "maskcut_rounds",
    "seed_component",
]

#: Affinity of a pair below the threshold (upstream), so the graph stays connected.
EPS = 1e-5
#: Lanczos stops when the residual norm of the unit Ritz vector is below this (see fiedler_vector).
FIEDLER_TOL = 1e-6
#: Published rejection rules: IoU with the previous mask, and area as a fraction of the grid.
MAX_IOU = 0.5
MIN_AREA = 0.01
# lambda_2 this close to 1: the graph has no structure (constant features, or an affinity
# of all ones), every vector is a Fiedler vector and the "cut" would be a random blob.
NO_STRUCTURE_TOL = 1e-4

Foreground = Literal["corners", "border"]
ArrayLike = NDArray[np.floating] | torch.Tensor

# Lanczos budget: Krylov vectors per cycle, explicit restarts, and how often convergence is
# checked. Checking on a fixed schedule makes an image stop at the same step alone or in a batch.
_KRYLOV_DIM = 96
_MAX_RESTARTS = 9
_CHECK_EVERY = 2
_BREAKDOWN = 1e-10
_START_SEED = 0


@dataclass(frozen=True)
class MaskCutRound:
    """What one MaskCut round found.

    Attributes:
        eigenvalue: Fiedler eigenvalue lambda_2 of (D - A) x = lambda D x, the relaxed
            normalized-cut value of the round's cut (near 0: a clean cut; near 1: no structure).
        component: bool (h, w), the seed's connected component (earlier masks not removed).
        mask: bool (h, w), the mask this round adds (component minus earlier masks), or None
            when the round added nothing.
        status: "accepted", "empty" (accepted but nothing left after removing earlier masks),
            "rejected: iou", "rejected: area", "stopped: ncut" or "stopped: no structure"
            (lambda_2 = 1 within `NO_STRUCTURE_TOL`, first round included; the last round
            run).
        converged: whether Lanczos reached `FIEDLER_TOL` for this round's Fiedler vector;
            False: the best Ritz vector after every restart was used (a cut of a graph
            whose top eigenvalues are too close to tell apart).
    """

    eigenvalue: float
    component: NDArray[np.bool_]
    mask: NDArray[np.bool_] | None
    status: str
    converged: bool = True


@dataclass(frozen=True)
class _Options:
    """The validated keyword options of :func:`maskcut`."""

    center: bool = False
    tau_quantile: float | None = None
    foreground: Foreground = "corners"
    max_ncut: float | None = None
    mask_rejected: bool = False
    drop_covered: bool = False

    def __post_init__(self) -> None:
        if self.foreground not in ("corners", "border"):
            raise ValueError(f"foreground must be 'corners' or 'border', got {self.foreground!r}")
        if self.tau_quantile is not None and not 0.0 <= self.tau_quantile <= 1.0:
            raise ValueError(f"tau_quantile must be in [0, 1], got {self.tau_quantile}")
        if self.max_ncut is not None and self.max_ncut < 0:
            raise ValueError(f"max_ncut must be >= 0, got {self.max_ncut}")


# --------------------------------------------------------------------------
# Graph
# --------------------------------------------------------------------------


def _as_tensor(features: ArrayLike) -> torch.Tensor:
    """numpy or torch features -> float32 tensor on the input's device."""
    if isinstance(features, torch.Tensor):
        return features if features.dtype == torch.float32 else features.float()
    # Copies read-only arrays too: torch warns about (and could write to) shared ones.
    return torch.from_numpy(np.require(features, np.float32, ["C", "W"]))


@contextlib.contextmanager
def _full_float32_matmul() -> Iterator[None]:
    """Run float32 products in full precision. With TF32 (CUDA) or bf16 (oneDNN CPU) enabled
    globally, cosines near tau would cross the threshold and the matrix-vector products would
    keep only ~3 digits of the Fiedler vector."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def cosine_similarity(features: ArrayLike, center: bool = False) -> torch.Tensor:
    """Cosine similarity of all patch pairs.

    Args:
        features: (h, w, d) or (B, h, w, d) patch features, numpy or torch (any device).
        center: subtract each image's mean feature first (robust option).

    Returns:
        float32 (n, n) or (B, n, n) tensor, n = h * w, patches in row-major order.
    """
    x = _as_tensor(features)
    if x.ndim not in (3, 4):
        raise ValueError(f"expected features (h, w, d) or (B, h, w, d), got {tuple(x.shape)}")
    x = x.flatten(-3, -2)
    if center:
        x = x - x.mean(dim=-2, keepdim=True)
    # Same normalisation as upstream (F.normalize): a zero feature stays zero.
    x = torch.nn.functional.normalize(x, dim=-1)
    if x.ndim == 2:
        with _full_float32_matmul():
            return x @ x.T
    # One product per image, never a batched one: the same kernel as for a single image,
    # so a batch gives bit-identical similarities (batched GEMMs may sum in another order,
    # and a cosine one ulp from tau would change the graph).
    out = x.new_empty(x.shape[0], x.shape[1], x.shape[1])
    with _full_float32_matmul():
        for image, feats in enumerate(x):
            torch.mm(feats, feats.T, out=out[image])
    return out


def _pair_values(similarity: torch.Tensor) -> torch.Tensor:
    """(B, n, n) -> (B, n (n - 1) / 2): the entries i < j, row by row (row slices are
    contiguous: several times faster than a boolean-mask gather)."""
    n = similarity.shape[-1]
    return torch.cat([similarity[:, i, i + 1 :] for i in range(n - 1)], dim=-1)


def _thresholds(similarity: torch.Tensor, tau: float, tau_quantile: float | None) -> torch.Tensor:
    """Per-image threshold, (B,) float32, for a (B, n, n) similarity.

    With `tau_quantile` q: the order statistic of rank floor(q (m - 1)) among the m pairs
    i < j, i.e. ``np.quantile(pairs, q, method="lower")``: an actual similarity value.
    """
    batch, n = similarity.shape[0], similarity.shape[-1]
    if tau_quantile is None or n < 2:
        return torch.full((batch,), tau, dtype=similarity.dtype, device=similarity.device)
    pairs = _pair_values(similarity)
    rank = math.floor(tau_quantile * (pairs.shape[-1] - 1))
    if pairs.device.type != "cpu":
        return torch.kthvalue(pairs, rank + 1, dim=-1).values
    # On CPU numpy's introselect, in place on the fresh `pairs`, is about twice as fast as
    # torch.kthvalue, for the same value.
    rows = pairs.numpy()
    for row in rows:
        row.partition(rank)
    return torch.from_numpy(rows[:, rank].copy())


class _NormalizedAffinity:
    """The operator M = D^-1/2 A D^-1/2 of a batch of graphs, applied without forming A.

    With B the cached 0/1 matrix (similarity > tau) and p the 0/1 vector of uncovered patches,
    A = eps 1 1^T + (1 - eps) P B P, P = diag(p): a covered patch is joined to everything with
    eps, which is what zeroing its feature does upstream (its cosine 0 is below any tau >= 0; for
    tau < 0, never published, upstream would join it to everything with 1 instead). So
    A y = eps sum(y) + (1 - eps) p * (B (p * y)): one float32 matrix-vector product, and
    covering patches costs only an update of the row counts r = B p (no pass over B).
    """

    def __init__(self, adjacency: torch.Tensor, drop_covered: bool = False) -> None:
        self.adjacency = adjacency  # (B, n, n) float32, exactly 0 or 1
        # drop_covered: A = P (eps 1 1^T + (1 - eps) B) P, covered patches leave the graph.
        self.drop_covered = drop_covered
        batch, n = adjacency.shape[0], adjacency.shape[-1]
        self.uncovered = torch.ones(batch, n, dtype=torch.float64, device=adjacency.device)
        # Counts of 0/1 entries are exact in float32 (below 2^24); a product reads B once.
        self.row_counts = self._product(torch.ones_like(self.uncovered))

    def _product(self, y: torch.Tensor) -> torch.Tensor:
        """B y for (B, n) float64 vectors, in float32. One matrix-vector product per image
        rather than a bmm: bit-identical results whatever the batch (a batched kernel may sum
        in another order), and on CPU a bmm of 8 vectors is ~2.5x slower than 8 gemv."""
        y32 = y.to(self.adjacency.dtype)
        return torch.stack([a @ v for a, v in zip(self.adjacency, y32, strict=True)]).double()

    def cover(self, image: int, patches: NDArray[np.bool_]) -> bool:
        """Mask out the (n,) bool `patches` of one image; False when all were covered already
        (the graph is unchanged)."""
        fresh = torch.as_tensor(patches, device=self.adjacency.device) & (self.uncovered[image] > 0)
        if not bool(fresh.any()):
            return False
        self.row_counts[image] -= (self.adjacency[image] @ fresh.to(self.adjacency.dtype)).double()
        self.uncovered[image, fresh] = 0.0
        return True

    def degrees(self) -> torch.Tensor:
        """(B, n) float64 row sums of A (0 for a dropped patch)."""
        if self.drop_covered:
            live = self.uncovered.sum(dim=-1, keepdim=True)
            return self.uncovered * (EPS * live + (1.0 - EPS) * self.row_counts)
        n = self.uncovered.shape[-1]
        return EPS * n + (1.0 - EPS) * self.uncovered * self.row_counts

    def matvec(self, y: torch.Tensor, inv_sqrt_degree: torch.Tensor) -> torch.Tensor:
        """M y for a (B, n) float64 batch of vectors."""
        x = inv_sqrt_degree * y
        bx = self._product(self.uncovered * x)
        if self.drop_covered:
            total = (self.uncovered * x).sum(dim=-1, keepdim=True)
            ax = self.uncovered * (EPS * total + (1.0 - EPS) * bx)
        else:
            ax = EPS * x.sum(dim=-1, keepdim=True) + (1.0 - EPS) * self.uncovered * bx
        return inv_sqrt_degree * ax


# --------------------------------------------------------------------------
# Fiedler vector
# --------------------------------------------------------------------------


def _start_vectors(batch: int, n: int, device: torch.device) -> torch.Tensor:
    """The same pseudo-random (n,) start vector for every image: reproducible, and an image's
    result does not depend on the batch it is in."""
    generator = torch.Generator().manual_seed(_START_SEED)
    start = torch.randn(n, generator=generator, dtype=torch.float64)
    return start.to(device).expand(batch, n).clone()


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """(B, k) diagonal and (B, k - 1) off-diagonal -> (B, k, k) symmetric tridiagonal."""
    return (
        torch.diag_embed(alpha)
        + torch.diag_embed(beta, offset=1)
        + torch.diag_embed(beta, offset=-1)
    )


def _lanczos_largest(
    op: _NormalizedAffinity,
    inv_sqrt_degree: torch.Tensor,
    known: torch.Tensor,
    tol: float,
    support: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest eigenpair of M restricted to the complement of its `known` top eigenvector.

    Lanczos with full reorthogonalisation (twice, against `known` and every basis vector) in
    float64, explicitly restarted from the current Ritz vector when a cycle of _KRYLOV_DIM
    vectors has not converged. An image's pair is taken at the first check where its residual
    norm |beta_k s_k| <= tol (or the Krylov space became invariant).

    Args:
        known: (B, n) float64 unit vectors to deflate.
        support: (B, n) 0/1 float64, the coordinates the search stays on (the patches still
            in the graph when covered ones are dropped; their eigenvalue-0 directions must not
            enter the Krylov space).

    Returns:
        eigenvalues (B,) float64, unit eigenvectors (B, n) float64, and (B,) bool: whether
        each image's pair converged (else it is the best Ritz pair of the last cycle).
    """
    batch, n = known.shape
    dim = min(_KRYLOV_DIM, n - 1)
    start = _start_vectors(batch, n, known.device)
    values = torch.zeros(batch, dtype=torch.float64, device=known.device)
    vectors = torch.zeros(batch, n, dtype=torch.float64, device=known.device)
    done = torch.zeros(batch, dtype=torch.bool, device=known.device)

    def project(w: torch.Tensor) -> torch.Tensor:
        if support is not None:
            w = support * w
        return w - known * (known * w).sum(dim=-1, keepdim=True)

    for _ in range(_MAX_RESTARTS + 1):
        basis = torch.zeros(batch, dim + 1, n, dtype=torch.float64, device=known.device)
        alpha = torch.zeros(batch, dim, dtype=torch.float64, device=known.device)
        beta = torch.zeros(batch, dim, dtype=torch.float64, device=known.device)
        q = project(start)
        basis[:, 0] = q / q.norm(dim=-1, keepdim=True)
        broken = torch.zeros(batch, dtype=torch.bool, device=known.device)
        for j in range(dim):
            w = project(op.matvec(basis[:, j], inv_sqrt_degree))
            alpha[:, j] = (w * basis[:, j]).sum(dim=-1)
            for _ in range(2):  # "twice is enough" (Kahan-Parlett) for orthogonality
                coef = torch.einsum("bkn,bn->bk", basis[:, : j + 1], w)
                w = project(w - torch.einsum("bkn,bk->bn", basis[:, : j + 1], coef))
            beta[:, j] = w.norm(dim=-1)
            newly_broken = ~broken & (beta[:, j] <= _BREAKDOWN)
            broken |= newly_broken
            # A broken image continues on a zero vector: harmless, its result is already final.
            basis[:, j + 1] = torch.where(
                broken[:, None], torch.zeros_like(w), w / beta[:, j, None].clamp_min(_BREAKDOWN)
            )
            scheduled = (j + 1) % _CHECK_EVERY == 0 or j + 1 == dim
            eligible = ~done & (newly_broken | scheduled)
            if not bool(eligible.any()):
                continue
            evals, evecs = torch.linalg.eigh(_tridiagonal(alpha[:, : j + 1], beta[:, :j]))
            ritz = evecs[:, :, -1]
            res = (beta[:, j] * ritz[:, -1]).abs()
            take = eligible & ((res <= tol) | newly_broken | (j + 1 == dim))
            if bool(take.any()):
                y = torch.einsum("bkn,bk->bn", basis[:, : j + 1], ritz)
                y = y / y.norm(dim=-1, keepdim=True)
                values = torch.where(take, evals[:, -1], values)
                vectors = torch.where(take[:, None], y, vectors)
                done |= eligible & ((res <= tol) | newly_broken)
                start = torch.where(take[:, None] & ~done[:, None], y, start)
            if bool(done.all()):  # no restart: cycles only for pairs not yet converged
                return values, vectors, done
    return values, vectors, done


def _fiedler_batch(
    op: _NormalizedAffinity, tol: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """Oriented Fiedler vectors (B, n), eigenvalues (B,) and whether each converged (B,)
    of the graphs held by `op`."""
    degree = op.degrees()
    support = op.uncovered if op.drop_covered else None
    if support is not None:
        # An image with every patch dropped rides along in the batch on a dummy graph (its
        # result is discarded) rather than turning the batched products into NaN.
        gone = degree.sum(dim=-1, keepdim=True) == 0
        degree = torch.where(gone, 1.0, degree)
        support = torch.where(gone, 1.0, support)
    sqrt_degree = degree.sqrt()
    # Dropped patches have degree 0: they stay at 0 in every vector.
    inv_sqrt_degree = torch.where(degree > 0, 1.0 / sqrt_degree.clamp_min(1e-300), 0.0)
    # D^1/2 1 is the eigenvector of M with eigenvalue 1 (the trivial x = 1 of the pencil).
    known = sqrt_degree / sqrt_degree.norm(dim=-1, keepdim=True)
    mu, y, converged = _lanczos_largest(op, inv_sqrt_degree, known, tol, support)
    x = (y * inv_sqrt_degree).cpu().numpy()  # D^-1/2 y: x^T D x = 1, as eigh normalises
    peak = np.abs(x).argmax(axis=-1)
    x *= np.where(x[np.arange(len(x)), peak] < 0, -1.0, 1.0)[:, None]
    return x, (1.0 - mu).cpu().numpy(), converged.cpu().numpy()


def fiedler_vector(
    similarity: ArrayLike,
    tau: float,
    covered: NDArray[np.bool_] | None = None,
    tol: float = FIEDLER_TOL,
) -> tuple[NDArray[np.float64], float]:
    """Fiedler vector of the MaskCut graph of one image.

    The pencil (D - A) x = lambda D x is solved in its symmetric normalised form: with
    y = D^1/2 x it becomes M y = (1 - lambda) y, M = D^-1/2 A D^-1/2, whose top eigenvector is
    known, D^1/2 1 (lambda = 0). That vector is deflated (projected out of every Lanczos vector)
    and the largest remaining eigenpair of M is found by Lanczos with full reorthogonalisation
    on float32 matrix-vector products and float64 everything else; x = D^-1/2 y.

    Why Lanczos: only products with the cached 0/1 matrix are needed (2-3 ms each for n = 3600
    on 2 CPU cores; a batch advances in lock-step, one product per image and step), and these
    graphs have a large gap below lambda_2, so 6-12 products suffice; a dense eigh is O(n^3)
    per round.

    Tolerance: the residual norm ||M y - mu y|| of the unit Ritz vector is at most `tol`
    (default 1e-6; M's eigenvalues lie in [-1, 1]), checked every 2 steps, so the angle to the
    exact vector is at most tol / gap, gap = distance from mu to the rest of M's spectrum (about
    0.5 on the DINOv2 grids of the benchmark, where 1 - |cos| to the dense eigh is below 1e-8
    and lambda_2 agrees to 1e-7, the float32 product's precision). Where the graph falls apart
    into pieces joined only by eps edges, several eigenvalues lie ~eps apart and which vector
    of that cluster comes out is arbitrary, for the dense eigh too; where A is constant (tau
    below every cosine) every vector is a Fiedler vector and lambda_2 = 1.

    Args:
        similarity: (n, n) cosine similarity (:func:`cosine_similarity`), numpy or torch.
        tau: pairs with similarity > tau get affinity 1, the others eps.
        covered: (n,) bool patches masked out by earlier rounds (affinity eps to everything).
        tol: Lanczos residual tolerance.

    Returns:
        x (n,) float64 with x^T D x = 1, oriented so that its entry of largest magnitude is
        positive, and its eigenvalue lambda_2. A RuntimeWarning says when Lanczos did not
        reach `tol` (the loop records it per round instead: `MaskCutRound.converged`).
    """
    sim = _as_tensor(similarity)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"expected a square (n, n) similarity, got {tuple(sim.shape)}")
    with _full_float32_matmul():
        op = _NormalizedAffinity((sim > tau).float().unsqueeze(0))
        if covered is not None:
            op.cover(0, np.asarray(covered, dtype=bool).reshape(-1))
        x, lam, converged = _fiedler_batch(op, tol)
    if not converged[0]:
        warnings.warn(
            f"Fiedler vector: Lanczos did not reach residual {tol:.0e}; the best Ritz vector "
            "is returned",
            RuntimeWarning,
            stacklevel=2,
        )
    return x[0], float(lam[0])


# --------------------------------------------------------------------------
# Rules on the patch grid
# --------------------------------------------------------------------------


def _border(shape: tuple[int, int]) -> NDArray[np.bool_]:
    """bool (h, w), true on the outermost ring of patches."""
    ring = np.ones(shape, dtype=bool)
    ring[1:-1, 1:-1] = False
    return ring


def bipartition(
    vector: NDArray[np.floating],
    foreground: Foreground = "corners",
    valid: NDArray[np.bool_] | None = None,
) -> tuple[NDArray[np.bool_], tuple[int, int]]:
    """Split the patch grid at the mean of the Fiedler vector and pick the foreground side.

    "corners" (published): the side v > mean is flipped when it holds 3 or 4 of the 4 corner
    patches, otherwise only when it does not hold the seed argmax |v|. "border": the side that
    holds fewer of the border patches is the foreground (the background is the side that
    touches the frame); a tie keeps the side v > mean.

    Args:
        vector: (h, w) Fiedler vector on the patch grid.
        foreground: the rule that decides which side is the object.
        valid: bool (h, w), the patches still in the graph (default all); the mean, both
            sides, the corners, the border and the seed are taken over these only.

    Returns:
        bool (h, w) foreground side and the seed patch (row, col): argmax v, or argmax -v after
        a flip, which always lies in the foreground side.
    """
    v = np.asarray(vector, dtype=np.float64)
    if valid is None:
        valid = np.ones(v.shape, dtype=bool)
    v = np.where(valid, v, 0.0)
    side = (v > v[valid].mean()) & valid
    if foreground == "corners":
        corners = int(side[0, 0]) + int(side[0, -1]) + int(side[-1, 0]) + int(side[-1, -1])
        peak = np.unravel_index(np.abs(v).argmax(), v.shape)
        flip = corners >= 3 or not side[peak]
    elif foreground == "border":
        ring = _border(v.shape) & valid
        flip = int((side & ring).sum()) > int((~side & ring).sum())
    else:
        raise ValueError(f"foreground must be 'corners' or 'border', got {foreground!r}")
    if flip:
        side, v = ~side & valid, -v
    row, col = np.unravel_index(np.where(valid, v, -np.inf).argmax(), v.shape)
    return side, (int(row), int(col))


def seed_component(partition: NDArray[np.bool_], seed: tuple[int, int]) -> NDArray[np.bool_]:
    """The 4-connected component of `partition` (bool (h, w)) that contains `seed` (row, col);
    bool (h, w), empty when the seed is not in the partition."""
    labels, _ = ndimage.label(partition)  # default structure: 4-connectivity
    label = labels[seed]
    return labels == label if label else np.zeros_like(partition, dtype=bool)


def _iou(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    """IoU of two bool masks; 0 when both are empty (upstream gives NaN, which never rejects)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


# --------------------------------------------------------------------------
# The MaskCut loop
# --------------------------------------------------------------------------


class _ImageState:
    """Per-image bookkeeping of the loop (numpy, CPU)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.union = np.zeros(shape, dtype=bool)  # patches of the returned masks
        self.covered = np.zeros(shape, dtype=bool)  # patches masked out of the graph
        self.previous = np.zeros(shape, dtype=bool)  # what the IoU rule compares with
        self.rounds: list[MaskCutRound] = []
        self.stale = True  # the graph changed since its Fiedler vector was computed
        self.stopped = False
        self.vector: NDArray[np.float64] = np.zeros(shape)
        self.eigenvalue = 0.0
        self.converged = True


def _judge(state: _ImageState, component: NDArray[np.bool_], first: bool) -> str:
    """Published rejection rules (never applied to the first round)."""
    if first:
        return "accepted"
    if _iou(state.previous, component) > MAX_IOU:
        return "rejected: iou"
    if component.sum() <= MIN_AREA * component.size:
        return "rejected: area"
    return "accepted"


def _step(
    state: _ImageState, op: _NormalizedAffinity, image: int, first: bool, opts: _Options
) -> None:
    """Apply the rules to the image's current Fiedler vector and update its graph."""
    valid = ~state.covered if opts.drop_covered else None
    side, seed = bipartition(state.vector, opts.foreground, valid)
    component = seed_component(side, seed)
    if state.eigenvalue >= 1.0 - NO_STRUCTURE_TOL:
        state.rounds.append(
            MaskCutRound(
                state.eigenvalue, component, None, "stopped: no structure", state.converged
            )
        )
        state.stopped = True
        return
    if opts.max_ncut is not None and state.eigenvalue > opts.max_ncut:
        state.rounds.append(
            MaskCutRound(state.eigenvalue, component, None, "stopped: ncut", state.converged)
        )
        state.stopped = True
        return
    status = _judge(state, component, first)
    mask: NDArray[np.bool_] | None = None
    if status == "accepted":
        mask = component & ~state.union
        if not mask.any():
            status, mask = "empty", None
        state.union |= component
    if status == "accepted" or status == "empty" or opts.mask_rejected:
        state.previous = component
        state.covered |= component
        state.stale = op.cover(image, component.reshape(-1))
    else:
        # Upstream: the rejected mask becomes zeros, so nothing is masked out and the next
        # round compares with an empty mask; the graph and its Fiedler vector are unchanged.
        state.previous = np.zeros(state.shape, dtype=bool)
    state.rounds.append(MaskCutRound(state.eigenvalue, component, mask, status, state.converged))


def nonfinite_images(features: ArrayLike) -> list[int]:
    """Indices of the images of a (B, h, w, d) batch whose features hold NaN or inf (a NaN
    patch would otherwise drop out of the graph as if it were masked, without a word)."""
    x = _as_tensor(features)
    return torch.nonzero(~torch.isfinite(x).flatten(1).all(dim=1)).flatten().tolist()


def _run(features: ArrayLike, n_masks: int, tau: float, opts: _Options) -> list[list[MaskCutRound]]:
    """The MaskCut loop over a (B, h, w, d) batch; rounds per image."""
    x = _as_tensor(features)
    if x.ndim != 4:
        raise ValueError(f"expected features (B, h, w, d), got {tuple(x.shape)}")
    bad = nonfinite_images(x)
    if bad:
        raise ValueError(f"features of images {bad[:10]} hold NaN or infinite values")
    if n_masks < 0:
        raise ValueError(f"n_masks must be >= 0, got {n_masks}")
    batch, h, w = int(x.shape[0]), int(x.shape[1]), int(x.shape[2])
    states = [_ImageState((h, w)) for _ in range(batch)]
    if batch == 0 or n_masks == 0 or h * w < 2:
        return [s.rounds for s in states]
    with _full_float32_matmul():
        adjacency = cosine_similarity(x, opts.center)
        taus = _thresholds(adjacency, tau, opts.tau_quantile)
        adjacency.gt_(taus[:, None, None])  # in place: the similarity becomes the 0/1 matrix B
        op = _NormalizedAffinity(adjacency, opts.drop_covered)
        for i in range(n_masks):
            if opts.drop_covered:
                for s in states:  # nothing left to cut
                    s.stopped |= int((~s.covered).sum()) < 2
            live = [b for b, s in enumerate(states) if not s.stopped]
            if not live:
                break
            if any(states[b].stale for b in live):
                _solve(states, op)
            for b in live:
                _step(states[b], op, b, i == 0, opts)
    return [s.rounds for s in states]


def _solve(states: list[_ImageState], op: _NormalizedAffinity) -> None:
    """Fiedler vectors of the images whose graph changed. The others ride along, result
    discarded, rather than copying a sub-batch of the (B, n, n) matrix."""
    vectors, eigenvalues, converged = _fiedler_batch(op, FIEDLER_TOL)
    for b, state in enumerate(states):
        if state.stale and not state.stopped:
            state.vector = vectors[b].reshape(state.shape)
            state.eigenvalue = float(eigenvalues[b])
            state.converged = bool(converged[b])
            state.stale = False


def masks_of(rounds: Sequence[MaskCutRound]) -> list[NDArray[np.bool_]]:
    """The masks the rounds added, in discovery order."""
    return [r.mask for r in rounds if r.mask is not None]


def maskcut_rounds(
    features: ArrayLike,
    n_masks: int = 3,
    tau: float = 0.15,
    *,
    center: bool = False,
    tau_quantile: float | None = None,
    foreground: Foreground = "corners",
    max_ncut: float | None = None,
    mask_rejected: bool = False,
    drop_covered: bool = False,
) -> list[MaskCutRound]:
    """:func:`maskcut` with every round's eigenvalue, component and decision
    (:class:`MaskCutRound`), for diagnostics and threshold tuning."""
    opts = _Options(center, tau_quantile, foreground, max_ncut, mask_rejected, drop_covered)
    return _run(_as_tensor(features).unsqueeze(0), n_masks, tau, opts)[0]


def maskcut(
    features: ArrayLike,
    n_masks: int = 3,
    tau: float = 0.15,
    *,
    center: bool = False,
    tau_quantile: float | None = None,
    foreground: Foreground = "corners",
    max_ncut: float | None = None,
    mask_rejected: bool = False,
    drop_covered: bool = False,
) -> list[NDArray[np.bool_]]:
    """MaskCut on one image's patch features.

    With only the first three arguments this is the published algorithm (module docstring:
    orientation of the Fiedler vector, the rejection quirk, tau < 0).

    Args:
        features: (h, w, d) patch features, numpy or torch on any device.
        n_masks: rounds N (upper bound on the number of masks).
        tau: similarity threshold of the affinity.
        center: subtract the image's mean feature before L2 normalisation.
        tau_quantile: if set, tau is this quantile of the image's pair similarities (i < j,
            "lower" rule), e.g. 0.5; with `center` this is what separates DINOv2 patches.
        foreground: "corners" (published) or "border" (see :func:`bipartition`).
        max_ncut: stop before a round whose Fiedler eigenvalue (the relaxed normalized-cut
            value of its cut) exceeds this; None runs all `n_masks` rounds.
        mask_rejected: also mask out a rejected component (default: upstream, see module doc).
        drop_covered: remove covered patches from the graph instead of joining them to
            everything with eps (see module doc).

    Returns:
        bool (h, w) masks at patch resolution in discovery order, pairwise disjoint, at most
        `n_masks` (rejected and empty rounds add none).
    """
    return masks_of(
        maskcut_rounds(
            features,
            n_masks,
            tau,
            center=center,
            tau_quantile=tau_quantile,
            foreground=foreground,
            max_ncut=max_ncut,
            mask_rejected=mask_rejected,
            drop_covered=drop_covered,
        )
    )


def discovery_score(rank: int) -> float:
    """The score of an image's `rank`-th pseudo mask (0 first) in discovery order, 1 / (1 +
    rank): MaskCut finds the most salient object first, so COCOeval ranks first cuts above
    later ones, across images too, instead of by file order among equal scores."""
    return 1.0 / (1 + rank)


def maskcut_batch(
    features: ArrayLike,
    n_masks: int = 3,
    tau: float = 0.15,
    *,
    center: bool = False,
    tau_quantile: float | None = None,
    foreground: Foreground = "corners",
    max_ncut: float | None = None,
    mask_rejected: bool = False,
    drop_covered: bool = False,
) -> list[list[MaskCutRound]]:
    """:func:`maskcut_rounds` for a batch of same-size grids (B, h, w, d), one list of
    rounds per image (`masks_of` gives an image's masks, `MaskCutRound.converged` whether
    each cut's eigensolver converged).

    Everything numeric stays on the features' device: the Lanczos iterations of the whole
    batch advance in lock-step (the float64 vector work batched; the products with the n x n
    matrices one gemv per image, each reading its matrix once, the same as a bmm on GPU);
    only the cheap grid rules run per image on CPU. Memory: one (B, n, n) float32 matrix
    (3.3 GB for B = 64 on a 60 x 60 grid; the similarity is thresholded in place), plus its
    upper triangle with `tau_quantile`. Each image gets the masks of :func:`maskcut` alone:
    same start vector, per-image convergence checks on a fixed schedule, and the float32
    products, whose rounding would matter, computed per image with the same kernels (only the
    float64 vector work is batched, equal to ~1e-16).
    """
    opts = _Options(center, tau_quantile, foreground, max_ncut, mask_rejected, drop_covered)
    return _run(features, n_masks, tau, opts)
