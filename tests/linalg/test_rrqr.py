"""QR with column pivoting against a projector-based reference, and strong RRQR's Gu–Eisenstat guarantees on
generic, low-rank and adversarial (Kahan, duplicated columns) matrices."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.linalg.rrqr import naive_pivoted_qr, pivoted_qr, rrqr_ratios, strong_rrqr
from tests.linalg.helpers import F64, gen, seeds

F = 1.5


def _gaussian(n, c, seed=0):
    return torch.randn(n, c, generator=gen(seed), dtype=F64)


def _low_rank(n, c, rank, noise, seed=0):
    g = gen(seed)
    m = torch.randn(n, rank, generator=g, dtype=F64) @ torch.randn(rank, c, generator=g, dtype=F64)
    return m + noise * torch.randn(n, c, generator=g, dtype=F64)


def _kahan(n, c=0.3):
    """Kahan's matrix (upper triangular, unit column norms) with columns shrunk by (1 − 1e-10)^j so that
    pivoting keeps the identity order; its last diagonal entry overestimates σ_min by orders of magnitude."""
    s = math.sqrt(1.0 - c * c)
    k = torch.eye(n, dtype=F64) - c * torch.ones(n, n, dtype=F64).triu(1)
    j = torch.arange(n, dtype=F64)
    return (s**j).unsqueeze(1) * k * ((1.0 - 1e-10) ** j)


def _near_dependent(n=80, seed=0):
    """6 independent columns, exact duplicates of two of them, and combinations plus 1e-8 noise."""
    g = gen(seed)
    base = torch.randn(n, 6, generator=g, dtype=F64)
    combos = base @ torch.randn(6, 3, generator=g, dtype=F64) + 1e-8 * torch.randn(n, 3, generator=g, dtype=F64)
    return torch.cat([base, base[:, [1, 4]], combos], 1)


def _kahan_blocks(n_rows=60, seed=0):
    """Three Kahan blocks (each needs a swap) mixed by a random orthonormal (n_rows, 36) factor."""
    blocks = torch.block_diag(_kahan(12, 0.5), _kahan(12, 0.6), _kahan(12, 0.7))
    return torch.linalg.qr(torch.randn(n_rows, 36, generator=gen(seed), dtype=F64))[0] @ blocks


MATRICES = {
    "gaussian": lambda: _gaussian(60, 16, 1),
    "wide": lambda: _gaussian(10, 16, 2),
    "lowrank+noise": lambda: _low_rank(100, 20, 6, 1e-6, 3),
    "kahan": lambda: _kahan(40),
    "near-dependent": lambda: _near_dependent(),
    "kahan-blocks": lambda: _kahan_blocks(),
}
CASES = [
    ("gaussian", 5),
    ("gaussian", 12),
    ("wide", 4),
    ("lowrank+noise", 4),
    ("lowrank+noise", 6),
    ("lowrank+noise", 9),
    ("kahan", 39),
    ("kahan", 20),
    ("near-dependent", 6),
    ("near-dependent", 8),
    ("kahan-blocks", 30),
]


def _log_det(m, cols):
    """log of the k-volume of the columns ``cols`` of m (= log |det A_k| of any QR of them)."""
    r = torch.linalg.qr(m[:, cols], mode="r").R
    return float(r.diagonal().abs().log().sum())


def _growth(n, k, f=F):
    return math.sqrt(1.0 + f * f * k * (n - k))


def _check_strong(m, k, res, f=F):
    n = m.shape[1]
    assert sorted(res.perm.tolist()) == list(range(n))
    a_inv_b, rho = rrqr_ratios(m, res.perm, k)
    assert float(a_inv_b.abs().max()) <= f * (1 + 1e-9)
    assert float(rho.max()) <= f * (1 + 1e-9)
    assert abs(float(rho.max()) - res.max_ratio) <= 1e-9 * f
    # Gu–Eisenstat Theorem 3.2
    r = torch.linalg.qr(m[:, res.perm], mode="r").R
    s_m = torch.linalg.svdvals(m)
    s_a = torch.linalg.svdvals(r[:k, :k])
    assert bool((s_a * _growth(n, k, f) >= s_m[:k] * (1 - 1e-9)).all())
    s_c = torch.linalg.svdvals(r[k:, k:])
    s_tail = torch.cat([s_m, s_m.new_zeros(n)])[k : k + s_c.numel()]
    assert bool((s_c <= s_tail * _growth(n, k, f) * (1 + 1e-9) + 1e-12 * float(s_m[0])).all())


# ----------------------------------------------------------------------------- pivoted QR


@pytest.mark.parametrize(
    ("shape", "k"), [((30, 8), None), ((8, 12), None), ((50, 10), None), ((40, 10), 4), ((12, 12), 12)], ids=str
)
def test_pivoted_qr_matches_the_projector_reference(shape, k):
    m = torch.randn(*shape, generator=gen(sum(shape)), dtype=F64)
    q, r, perm = pivoted_qr(m, k)
    q_ref, r_ref, perm_ref = naive_pivoted_qr(m, k)
    t = min(shape) if k is None else min(k, *shape)
    assert q.shape == (shape[0], t) and r.shape == (t, shape[1]) and perm.dtype == torch.long
    assert torch.equal(perm, perm_ref)
    torch.testing.assert_close(q, q_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(r, r_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(q.T @ q, torch.eye(t, dtype=F64), atol=1e-13, rtol=0)
    assert torch.equal(r, r.triu())
    d = r.diagonal()
    assert bool((d >= 0).all()) and bool((d[1:] <= d[:-1]).all())
    # q r is the projection of m[:, perm] onto its first t columns; m[:, perm] itself when t = min(shape)
    torch.testing.assert_close(q @ r, q @ q.T @ m[:, perm], atol=1e-12, rtol=0)
    if t == min(shape):
        torch.testing.assert_close(q @ r, m[:, perm], atol=1e-12, rtol=0)


def test_pivoted_qr_stopped_early_is_a_prefix_of_the_full_run():
    m = _gaussian(40, 12, 5)
    full = pivoted_qr(m)[2]
    _, r, perm = pivoted_qr(m, 5)
    assert torch.equal(perm[:5], full[:5])
    assert perm[5:].tolist() == sorted(perm[5:].tolist())  # the rest in original order
    torch.testing.assert_close(r[:, :5], pivoted_qr(m)[1][:5, :5], atol=1e-12, rtol=0)


def test_pivoted_qr_rank_deficient_keeps_q_orthonormal():
    base = _gaussian(20, 3, 6)
    m = torch.cat([base, torch.zeros(20, 2, dtype=F64), base[:, :2], base @ torch.ones(3, 1, dtype=F64)], 1)
    q, r, perm = pivoted_qr(m)
    torch.testing.assert_close(q.T @ q, torch.eye(8, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(q @ r, m[:, perm], atol=1e-12, rtol=0)
    d = r.diagonal()
    assert bool((d[1:] <= d[:-1] + 1e-12).all())
    assert float(d[3:].max()) < 1e-12 * float(d[0])  # rank 3 revealed
    assert torch.linalg.matrix_rank(m[:, perm[:3]]) == 3


def test_pivoted_qr_float32_input_and_bad_k():
    m = _gaussian(10, 4).float()
    q, r, perm = pivoted_qr(m)
    assert q.dtype == r.dtype == F64
    torch.testing.assert_close(q @ r, m[:, perm].double(), atol=1e-6, rtol=0)
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="k must be in 0..4"):
            pivoted_qr(m, bad)
    with pytest.raises(ValueError, match="2-D"):
        pivoted_qr(m[None])


# ----------------------------------------------------------------------------- strong RRQR


def test_rrqr_ratios_are_least_squares_coefficients_and_volume_ratios():
    m = _gaussian(15, 7, 7)
    perm = torch.tensor([3, 0, 6, 1, 2, 4, 5])
    k = 3
    a_inv_b, rho = rrqr_ratios(m, perm, k)
    kept, dropped = perm[:k].tolist(), perm[k:].tolist()
    # A⁻¹B: coefficients of the dropped columns' projections on the kept ones
    coef = torch.linalg.lstsq(m[:, kept], m[:, dropped]).solution
    torch.testing.assert_close(a_inv_b, coef, atol=1e-12, rtol=0)
    # ρ_ij: the factor by which swapping kept i with dropped j multiplies the kept volume
    base = _log_det(m, kept)
    for i, j in itertools.product(range(k), range(len(dropped))):
        swapped = kept.copy()
        swapped[i] = dropped[j]
        assert math.isclose(math.exp(_log_det(m, swapped) - base), float(rho[i, j]), rel_tol=1e-10)


@pytest.mark.parametrize(("name", "k"), CASES, ids=[f"{n}-k{k}" for n, k in CASES])
def test_strong_rrqr_guarantees(name, k):
    m = MATRICES[name]()
    res = strong_rrqr(m, k, max_swaps=None)
    assert res.converged
    _check_strong(m, k, res)
    # every swap multiplies the kept volume by more than f
    init = pivoted_qr(m, k)[2]
    assert _log_det(m, res.perm[:k]) >= _log_det(m, init[:k]) + res.swaps * math.log(F) - 1e-9
    if name.startswith("kahan"):
        assert res.swaps >= (3 if name == "kahan-blocks" else 1)


def test_strong_rrqr_fixes_pivoting_on_the_kahan_matrix():
    m = _kahan(40)
    perm0 = pivoted_qr(m)[2]
    assert torch.equal(perm0, torch.arange(40))  # plain pivoting keeps the identity order ...
    assert float(rrqr_ratios(m, perm0, 39)[1].max()) > 100  # ... and is far from strong
    r0 = torch.linalg.qr(m, mode="r").R
    s_min = float(torch.linalg.svdvals(m)[-1])
    assert float(r0[-1, -1]) > 1e3 * s_min  # its trailing block hides σ_min
    res = strong_rrqr(m, 39, max_swaps=None)
    assert res.swaps >= 1 and res.converged
    r = torch.linalg.qr(m[:, res.perm], mode="r").R
    assert abs(float(r[-1, -1])) <= _growth(40, 39) * s_min


def test_strong_rrqr_never_keeps_both_copies_of_a_column():
    m = _near_dependent()
    for k in range(1, 7):
        kept = set(strong_rrqr(m, k, max_swaps=None).perm[:k].tolist())
        assert not {1, 6} <= kept and not {4, 7} <= kept, k


def test_strong_rrqr_stops_on_exact_rank_deficiency(caplog):
    m = _low_rank(30, 10, 3, 0.0, 8)
    with caplog.at_level(logging.INFO, logger="drrl.linalg.rrqr"):
        res = strong_rrqr(m, 5, max_swaps=None)
    assert not res.converged and res.max_ratio == math.inf
    assert sorted(res.perm.tolist()) == list(range(10))
    assert torch.linalg.matrix_rank(m[:, res.perm[:3]]) == 3  # the rank is still revealed by the pivots
    assert "numerically singular" in caplog.text
    # fewer rows than k: singular by construction, also for the zero matrix
    assert not strong_rrqr(_gaussian(3, 6), 4).converged
    assert not strong_rrqr(torch.zeros(5, 4, dtype=F64), 2).converged


def test_strong_rrqr_swap_cap_and_trivial_k():
    m = _kahan(40)
    capped = strong_rrqr(m, 39, max_swaps=0)
    assert capped.swaps == 0 and not capped.converged and capped.max_ratio > F
    assert torch.equal(capped.perm, pivoted_qr(m)[2])
    for k in (0, 40):
        res = strong_rrqr(m, k)
        assert res.swaps == 0 and res.converged and res.max_ratio == 0.0
        assert sorted(res.perm.tolist()) == list(range(40))
    assert torch.equal(strong_rrqr(m, 40).perm, pivoted_qr(m)[2])


def test_strong_rrqr_bad_arguments():
    m = _gaussian(10, 4)
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="k must be in 0..4"):
            strong_rrqr(m, bad)
    with pytest.raises(ValueError, match="f must be > 1"):
        strong_rrqr(m, 2, f=1.0)


def test_strong_rrqr_generator_shuffles_ties_deterministically():
    m = torch.cat([_gaussian(30, 4, 9)] * 2, 1)  # every column has an exact twin: all ties
    a = strong_rrqr(m, 4, generator=gen(3))
    b = strong_rrqr(m, 4, generator=gen(3))
    assert torch.equal(a.perm, b.perm)
    kept = {c % 4 for c in a.perm[:4].tolist()}
    assert kept == {0, 1, 2, 3}  # one copy of each column
    picks = {tuple(strong_rrqr(m, 4, generator=gen(s)).perm[:4].sort().values.tolist()) for s in range(8)}
    assert len(picks) > 1  # the seed decides which copy
    assert strong_rrqr(m, 4).perm[:4].sort().values.tolist() == [0, 1, 2, 3]  # no generator: lowest index


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 25),
    cols=st.integers(1, 10),
    rank_frac=st.floats(0.0, 1.0),
    noise=st.sampled_from([0.0, 1e-4, 1.0]),
    kahan_c=st.sampled_from([None, 0.5, 0.7]),
    k_frac=st.floats(0.0, 1.0),
    seed=seeds,
)
def test_strong_rrqr_property(rows, cols, rank_frac, noise, kahan_c, k_frac, seed):
    """Low rank plus noise, or a rotated Kahan matrix (where pivoting alone is not strong)."""
    rank = round(rank_frac * min(rows, cols))
    k = round(k_frac * cols)
    if kahan_c is None:
        m = _low_rank(rows, cols, rank, noise, seed)
    else:
        rot = torch.linalg.qr(torch.randn(rows + cols, cols, generator=gen(seed), dtype=F64))[0]
        m = rot @ _kahan(cols, kahan_c)
    res = strong_rrqr(m, k, max_swaps=None)
    assert sorted(res.perm.tolist()) == list(range(cols))
    if res.converged:
        if 0 < k < cols:
            _check_strong(m, k, res)
    else:
        # only a numerically rank-deficient problem stops without converging
        s = torch.cat([torch.linalg.svdvals(m), torch.zeros(cols, dtype=F64)])
        assert res.max_ratio == math.inf
        assert float(s[k - 1]) <= 1e-7 * max(float(s[0]), 1e-300)
