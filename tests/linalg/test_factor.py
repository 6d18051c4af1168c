"""Exact rank-r score factorisation from Grams / thin QR against the formed-and-SVD'd score matrix."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.linalg import (
    cholesky_qr2,
    gram,
    gram_root,
    lowrank_score_maps,
    lowrank_score_maps_from_qk,
    naive_lowrank_scores,
    naive_truncation_errors,
    tail_energy,
    truncation_errors,
)
from tests.linalg.helpers import F64, gen, qk_with_spectrum, random_qk, rel_fro, seeds

SHAPE = dict(length=40, d=8)


def _maps(source: str, q, k, rank=None, ridge=0.0):
    if source == "grams":
        return lowrank_score_maps(gram(q), gram(k), rank, ridge=ridge)
    assert ridge == 0.0
    return lowrank_score_maps_from_qk(q, k, rank)


# ----------------------------------------------------------------------------- maps = Eckart–Young optimum


@pytest.mark.parametrize("source", ["grams", "qr"])
@pytest.mark.parametrize("rank", range(1, 9), ids=lambda r: f"r{r}")
def test_maps_equal_naive_truncated_svd_float64(source, rank):
    q, k = random_qk(3, **SHAPE)
    pq, pk, _ = _maps(source, q, k, rank)
    assert pq.shape == pk.shape == (3, 8, rank)
    approx = (q @ pq) @ (k @ pk).transpose(-2, -1)
    assert rel_fro(approx, naive_lowrank_scores(q, k, rank)) < 1e-10


@pytest.mark.parametrize("source", ["grams", "qr"])
def test_prefix_columns_give_every_lower_rank(source):
    q, k = random_qk(3, **SHAPE, seed=1)
    pq, pk, _ = _maps(source, q, k, rank=6)
    for j in range(1, 7):
        approx = (q @ pq[..., :j]) @ (k @ pk[..., :j]).transpose(-2, -1)
        assert rel_fro(approx, naive_lowrank_scores(q, k, j)) < 1e-10, j


@pytest.mark.parametrize("source", ["grams", "qr"])
@pytest.mark.parametrize("rank", [1, 3, 8], ids=lambda r: f"r{r}")
def test_maps_float32_close_to_float64_reference(source, rank):
    q, k = random_qk(3, **SHAPE, seed=2, dtype=torch.float32)
    pq, pk, sigma = _maps(source, q, k, rank)
    assert pq.dtype == pk.dtype == sigma.dtype == torch.float32
    approx = (q @ pq) @ (k @ pk).transpose(-2, -1)
    ref = naive_lowrank_scores(q.double(), k.double(), rank)
    assert rel_fro(approx.double(), ref) < 1e-3


@pytest.mark.parametrize("source", ["grams", "qr"])
def test_sigma_equals_svdvals_of_scores(source):
    q, k = random_qk(3, **SHAPE, seed=3)
    _, _, sigma = _maps(source, q, k, rank=2)
    assert sigma.shape == (3, 8)
    ref = torch.linalg.svdvals(q @ k.transpose(-2, -1))[..., :8]
    torch.testing.assert_close(sigma, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "source,ridge", [("grams", 0.0), ("grams", 1e-3), ("grams", 0.5), ("qr", 0.0)], ids=lambda v: str(v)
)
def test_full_rank_maps_are_inverse_pair(source, ridge):
    q, k = random_qk(3, **SHAPE, seed=4)
    pq, pk, _ = _maps(source, q, k, ridge=ridge)
    assert pq.shape == (3, 8, 8)
    eye = torch.eye(8, dtype=F64).expand(3, 8, 8)
    torch.testing.assert_close(pq @ pk.transpose(-2, -1), eye, rtol=0, atol=1e-10)


def test_ridge_shifts_singular_values_but_keeps_exactness_at_full_rank():
    q, k = random_qk(2, **SHAPE, seed=5)
    _, _, s0 = lowrank_score_maps(gram(q), gram(k))
    pq, pk, s1 = lowrank_score_maps(gram(q), gram(k), ridge=0.1)
    assert not torch.allclose(s0, s1)
    s = q @ k.transpose(-2, -1)
    torch.testing.assert_close((q @ pq) @ (k @ pk).transpose(-2, -1), s, rtol=0, atol=1e-10)


def _ridge_shift_bounds(q, k, ridge):
    """Weyl bounds on σ_j(ridged core) − σ_j(Q Kᵀ) (see gram_root): the √ε one for every j, and the
    (ε_k ‖Q‖² + ε_q ‖K‖² + ε_q ε_k) / (2 σ_j) one for σ_j > 0. Returns (√ε bound, ε_q, ε_k, ‖Q‖₂, ‖K‖₂)."""
    d = q.shape[-1]
    eq, ek = (ridge * float(torch.trace(gram(x))) / d for x in (q, k))
    nq, nk = (float(torch.linalg.matrix_norm(x, 2)) for x in (q, k))
    return ek**0.5 * nq + eq**0.5 * nk + (eq * ek) ** 0.5, eq, ek, nq, nk


@settings(max_examples=40, deadline=None)
@given(seed=seeds, length=st.integers(1, 24), d=st.integers(1, 6), ridge=st.floats(1e-6, 1e-1))
def test_ridge_moves_singular_values_up_by_at_most_the_sqrt_bound(seed, length, d, ridge):
    """0 ≤ σ_j(ridged) − σ_j(Q Kᵀ) ≤ √ε_k‖Q‖₂ + √ε_q‖K‖₂ + √(ε_q ε_k), also for L < d (zero σ_j, singular Grams)."""
    q, k = random_qk(length=length, d=d, seed=seed)
    _, _, got = lowrank_score_maps(gram(q), gram(k), ridge=ridge)
    exact = torch.zeros(d, dtype=F64)
    sv = torch.linalg.svdvals(q @ k.T)[:d]
    exact[: len(sv)] = sv
    bound, eq, ek, nq, nk = _ridge_shift_bounds(q, k, ridge)
    tol = 1e-9 * nq * nk
    shift = got - exact
    assert float(shift.min()) >= -tol  # the ridge only adds energy
    assert float(shift.max()) <= bound + tol
    pos = exact > 1e-6 * nq * nk
    near = (ek * nq**2 + eq * nk**2 + eq * ek) / (2 * exact[pos])
    assert bool((shift[pos] <= near + tol).all())


def test_ridge_shift_of_a_zero_singular_value_grows_like_sqrt_ridge():
    """The old docstring claimed |Δσ| ≤ ridge · tr(G)/d: rows of Q and K in orthogonal subspaces give Q Kᵀ = 0,
    and the ridge lifts σ_1 to ≈ √ε_k ‖Q‖₂ ∝ √ridge, far above ridge · tr(G)/d and inside the √ε bound."""
    g = gen(18)
    q = torch.zeros(16, 4, dtype=F64)
    k = torch.zeros(16, 4, dtype=F64)
    q[:, :2] = torch.randn(16, 2, generator=g, dtype=F64)
    k[:, 2:] = torch.randn(16, 2, generator=g, dtype=F64)
    assert float(torch.linalg.matrix_norm(q @ k.T)) == 0.0
    shifts = []
    for ridge in (1e-2, 1e-4, 1e-6):
        _, _, sigma = lowrank_score_maps(gram(q), gram(k), ridge=ridge)
        old_claim = ridge * max(float(torch.trace(gram(x))) for x in (q, k)) / 4
        bound, _, ek, nq, _ = _ridge_shift_bounds(q, k, ridge)
        assert 10 * old_claim < float(sigma[0]) <= bound
        assert abs(float(sigma[0]) / (ek**0.5 * nq) - 1) < 1e-2
        shifts.append(float(sigma[0]))
    for big, small in zip(shifts[:-1], shifts[1:], strict=True):
        assert 9.0 < big / small < 11.0  # ridge / 100 -> Δσ / 10: √ridge, not ridge


def test_grams_may_share_any_common_scaling():
    """Mean Grams (G / L) give the same maps; only sigma scales by 1 / L."""
    q, k = random_qk(2, **SHAPE, seed=6)
    pq, pk, sigma = lowrank_score_maps(gram(q) / 40, gram(k) / 40, 3)
    approx = (q @ pq) @ (k @ pk).transpose(-2, -1)
    assert rel_fro(approx, naive_lowrank_scores(q, k, 3)) < 1e-10
    torch.testing.assert_close(sigma * 40, torch.linalg.svdvals(q @ k.transpose(-2, -1))[..., :8])


@settings(max_examples=25, deadline=None)
@given(seed=seeds, length=st.integers(8, 48), d=st.integers(1, 8), data=st.data())
def test_maps_match_naive_on_random_shapes(seed, length, d, data):
    rank = data.draw(st.integers(1, d))
    q, k = random_qk(length=length, d=d, seed=seed)
    for source in ("grams", "qr"):
        pq, pk, _ = _maps(source, q, k, rank)
        approx = (q @ pq) @ (k @ pk).transpose(-2, -1)
        ref = naive_lowrank_scores(q, k, rank)
        assert float(torch.linalg.matrix_norm(approx - ref)) <= 1e-9 * float(torch.linalg.matrix_norm(q @ k.T))


# ----------------------------------------------------------------------------- truncation errors


def _check_truncation(q, k, pq, pk):
    got = truncation_errors(gram(q), gram(k), pq, pk)
    ref = naive_truncation_errors(q, k, pq, pk)
    assert got.shape == ref.shape == (*q.shape[:-2], pq.shape[-1] + 1)
    scale = ref[..., :1]  # ‖S‖_F²
    assert float(((got - ref).abs() / scale).max()) < 1e-10


def test_truncation_errors_for_optimal_maps():
    q, k = random_qk(3, **SHAPE, seed=7)
    pq, pk, sigma = lowrank_score_maps(gram(q), gram(k))
    _check_truncation(q, k, pq, pk)
    torch.testing.assert_close(truncation_errors(gram(q), gram(k), pq, pk), tail_energy(sigma), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rank", [1, 4, 8, 11], ids=lambda r: f"R{r}")
def test_truncation_errors_for_arbitrary_maps(rank):
    """Random (stale) maps: no structure at all, R may exceed d."""
    q, k = random_qk(3, **SHAPE, seed=8)
    g = gen(80 + rank)
    pq, pk = (torch.randn(3, 8, rank, generator=g, dtype=F64) for _ in range(2))
    _check_truncation(q, k, pq, pk)


def test_truncation_errors_for_maps_fitted_on_other_data():
    q, k = random_qk(3, **SHAPE, seed=9)
    q_old, k_old = random_qk(3, **SHAPE, seed=10)
    pq, pk, _ = lowrank_score_maps(gram(q_old), gram(k_old), 5)
    _check_truncation(q, k, pq, pk)
    opt = tail_energy(lowrank_score_maps(gram(q), gram(k))[2])
    assert bool((truncation_errors(gram(q), gram(k), pq, pk)[..., 1:] > opt[..., 1:6]).all())


def test_truncation_errors_for_subspace_basis_maps():
    q, k = random_qk(3, **SHAPE, seed=11)
    gq = gram(q)
    z, fallback = cholesky_qr2(torch.randn(3, 8, 5, generator=gen(12), dtype=F64), metric=gq)
    assert not fallback
    _check_truncation(q, k, z, gq @ z)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, length=st.integers(4, 32), d=st.integers(1, 8), rank=st.integers(1, 10))
def test_truncation_errors_property(seed, length, d, rank):
    q, k = random_qk(length=length, d=d, seed=seed)
    g = gen(seed + 1)
    pq, pk = (torch.randn(d, rank, generator=g, dtype=F64) for _ in range(2))
    got = truncation_errors(gram(q), gram(k), pq, pk)
    ref = naive_truncation_errors(q, k, pq, pk)
    assert bool((got >= 0).all())
    scale = float(ref.abs().max()) + 1.0
    assert float((got - ref).abs().max()) < 1e-10 * scale


def test_truncation_errors_of_float32_grams_are_computed_in_float64():
    """float32 Grams of data with a wide spectrum and a common offset: tr(G_q G_k), the cross and the quadratic
    terms cancel to errors ~1e-12 of the total near full rank. In float32 that cancellation left 2e-7 to 4e-7 of
    the total at full rank (or 0 from the clamp at ranks ≥ ~20), orders of magnitude off the exact errors."""
    g = gen(0)
    scale = torch.logspace(2, -3, 64, dtype=F64)
    q, k = (torch.randn(512, 64, generator=g, dtype=F64) * scale + 10.0 for _ in range(2))
    gq, gk = gram(q.float()), gram(k.float())
    pq, pk, _ = lowrank_score_maps(gq, gk, ridge=1e-6)
    assert pq.dtype == torch.float32
    got = truncation_errors(gq, gk, pq, pk)
    assert got.dtype == torch.float32 and got.shape == (65,)
    total = float((gq.double() * gk.double()).sum())  # tr(G_q G_k), both symmetric
    assert 0 <= float(got[-1]) / total < 1e-9  # exact error of float32 maps at full rank: ~1e-12 of the total
    ref = naive_truncation_errors(q, k, pq.double(), pk.double())  # the maps' exact errors on the data, float64
    torch.testing.assert_close(got.double(), ref, rtol=1e-2, atol=1e-12 * total)
    ref_grams = truncation_errors(gq.double(), gk.double(), pq.double(), pk.double())
    torch.testing.assert_close(got.double(), ref_grams, rtol=1e-6, atol=0.0)
    sel = truncation_errors(gq, gk, pq, pk, torch.tensor([64, 0, 32]))
    torch.testing.assert_close(sel, got[[64, 0, 32]], rtol=1e-6, atol=1e-13 * total)


@pytest.mark.parametrize(
    "ranks", [[0], [5], [2, 4], [5, 0, 3], [3, 3, 1], list(range(6))], ids=lambda r: "ranks" + "-".join(map(str, r))
)
def test_truncation_errors_selected_ranks(ranks):
    q, k = random_qk(3, **SHAPE, seed=16)
    g = gen(17)
    pq, pk = (torch.randn(3, 8, 5, generator=g, dtype=F64) for _ in range(2))
    full = truncation_errors(gram(q), gram(k), pq, pk)
    got = truncation_errors(gram(q), gram(k), pq, pk, torch.tensor(ranks))
    assert got.shape == (3, len(ranks))
    torch.testing.assert_close(got, full[..., ranks], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, naive_truncation_errors(q, k, pq, pk)[..., ranks], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rank", range(0, 9), ids=lambda r: f"r{r}")
def test_tail_energy_is_optimal_truncation_error(rank):
    q, k = qk_with_spectrum([9.0, 5.0, 5.0, 3.0, 1.0, 0.5, 1e-3, 0.0], 32, gen(13))
    sigma = torch.linalg.svdvals(q @ k.T)[:8]
    s = q @ k.T
    ref = ((s - naive_lowrank_scores(q, k, rank)) ** 2).sum() if rank else (s**2).sum()
    torch.testing.assert_close(tail_energy(sigma)[rank], ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- roots and errors


def test_gram_root_is_upper_cholesky_factor():
    q, _ = random_qk(3, **SHAPE, seed=14)
    g = gram(q)
    r = gram_root(g)
    torch.testing.assert_close(r, r.triu())
    torch.testing.assert_close(r.transpose(-2, -1) @ r, g, rtol=1e-12, atol=1e-12)
    assert bool((r.diagonal(dim1=-2, dim2=-1) > 0).all())


def test_gram_root_singular_gram_needs_ridge():
    q = torch.randn(20, 6, generator=gen(15), dtype=F64)
    q[:, 2] = 0.0
    g = gram(q)
    with pytest.raises(torch.linalg.LinAlgError):
        gram_root(g)
    with pytest.raises(torch.linalg.LinAlgError):
        lowrank_score_maps(g, g)
    r = gram_root(g, ridge=1e-6)
    shift = 1e-6 * torch.trace(g) / 6
    torch.testing.assert_close(r.T @ r, g + shift * torch.eye(6, dtype=F64), rtol=1e-12, atol=1e-12)


def test_from_qk_rejects_fewer_rows_than_dims():
    q, k = random_qk(length=5, d=8)
    with pytest.raises(ValueError, match="rows"):
        lowrank_score_maps_from_qk(q, k, 2)
    q, k = random_qk(length=12, d=8)
    with pytest.raises(ValueError):
        lowrank_score_maps_from_qk(q, k[:7], 2)
    with pytest.raises(ValueError):
        lowrank_score_maps_from_qk(q[:7], k, 2)
    lowrank_score_maps_from_qk(q[:8], k[:8], 2)  # L = d is enough
