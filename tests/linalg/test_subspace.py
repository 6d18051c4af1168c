"""CholeskyQR2 orthonormalisation and warm-started subspace iteration on the score spectrum, from Grams only."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.linalg import (
    cholesky_qr2,
    core_singular_values,
    gram,
    lowrank_score_maps,
    sin_theta,
    subspace_iteration,
    subspace_residual,
    tail_energy,
    truncation_errors,
    whiten,
)
from tests.linalg.helpers import F64, gen, orthonormal, qk_with_spectrum, seeds

# clear gaps everywhere, and a large one after r = 5
GAPPED = [8.0, 6.0, 4.0, 3.0, 2.0, 0.5, 0.4, 0.3, 0.2, 0.1]
R = 5


def _eye(r, dtype=F64):
    return torch.eye(r, dtype=dtype)


def _orth(x):
    return torch.linalg.qr(x)[0]


def _ill_conditioned(d, r, cond, g, dtype, batch=()):
    """(*batch, d, r) with singular values log-spaced from 1 down to 1 / cond."""
    u, v = orthonormal(*batch, d, r, g=g), orthonormal(*batch, r, r, g=g)
    s = torch.logspace(0, -math.log10(cond), r, dtype=F64)
    return ((u * s.unsqueeze(-2)) @ v.transpose(-2, -1)).to(dtype)


def _heads(vals, length=48, seeds_=(0, 1, 2)):
    qs, ks = zip(*(qk_with_spectrum(vals, length, gen(s)) for s in seeds_), strict=True)
    q, k = torch.stack(qs), torch.stack(ks)
    return q, k, gram(q), gram(k)


def _err(gq, gk, z):
    return truncation_errors(gq, gk, z, gq @ z)


# ----------------------------------------------------------------------------- CholeskyQR2


@pytest.mark.parametrize("shape", [(12, 5), (3, 12, 5), (16, 16), (8, 1)], ids=str)
def test_cholesky_qr2_orthonormal_and_nested(shape):
    x = torch.randn(*shape, generator=gen(len(shape)), dtype=F64)
    z, fallback = cholesky_qr2(x)
    assert not fallback and z.shape == x.shape
    torch.testing.assert_close(z.transpose(-2, -1) @ z, _eye(shape[-1]).expand(*shape[:-2], -1, -1), atol=1e-12, rtol=0)
    for j in range(1, shape[-1] + 1):
        assert float(sin_theta(_orth(x[..., :j]), z[..., :j]).max()) < 1e-10, j
    # z = x R⁻¹ with R upper triangular: zᵀ x is upper triangular
    rr = z.transpose(-2, -1) @ x
    torch.testing.assert_close(rr, rr.triu(), atol=1e-10, rtol=0)


def test_cholesky_qr2_float32_moderate_condition():
    x = _ill_conditioned(16, 6, 100.0, gen(1), torch.float32)
    z, fallback = cholesky_qr2(x)
    assert not fallback and z.dtype == torch.float32
    torch.testing.assert_close(z.T @ z, _eye(6, torch.float32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [(), (3,)], ids=["single", "heads"])
def test_cholesky_qr2_metric_orthonormal_and_nested(batch):
    g = gen(2)
    a = torch.randn(*batch, 30, 10, generator=g, dtype=F64)
    metric = gram(a)
    x = torch.randn(*batch, 10, 4, generator=g, dtype=F64)
    z, fallback = cholesky_qr2(x, metric)
    assert not fallback
    torch.testing.assert_close(z.transpose(-2, -1) @ metric @ z, _eye(4).expand(*batch, 4, 4), atol=1e-11, rtol=0)
    for j in range(1, 5):
        assert float(sin_theta(_orth(x[..., :j]), _orth(z[..., :j])).max()) < 1e-10, j


@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "heads"])
def test_cholesky_qr2_ill_conditioned_float32_falls_back(batch):
    x = _ill_conditioned(16, 6, 1e10, gen(3), torch.float32, batch)
    z, fallback = cholesky_qr2(x)
    assert fallback and z.dtype == torch.float32 and z.shape == x.shape
    torch.testing.assert_close(z.transpose(-2, -1) @ z, _eye(6, torch.float32).expand(*batch, 6, 6), atol=1e-5, rtol=0)
    # the leading (well-determined) direction is kept
    assert float(sin_theta(_orth(x[..., :1].double()), z[..., :1].double()).max()) < 1e-5


def test_cholesky_qr2_ill_conditioned_float64_falls_back_above_max_cond():
    x = _ill_conditioned(16, 6, 1e10, gen(4), F64)
    z, fallback = cholesky_qr2(x)
    assert fallback
    torch.testing.assert_close(z.T @ z, _eye(6), atol=1e-12, rtol=0)
    z2, fallback2 = cholesky_qr2(_ill_conditioned(16, 6, 1e4, gen(4), F64))
    assert not fallback2
    torch.testing.assert_close(z2.T @ z2, _eye(6), atol=1e-12, rtol=0)


def test_cholesky_qr2_metric_fallback_still_orthonormal():
    g = gen(5)
    metric = gram(torch.randn(30, 8, generator=g, dtype=F64))
    x = torch.randn(8, 3, generator=g, dtype=F64)
    z, fallback = cholesky_qr2(x, metric, max_cond=1.0)  # forces the eigen-decomposition fallback
    assert fallback
    torch.testing.assert_close(z.T @ metric @ z, _eye(3), atol=1e-11, rtol=0)
    assert float(sin_theta(_orth(x), _orth(z))) < 1e-10


@settings(max_examples=30, deadline=None)
@given(seed=seeds, d=st.integers(1, 16), data=st.data())
def test_cholesky_qr2_property(seed, d, data):
    r = data.draw(st.integers(1, d))
    g = gen(seed)
    x = torch.randn(d, r, generator=g, dtype=F64)
    metric = gram(torch.randn(d + 8, d, generator=g, dtype=F64))
    for m in (None, metric):
        z, fallback = cholesky_qr2(x, m)
        gz = z.T @ (z if m is None else m @ z)
        torch.testing.assert_close(gz, _eye(r), atol=1e-9, rtol=0)
        if not fallback:
            assert float(sin_theta(_orth(x[:, :1]), _orth(z[:, :1]))) < 1e-8


# ----------------------------------------------------------------------------- subspace iteration


def test_subspace_iteration_converges_from_random_start():
    _, _, gq, gk = _heads(GAPPED)
    opt = tail_energy(core_singular_values(gq, gk))
    z = torch.randn(3, 10, R, generator=gen(6), dtype=F64)
    errs = []
    for _ in range(30):
        z, fallback = subspace_iteration(gq, gk, z, steps=1)
        assert not fallback
        errs.append(_err(gq, gk, z)[..., R])
    torch.testing.assert_close(z.transpose(-2, -1) @ gq @ z, _eye(R).expand(3, R, R), atol=1e-10, rtol=0)
    assert float(((errs[-1] - opt[..., R]) / opt[..., R]).abs().max()) < 1e-8
    assert bool((errs[0] > errs[-1]).all())
    assert bool((errs[0] > opt[..., R] * (1 + 1e-6)).all())  # the start was not already optimal
    assert bool((torch.stack(errs) >= opt[..., R] * (1 - 1e-10)).all())  # never beats Eckart–Young
    # triangular orthonormalisation: every leading j ≤ r columns are optimal too (all gaps are clear)
    full = _err(gq, gk, z)
    torch.testing.assert_close(full, opt[..., : R + 1], rtol=1e-7, atol=0)


def test_subspace_iteration_many_steps_equals_repeated_single_steps():
    _, _, gq, gk = _heads(GAPPED, seeds_=(3, 4))
    z0 = torch.randn(2, 10, R, generator=gen(7), dtype=F64)
    z_a, _ = subspace_iteration(gq, gk, z0, steps=4)
    z_b = z0
    for _ in range(4):
        z_b, _ = subspace_iteration(gq, gk, z_b, steps=1)
    torch.testing.assert_close(z_a, z_b)


def test_subspace_iteration_zero_steps_only_orthonormalises_in_gq_metric():
    _, _, gq, gk = _heads(GAPPED, seeds_=(3, 4))
    z0 = torch.randn(2, 10, R, generator=gen(7), dtype=F64)
    z, fallback = subspace_iteration(gq, gk, z0, steps=0)
    assert not fallback
    torch.testing.assert_close(z.transpose(-2, -1) @ gq @ z, _eye(R).expand(2, R, R), atol=1e-11, rtol=0)
    for j in range(1, R + 1):
        assert float(sin_theta(_orth(z0[..., :j]), _orth(z[..., :j])).max()) < 1e-10, j


@pytest.mark.parametrize("steps", [1, 2], ids=lambda s: f"steps{s}")
def test_warm_start_on_drifted_grams(steps):
    q, k, gq, gk = _heads(GAPPED)
    z, _ = subspace_iteration(gq, gk, torch.randn(3, 10, R, generator=gen(8), dtype=F64), steps=40)
    g = gen(9)
    q2 = q + 1e-3 * q.abs().mean() * torch.randn(q.shape, generator=g, dtype=F64)
    k2 = k + 1e-3 * k.abs().mean() * torch.randn(k.shape, generator=g, dtype=F64)
    gq2, gk2 = gram(q2), gram(k2)
    opt = tail_energy(core_singular_values(gq2, gk2))[..., R]
    stale = _err(gq2, gk2, z)[..., R]  # old basis (not even G_q2-orthonormal) is measurably off
    z2, fallback = subspace_iteration(gq2, gk2, z, steps=steps)
    assert not fallback
    fresh = _err(gq2, gk2, z2)[..., R]
    assert float(((fresh - opt) / opt).max()) < 1e-3
    assert bool((fresh <= stale).all())


def test_subspace_iteration_rank_deficient_start_falls_back_and_converges():
    """A start with two equal columns cannot be Cholesky-orthonormalised: the fallback still returns a
    G_q-orthonormal basis, and the iteration converges with every leading j ≤ r columns optimal."""
    _, _, gq, gk = _heads(GAPPED, seeds_=(4, 5))
    z0 = torch.randn(2, 10, R, generator=gen(10), dtype=F64)
    z0[..., 1] = z0[..., 0]
    z, fallback = subspace_iteration(gq, gk, z0, steps=30)
    assert fallback
    torch.testing.assert_close(z.transpose(-2, -1) @ gq @ z, _eye(R).expand(2, R, R), atol=1e-10, rtol=0)
    errs = _err(gq, gk, z)
    assert bool((errs.diff(dim=-1) <= 1e-10 * errs[..., :1]).all())
    torch.testing.assert_close(errs, tail_energy(core_singular_values(gq, gk))[..., : R + 1], rtol=1e-7, atol=0)


def test_whiten_is_the_symmetric_problem_of_s_st():
    q, k, gq, gk = _heads(GAPPED, seeds_=(6, 7))
    r, a = whiten(gq, gk)
    torch.testing.assert_close(r, r.triu())
    torch.testing.assert_close(r.transpose(-2, -1) @ r, gq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, a.transpose(-2, -1), rtol=1e-12, atol=1e-12)
    eig = torch.linalg.eigvalsh(a).flip(-1)
    torch.testing.assert_close(eig, torch.tensor(GAPPED, dtype=F64).square().expand(2, -1), rtol=1e-10, atol=1e-12)
    # one step in whitened coordinates is one step Z <- G_k G_q Z
    z = torch.randn(2, 10, 3, generator=gen(14), dtype=F64)
    torch.testing.assert_close(a @ (r @ z), r @ (gk @ (gq @ z)))


def test_subspace_iteration_ridge_handles_singular_gq():
    g = gen(15)
    q, k = torch.randn(40, 8, generator=g, dtype=F64), torch.randn(40, 8, generator=g, dtype=F64)
    q[:, 3] = 0.0
    gq, gk = gram(q), gram(k)
    z0 = torch.randn(8, 3, generator=g, dtype=F64)
    with pytest.raises(torch.linalg.LinAlgError):
        subspace_iteration(gq, gk, z0)
    z, fallback = subspace_iteration(gq, gk, z0, steps=3, ridge=1e-3)
    assert not fallback and bool(torch.isfinite(z).all())
    ridged = gq + 1e-3 * torch.trace(gq) / 8 * torch.eye(8, dtype=F64)
    torch.testing.assert_close(z.T @ ridged @ z, _eye(3), atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- residual


def test_residual_zero_for_exact_singular_basis():
    _, _, gq, gk = _heads(GAPPED)
    pq, _, sigma = lowrank_score_maps(gq, gk, R)
    z = pq / sigma[..., None, :R].sqrt()  # columns of P_q are G_q-orthogonal with norms σ^{1/2}
    torch.testing.assert_close(z.transpose(-2, -1) @ gq @ z, _eye(R).expand(3, R, R), atol=1e-10, rtol=0)
    res = subspace_residual(gq, gk, z)
    assert res.shape == (3,)
    assert float(res.max()) < 1e-8


def test_residual_zero_for_converged_iteration_and_full_basis():
    _, _, gq, gk = _heads(GAPPED, seeds_=(5, 6))
    z, _ = subspace_iteration(gq, gk, torch.randn(2, 10, R, generator=gen(11), dtype=F64), steps=40)
    assert float(subspace_residual(gq, gk, z).max()) < 1e-8
    full, _ = cholesky_qr2(torch.randn(2, 10, 10, generator=gen(12), dtype=F64), gq)
    assert float(subspace_residual(gq, gk, full).max()) < 1e-8


def test_residual_positive_for_random_basis_and_shrinks_with_iteration():
    _, _, gq, gk = _heads(GAPPED)
    z, _ = cholesky_qr2(torch.randn(3, 10, R, generator=gen(13), dtype=F64), gq)
    res = [subspace_residual(gq, gk, z)]
    for _ in range(5):
        z, _ = subspace_iteration(gq, gk, z, steps=1)
        res.append(subspace_residual(gq, gk, z))
    assert bool((res[0] > 1e-2).all()) and bool((res[0] <= 1).all())
    assert bool((res[-1] < res[0]).all())


@settings(max_examples=30, deadline=None)
@given(seed=seeds, length=st.integers(16, 64), d=st.integers(2, 16), data=st.data())
def test_residual_in_unit_interval(seed, length, d, data):
    r = data.draw(st.integers(1, d))
    g = gen(seed)
    q, k = (torch.randn(length, d, generator=g, dtype=F64) for _ in range(2))
    gq, gk = gram(q), gram(k)
    z, _ = cholesky_qr2(torch.randn(d, r, generator=g, dtype=F64), gq)
    res = float(subspace_residual(gq, gk, z))
    assert 0.0 <= res <= 1.0
    if r == d:
        assert res < 1e-8
