import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.linalg.adaptive_lowrank import (
    adapter_flops,
    allocate,
    data_aware_basis,
    masked_lowrank,
    naive_allocate,
    naive_data_aware_basis,
    naive_masked_lowrank,
    top_fraction_threshold,
)


def _layer(d_out, d_in, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    # correlated inputs: a few directions dominate, as real activations do
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d_in, dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix.T
    return w, x


@pytest.mark.parametrize(("d_out", "d_in", "rank"), [(12, 8, 5), (8, 12, 8), (10, 10, 3)])
def test_basis_from_the_gram_equals_the_svd_of_wx(d_out, d_in, rank):
    w, x = _layer(d_out, d_in)
    a, b, s2 = data_aware_basis(w, x.T @ x, rank)
    a_ref, b_ref, s2_ref = naive_data_aware_basis(w, x, rank)
    torch.testing.assert_close(s2, s2_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a @ a.T, a_ref @ a_ref.T, rtol=0, atol=1e-9)  # same subspace (signs free)
    torch.testing.assert_close(a.T @ a, torch.eye(rank, dtype=a.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(b, a.T @ w, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("d_out", "d_in"), [(12, 8), (8, 12)])
def test_full_basis_without_mask_is_the_dense_layer(d_out, d_in):
    w, x = _layer(d_out, d_in)
    a, b, _ = data_aware_basis(w, x.T @ x)
    y, m = masked_lowrank(x, a, b, 0.0)
    assert bool(m.all())
    torch.testing.assert_close(y, x @ w.T, rtol=0, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.integers(1, 8), q=st.floats(0.0, 1.0))
def test_squared_coefficient_identity(seed, rank, q):
    """‖Wx − A(m⊙Bx)‖² = ‖(I − AAᵀ)Wx‖² + Σ_dropped (Bx)_i², per token."""
    w, x = _layer(10, 8, n=40, seed=seed)
    a, b, _ = data_aware_basis(w, x.T @ x, rank)
    c2 = (x @ b.T).square()
    tau = float(c2.flatten().quantile(q))
    y, m = masked_lowrank(x, a, b, tau)
    err = (x @ w.T - y).square().sum(-1)
    wx = x @ w.T
    resid = (wx - wx @ a @ a.T).square().sum(-1)
    torch.testing.assert_close(err, resid + (c2 * ~m).sum(-1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(m, c2 >= tau)  # the mask keeps exactly the components at or above τ


def test_masked_lowrank_matches_the_naive_loop():
    w, x = _layer(6, 5, n=12)
    a, b, _ = data_aware_basis(w, x.T @ x, 4)
    v = (x @ b.T).square().flatten().sort().values
    tau = float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2  # between two values: no rounding tie at the boundary
    y, _ = masked_lowrank(x, a, b, tau)
    torch.testing.assert_close(y, naive_masked_lowrank(x, a, b, tau), rtol=0, atol=1e-12)


def test_top_fraction_threshold():
    v = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0])
    assert top_fraction_threshold(v, 0.4) == 4.0 and int((v >= 4.0).sum()) == 2
    assert top_fraction_threshold(v, 1.0) == 0.0
    assert top_fraction_threshold(v, 0.1) == math.inf


def test_allocation_finds_the_known_best_split():
    """Two components carry all the energy: at half the dense FLOPs (d 8 x 8), n_B = 2 leaves k̄ = 2 active,
    exactly those two; n_B = 1 loses the second, n_B = 3 can keep only one of three per token on average."""
    n = 50
    coeff = torch.full((n, 8), 1e-6)
    coeff[:, 0], coeff[:, 1] = 4.0, 3.0
    total = float(coeff.sum())
    al = allocate(coeff, total, 8, 8, 0.5)
    assert al.n_b == 2 and al.k_mean == pytest.approx(2.0) and al.coverage == pytest.approx(1.0, abs=1e-5)
    assert adapter_flops(8, 8, al.n_b, al.k_mean) == pytest.approx(0.5 * 2 * 8 * 8)
    assert naive_allocate(coeff, total, 8, 8, 0.5).n_b == 2


@pytest.mark.parametrize("keep", [0.3, 0.56, 0.8])
def test_coarse_to_fine_search_matches_exhaustive_on_decaying_spectra(keep):
    g = torch.Generator().manual_seed(1)
    n, r = 200, 64
    coeff = (torch.randn(n, r, generator=g) * torch.logspace(0, -1.5, r)).square()
    total = float(coeff.sum()) * 1.05  # some energy outside the basis
    fast, slow = allocate(coeff, total, 64, 96, keep), naive_allocate(coeff, total, 64, 96, keep)
    assert fast.coverage == pytest.approx(slow.coverage, abs=2e-3)
    # the threshold keeps the budgeted number of entries of the first n_B columns
    kept = int((coeff[:, : fast.n_b] >= fast.tau).sum())
    assert kept == math.floor(fast.k_mean * n + 1e-9)


def test_unreachable_budget_and_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="raise the FLOPs ratio"):
        allocate(torch.rand(10, 4), 1.0, 100, 1, 0.001)
    with pytest.raises(ValueError, match="gram must be"):
        data_aware_basis(torch.randn(4, 3), torch.eye(4))
    with pytest.raises(ValueError, match="rank"):
        data_aware_basis(torch.randn(4, 3), torch.eye(3), rank=4)
