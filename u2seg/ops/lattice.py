"""Gaussian filtering in a feature space with the permutohedral lattice, in torch.

Adams, Baek and Davis (Eurographics 2010): to compute, for N points with d-dimensional
features f and C values each,

    out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j        (approximately),

the points are lifted onto the (d+1)-dimensional permutohedral lattice, their values splatted
onto the d+1 vertices of the simplex holding them (barycentric weights), blurred along each of
the d+1 lattice axes with the kernel [1/2, 1, 1/2], and sliced back with the same weights.
The cost is linear in N and in the number of lattice vertices in use; the construction
(`PermutohedralLattice(features)`) depends only on the features and is reused for every
`filter` call, e.g. for every mean-field iteration and every mask of an image.

This is the filter of the fully connected CRF (Kraehenbuehl and Koltun 2011) and follows
the conventions of its reference implementation, so that a CRF built on it reproduces that
one: the feature scaling sqrt(2/3) (d+1) / sqrt((i+1)(i+2)), the closest remainder-0 point
by rounding each coordinate, the blur along axes 0..d, and the slicing constant
1 / (1 + 2^-d). Everything is vectorised over points with tensor operations: the hash table
of lattice vertices is `torch.unique` over an integer code of their coordinates, and
neighbour lookups are `searchsorted` in the sorted codes, so the same code runs on CPU and GPU.
"""

from __future__ import annotations

import math

import torch

__all__ = ["PermutohedralLattice"]


class PermutohedralLattice:
    """The lattice of N points with features (N, d); `filter` applies the Gaussian to values.

    Args:
        features: (N, d) float tensor, already divided by the kernel's standard deviations
            (so that the kernel is exp(-|f_i - f_j|^2 / 2)); any device.
    """

    def __init__(self, features: torch.Tensor) -> None:
        if features.ndim != 2 or features.shape[1] < 1:
            raise ValueError(f"features must be (N, d) with d >= 1, got {tuple(features.shape)}")
        n, d = features.shape
        self.n, self.d = int(n), int(d)
        device = features.device
        f = features.float()
        axes = torch.arange(d, device=device, dtype=torch.float32)
        scale = math.sqrt(2.0 / 3.0) * (d + 1) / torch.sqrt((axes + 1.0) * (axes + 2.0))
        cf = f * scale
        # Lift onto the hyperplane sum(x) = 0 of R^(d+1): x_j = sum_{i >= j} cf_i - j cf_{j-1}.
        suffix = torch.cat([cf.flip(-1).cumsum(-1).flip(-1), cf.new_zeros(n, 1)], dim=-1)
        shifted = torch.cat([cf.new_zeros(n, 1), cf], dim=-1)
        steps = torch.arange(d + 1, device=device, dtype=torch.float32)
        elevated = suffix - steps * shifted
        # The closest point whose coordinates are all multiples of d + 1 ("remainder 0").
        v = elevated / (d + 1)
        up, down = torch.ceil(v) * (d + 1), torch.floor(v) * (d + 1)
        rem0 = torch.where(up - elevated < elevated - down, up, down)
        total = torch.round(rem0.sum(dim=-1) / (d + 1)).long()
        # rank_i: the position of coordinate i when the offsets x - rem0 are sorted in
        # decreasing order (ties: the lower index ranks first).
        diff = elevated - rem0
        later = torch.arange(d + 1, device=device)
        tie_first = later[None, :] < later[:, None]  # [i, j]: j < i
        greater = diff[:, None, :] > diff[:, :, None]
        tied = (diff[:, None, :] == diff[:, :, None]) & tie_first
        rank = (greater | tied).sum(dim=-1) + total[:, None]
        # Off the plane: move rem0 by d + 1 where the rank wrapped around.
        low, high = rank < 0, rank > d
        rank = rank + (d + 1) * low - (d + 1) * high
        rem0 = rem0 + (d + 1) * low - (d + 1) * high
        # Barycentric coordinates of the point in its simplex.
        weights = (elevated - rem0) / (d + 1)
        bary = f.new_zeros(n, d + 2)
        bary.scatter_add_(1, d - rank, weights)
        bary.scatter_add_(1, d - rank + 1, -weights)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        self.barycentric = bary[:, : d + 1].T.contiguous()  # (d + 1, N)
        # The d + 1 vertices of the simplex: rem0 plus the canonical simplex's vertex
        # `remainder`, permuted by rank; a vertex is named by its first d coordinates.
        r = torch.arange(d + 1, device=device)
        canonical = torch.where(r[None, :] <= d - r[:, None], r[:, None], r[:, None] - (d + 1))
        keys = rem0.long()[:, None, :d] + canonical[r[None, :, None], rank[:, None, :d]]
        # An integer code per vertex, with room for the +-(d + 1) steps of the blur.
        low_key = keys.amin(dim=(0, 1)) - (d + 1)
        span = keys.amax(dim=(0, 1)) - low_key + (d + 2)
        if float(torch.log2(span.double()).sum()) > 62:
            raise ValueError("features span too large a lattice for 64-bit vertex codes")
        strides = torch.cumprod(torch.cat([span.new_ones(1), span[:-1]]), dim=0)
        codes = ((keys - low_key) * strides).sum(dim=-1)
        vertices, inverse = torch.unique(codes, sorted=True, return_inverse=True)
        self.offsets = inverse.reshape(n, d + 1).T.contiguous()  # (d + 1, N) vertex ids
        self.m = int(vertices.numel())
        # Blur neighbours along axis j: all first-d coordinates -1 except coordinate j, +d
        # (for j = d every one -1); the other neighbour is the opposite step. A vertex not in
        # use points at the zero row m.
        step_all = strides.sum()
        neighbours = []
        for j in range(d + 1):
            step = step_all - ((d + 1) * strides[j] if j < d else 0)
            pair = []
            for code in (vertices - step, vertices + step):
                pos = torch.searchsorted(vertices, code).clamp_max(self.m - 1)
                pair.append(torch.where(vertices[pos] == code, pos, self.m))
            neighbours.append(pair)
        self.neighbours = neighbours
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))

    @property
    def vertices(self) -> int:
        """Lattice vertices in use (the memory and time of a filter scale with it)."""
        return self.m

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(C, N) values -> (C, N) Gaussian-filtered values (float32, the lattice's device).

        Channels first: every splat, blur and slice step is a gather or scatter along the
        last axis of a (C, M) grid, contiguous per channel (rows of C values, for few
        channels, cost about four times as much on CPU).
        """
        if values.ndim != 2 or values.shape[1] != self.n:
            raise ValueError(f"values must be (C, {self.n}), got {tuple(values.shape)}")
        values = values.float()
        grid = values.new_zeros(values.shape[0], self.m + 1)
        for k in range(self.d + 1):
            grid.index_add_(1, self.offsets[k], values * self.barycentric[k])
        zero = grid.new_zeros(values.shape[0], 1)
        for before, after in self.neighbours:
            blurred = grid[:, : self.m] + 0.5 * (
                grid.index_select(1, before) + grid.index_select(1, after)
            )
            grid = torch.cat([blurred, zero], dim=1)
        out = grid.index_select(1, self.offsets[0]) * self.barycentric[0]
        for k in range(1, self.d + 1):
            out += grid.index_select(1, self.offsets[k]) * self.barycentric[k]
        return out * self.alpha
