"""The permutohedral lattice filter against the Gaussian it approximates."""

from __future__ import annotations

import pytest
import torch

from u2seg.ops.lattice import PermutohedralLattice


@pytest.mark.parametrize(("dims", "min_corr"), [(2, 0.995), (5, 0.95)])
def test_filter_follows_the_gaussian_kernel(dims: int, min_corr: float) -> None:
    """On random points the lattice output is proportional to sum_j exp(-|f_i - f_j|^2 / 2)
    v_j up to the lattice's approximation (its effective kernel is wider and lower), so
    outputs correlate with the exact sums; far-apart clusters do not leak into each other."""
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(1500, dims, generator=generator) * 6
    values = torch.rand(2, 1500, generator=generator)
    out = PermutohedralLattice(features).filter(values)
    exact = values @ torch.exp(-(torch.cdist(features, features) ** 2) / 2)
    assert out.shape == (2, 1500)
    corr = torch.corrcoef(torch.stack([out.flatten(), exact.flatten()]))[0, 1]
    assert corr > min_corr
    far = torch.cat([features, features + 100.0])
    ones = torch.cat([torch.ones(1, 1500), torch.zeros(1, 1500)], dim=1)
    split = PermutohedralLattice(far).filter(ones)
    assert float(split[0, 1500:].abs().max()) == 0.0
    torch.testing.assert_close(
        split[:, :1500], PermutohedralLattice(features).filter(ones[:, :1500])
    )


def test_filter_is_linear_and_checks_shapes() -> None:
    features = torch.rand(300, 3, generator=torch.Generator().manual_seed(1)) * 4
    lattice = PermutohedralLattice(features)
    a, b = torch.rand(1, 300), torch.rand(1, 300)
    torch.testing.assert_close(
        lattice.filter(2 * a + b), 2 * lattice.filter(a) + lattice.filter(b), rtol=1e-5, atol=1e-5
    )
    assert lattice.vertices > 0
    with pytest.raises(ValueError, match=r"\(C, 300\)"):
        lattice.filter(torch.rand(300, 1))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        PermutohedralLattice(torch.rand(300))
