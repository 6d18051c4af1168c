"""Perturbation bounds: each is checked against the quantity it bounds, on random and near-degenerate spectra
(clusters of nearly or exactly equal values, tiny values, exact zeros)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.linalg import (
    davis_kahan_sin_theta,
    naive_lowrank_scores,
    output_error_bound,
    prob_error_bound,
    rank_transition_cost,
    sin_theta,
    spectral_norm_bounds,
    tail_energy,
    wedin_sin_theta,
    weyl_bound,
    yu_wang_samworth_sin_theta,
)
from tests.linalg.helpers import F64, gen, orthonormal, qk_with_spectrum, seeds, spectra

PROPERTY = settings(max_examples=40, deadline=None)
DELTA_SCALES = st.sampled_from([1e-8, 1e-6, 1e-4, 1e-2, 0.1, 1.0])


def _sym_noise(d: int, scale: float, g: torch.Generator) -> torch.Tensor:
    """Symmetric perturbation with spectral norm exactly ``scale``."""
    a = torch.randn(d, d, generator=g, dtype=F64)
    a = a + a.T
    return a * (scale / torch.linalg.matrix_norm(a, ord=2))


def _top_eigvecs(h: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.eigh(h)[1].flip(-1)[..., :r]


def _truncate(q, k, r):
    return naive_lowrank_scores(q, k, r) if r else torch.zeros(q.shape[-2], k.shape[-2], dtype=q.dtype)


# ----------------------------------------------------------------------------- rank transitions


@PROPERTY
@given(vals=spectra(max_d=8), seed=seeds, data=st.data())
def test_rank_transition_cost_is_distance_between_truncations(vals, seed, data):
    d = len(vals)
    r, r2 = data.draw(st.integers(0, d)), data.draw(st.integers(0, d))
    q, k = qk_with_spectrum(vals, 2 * d + 3, gen(seed))
    sigma = torch.tensor(vals, dtype=F64)
    measured = torch.linalg.matrix_norm(_truncate(q, k, r) - _truncate(q, k, r2))
    cost = rank_transition_cost(sigma, r, r2)
    assert float(cost) == pytest.approx(float(measured), rel=1e-9, abs=1e-10 * (1 + vals[0]))
    assert float(cost) == float(rank_transition_cost(sigma, r2, r))


def test_rank_transition_cost_batched_and_exact_values():
    sigma = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(rank_transition_cost(sigma, 1, 3), torch.tensor([math.sqrt(13.0), 1.0], dtype=F64))
    torch.testing.assert_close(rank_transition_cost(sigma, 0, 4), tail_energy(sigma)[..., 0].sqrt())
    assert bool((rank_transition_cost(sigma, 2, 2) == 0).all())


# ----------------------------------------------------------------------------- softmax and output chain


@PROPERTY
@given(
    a=st.lists(st.floats(-30, 30), min_size=1, max_size=16),
    seed=seeds,
    scale=st.sampled_from([1e-6, 1e-2, 1.0, 10.0]),
)
def test_row_softmax_is_half_lipschitz(a, seed, scale):
    a = torch.tensor(a, dtype=F64)
    b = a + scale * torch.randn(a.shape, generator=gen(seed), dtype=F64)
    lhs = torch.linalg.vector_norm(a.softmax(-1) - b.softmax(-1))
    assert float(lhs) <= 0.5 * float(torch.linalg.vector_norm(a - b)) * (1 + 1e-12) + 1e-15


def test_half_lipschitz_constant_is_attained():
    """At uniform two-way logits a small antisymmetric push moves the softmax by ½ of it: ½ is sharp, and the
    bound (d_head = 1, one row) is attained up to O(ε²)."""
    eps = 1e-5
    a, b = torch.zeros(1, 2, dtype=F64), torch.tensor([[eps, -eps]], dtype=F64)
    moved = torch.linalg.matrix_norm(a.softmax(-1) - b.softmax(-1))
    bound = prob_error_bound(torch.linalg.matrix_norm(a - b), 1)
    assert float(moved) <= float(bound)
    assert float(moved) == pytest.approx(float(bound), rel=1e-8)


def test_error_bound_formulas():
    assert prob_error_bound(2.0, 4) == pytest.approx(0.5)
    assert prob_error_bound(torch.tensor([1.0, 6.0]), 9).tolist() == pytest.approx([1 / 6, 1.0])
    assert output_error_bound(0.5, 3.0) == pytest.approx(1.5)
    assert output_error_bound(torch.tensor(0.25), torch.tensor(4.0)).item() == pytest.approx(1.0)


def _attention_probs(s: torch.Tensor, d: int, causal: bool) -> torch.Tensor:
    logits = s / d**0.5
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool).triu(1)
        logits = logits.masked_fill(mask, float("-inf"))
    return logits.softmax(-1)


@PROPERTY
@given(
    vals=spectra(max_d=8),
    seed=seeds,
    length=st.integers(1, 32),
    causal=st.booleans(),
    v_scale=st.sampled_from([1e-3, 1.0, 30.0]),
    data=st.data(),
)
def test_attention_prob_and_output_chain(vals, seed, length, causal, v_scale, data):
    d = len(vals)
    length = max(length, d)
    r = data.draw(st.integers(0, d))
    g = gen(seed)
    q, k = qk_with_spectrum(vals, length, g)
    v = v_scale * torch.randn(length, data.draw(st.integers(1, 8)), generator=g, dtype=F64)
    s, s_r = q @ k.T, _truncate(q, k, r)
    p, p_r = _attention_probs(s, d, causal), _attention_probs(s_r, d, causal)
    prob_err = torch.linalg.matrix_norm(p - p_r)

    score_err = tail_energy(torch.tensor(vals, dtype=F64))[r].sqrt()
    assert float(torch.linalg.matrix_norm(s - s_r)) == pytest.approx(
        float(score_err), rel=1e-8, abs=1e-10 * (1 + vals[0])
    )
    p_bound = prob_error_bound(score_err, d)
    assert float(prob_err) <= float(p_bound) + 1e-12

    upper = spectral_norm_bounds(v.T @ v)[1].sqrt()
    assert float(upper) >= float(torch.linalg.matrix_norm(v, ord=2)) * (1 - 1e-12)
    out_err = torch.linalg.matrix_norm(p @ v - p_r @ v)
    assert float(out_err) <= float(output_error_bound(p_bound, upper)) + 1e-12 * (1 + v_scale)
    # the tighter form with the measured ‖P − P̃‖_F holds as well
    assert float(out_err) <= float(output_error_bound(prob_err, upper)) * (1 + 1e-12) + 1e-14 * (1 + v_scale)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("rank", [0, 1, 3, 6], ids=lambda r: f"r{r}")
def test_attention_chain_batched_heads(causal, rank):
    g = gen(rank)
    q, k, v = (torch.randn(4, 48, 6, generator=g, dtype=F64) * 2 for _ in range(3))
    s = q @ k.transpose(-2, -1)
    s_r = naive_lowrank_scores(q, k, rank) if rank else torch.zeros_like(s)
    p, p_r = _attention_probs(s, 6, causal), _attention_probs(s_r, 6, causal)
    sigma = torch.linalg.svdvals(s)[..., :6]
    p_bound = prob_error_bound(tail_energy(sigma)[..., rank].sqrt(), 6)
    assert p_bound.shape == (4,)
    assert bool((torch.linalg.matrix_norm(p - p_r) <= p_bound + 1e-12).all())
    upper = spectral_norm_bounds(v.transpose(-2, -1) @ v)[1].sqrt()
    o_err = torch.linalg.matrix_norm((p - p_r) @ v)
    assert bool((o_err <= output_error_bound(p_bound, upper) + 1e-12).all())


# ----------------------------------------------------------------------------- spectral norm bounds


@PROPERTY
@given(vals=spectra(min_d=1, max_d=16), seed=seeds, length=st.integers(1, 64))
def test_spectral_norm_bounds_bracket_lambda_max(vals, seed, length):
    d = len(vals)
    g = gen(seed)
    w = orthonormal(d, d, g=g)
    gram_v = (w * torch.tensor(vals, dtype=F64).square()) @ w.T  # = VᵀV for V = U diag(vals) Wᵀ
    lam = float(torch.linalg.eigvalsh(gram_v)[-1])
    lower, upper = (float(x) for x in spectral_norm_bounds(gram_v))
    if vals[0] == 0:
        assert lower == upper == 0.0
        return
    assert 0 <= lower <= lam * (1 + 1e-10)
    assert upper >= lam * (1 - 1e-10)
    assert upper <= lam * d ** (1 / 16) * (1 + 1e-6)


@pytest.mark.parametrize("squarings", [0, 1, 2, 4, 6], ids=lambda n: f"sq{n}")
def test_spectral_norm_upper_tightens_with_squarings(squarings):
    v = torch.randn(3, 40, 12, generator=gen(squarings), dtype=F64)
    gv = v.transpose(-2, -1) @ v
    lam = torch.linalg.eigvalsh(gv)[..., -1]
    lower, upper = spectral_norm_bounds(gv, squarings=squarings)
    assert lower.shape == upper.shape == (3,)
    n = 2**squarings
    assert bool((upper >= lam * (1 - 1e-12)).all())
    assert bool((upper <= lam * 12 ** (1 / n) * (1 + 1e-9)).all())
    if squarings == 0:
        torch.testing.assert_close(upper, gv.diagonal(dim1=-2, dim2=-1).sum(-1))


@pytest.mark.parametrize("iters", [1, 3, 30], ids=lambda n: f"it{n}")
def test_spectral_norm_lower_is_rayleigh_quotient(iters):
    g = gen(iters)
    w = orthonormal(10, 10, g=g)
    vals = torch.cat([torch.tensor([4.0], dtype=F64), torch.linspace(2.0, 0.1, 9, dtype=F64)])
    gv = (w * vals) @ w.T  # top eigen-gap ratio ½: 30 power steps converge
    lam = float(torch.linalg.eigvalsh(gv)[-1])
    lower, _ = spectral_norm_bounds(gv, iters=iters)
    assert 0 < float(lower) <= lam * (1 + 1e-12)
    if iters == 30:
        assert float(lower) == pytest.approx(lam, rel=1e-6)


def test_spectral_norm_bounds_zero_matrix():
    lower, upper = spectral_norm_bounds(torch.zeros(2, 5, 5, dtype=F64))
    assert bool((lower == 0).all()) and bool((upper == 0).all())


def test_spectral_norm_bounds_float32():
    v = torch.randn(2, 64, 16, generator=gen(1))
    gv = v.transpose(-2, -1) @ v
    lam = torch.linalg.eigvalsh(gv.double())[..., -1]
    lower, upper = spectral_norm_bounds(gv)
    assert upper.dtype == torch.float32
    assert bool((lower.double() <= lam * (1 + 1e-5)).all())
    assert bool((upper.double() >= lam * (1 - 1e-5)).all())


# ----------------------------------------------------------------------------- Weyl


@PROPERTY
@given(vals=spectra(max_d=12), seed=seeds, scale=DELTA_SCALES, signed=st.booleans())
def test_weyl_symmetric_eigenvalues(vals, seed, scale, signed):
    d = len(vals)
    g = gen(seed)
    lam = torch.tensor(vals, dtype=F64)
    if signed:
        lam = lam * torch.where(torch.rand(d, generator=g, dtype=F64) < 0.5, -1.0, 1.0)
    w = orthonormal(d, d, g=g)
    h = (w * lam) @ w.T
    delta = _sym_noise(d, scale * (1 + vals[0]), g)
    moved = (torch.linalg.eigvalsh(h + delta) - torch.linalg.eigvalsh(h)).abs().max()
    assert float(moved) <= float(weyl_bound(delta)) + 1e-12 * (1 + vals[0])


@PROPERTY
@given(vals=spectra(max_d=12), seed=seeds, scale=DELTA_SCALES)
def test_weyl_singular_values_non_symmetric(vals, seed, scale):
    d = len(vals)
    g = gen(seed)
    a, b = orthonormal(d, d, g=g), orthonormal(d, d, g=g)
    c = (a * torch.tensor(vals, dtype=F64)) @ b.T
    delta = scale * (1 + vals[0]) * torch.randn(d, d, generator=g, dtype=F64)
    moved = (torch.linalg.svdvals(c + delta) - torch.linalg.svdvals(c)).abs().max()
    assert float(moved) <= float(weyl_bound(delta)) + 1e-12 * (1 + vals[0])


def test_weyl_bound_is_spectral_norm_and_sharp():
    delta = torch.randn(3, 6, 6, generator=gen(2), dtype=F64)
    torch.testing.assert_close(weyl_bound(delta), torch.linalg.svdvals(delta)[..., 0])
    h = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64))
    shift = 0.25 * torch.eye(3, dtype=F64)
    moved = (torch.linalg.eigvalsh(h + shift) - torch.linalg.eigvalsh(h)).abs().max()
    assert float(moved) == pytest.approx(float(weyl_bound(shift)))


# ----------------------------------------------------------------------------- subspace perturbation


def _psd(vals, g):
    d = len(vals)
    w = orthonormal(d, d, g=g)
    return (w * torch.tensor(vals, dtype=F64)) @ w.T


@PROPERTY
@given(vals=spectra(max_d=10), seed=seeds, scale=DELTA_SCALES, data=st.data())
def test_davis_kahan_and_yws_bound_eigenspace_rotation(vals, seed, scale, data):
    d = len(vals)
    r = data.draw(st.integers(1, d - 1))
    g = gen(seed)
    h = _psd(vals, g)
    delta = _sym_noise(d, scale * max(vals[0], 1e-3), g)
    u1, u2 = _top_eigvecs(h, r), _top_eigvecs(h + delta, r)
    eig = torch.tensor(vals, dtype=F64)
    norm2, fro = torch.linalg.matrix_norm(delta, ord=2), torch.linalg.matrix_norm(delta)

    dk = davis_kahan_sin_theta(eig, r, norm2)
    assert 0 <= float(dk) <= 1
    assert float(sin_theta(u1, u2)) <= float(dk) + 1e-9

    yws = yu_wang_samworth_sin_theta(eig, r, norm2, fro)
    assert 0 <= float(yws) <= r**0.5 + 1e-12
    assert float(sin_theta(u1, u2, "fro")) <= float(yws) + 1e-9


@PROPERTY
@given(vals=spectra(max_d=10), seed=seeds, scale=DELTA_SCALES, data=st.data())
def test_wedin_bounds_singular_subspace_rotation(vals, seed, scale, data):
    d = len(vals)
    r = data.draw(st.integers(1, d - 1))
    g = gen(seed)
    a, b = orthonormal(d, d, g=g), orthonormal(d, d, g=g)
    c = (a * torch.tensor(vals, dtype=F64)) @ b.T
    delta = torch.randn(d, d, generator=g, dtype=F64)
    delta = delta * (scale * max(vals[0], 1e-3) / torch.linalg.matrix_norm(delta, ord=2))
    u, _, vh = torch.linalg.svd(c)
    u2, _, vh2 = torch.linalg.svd(c + delta)
    measured = max(float(sin_theta(u[:, :r], u2[:, :r])), float(sin_theta(vh[:r].T, vh2[:r].T)))
    bound = wedin_sin_theta(torch.tensor(vals, dtype=F64), r, torch.linalg.matrix_norm(delta, ord=2))
    assert 0 <= float(bound) <= 1
    assert measured <= float(bound) + 1e-9


def test_subspace_bounds_exact_values():
    eig = torch.tensor([4.0, 3.0, 1.0, 0.5], dtype=F64)
    n2, fro = torch.tensor(0.1, dtype=F64), torch.tensor(0.12, dtype=F64)
    assert float(davis_kahan_sin_theta(eig, 2, n2)) == pytest.approx(0.1 / 1.9)
    assert float(wedin_sin_theta(eig, 1, n2)) == pytest.approx(0.1 / 0.9)
    assert float(yu_wang_samworth_sin_theta(eig, 2, n2, fro)) == pytest.approx(2 * 0.12 / 2.0)
    assert float(yu_wang_samworth_sin_theta(eig, 2, n2, torch.tensor(0.5, dtype=F64))) == pytest.approx(
        2 * 2**0.5 * 0.1 / 2.0
    )
    # gap eaten by the perturbation: trivial values
    assert float(davis_kahan_sin_theta(eig, 2, torch.tensor(2.5, dtype=F64))) == 1.0
    assert float(yu_wang_samworth_sin_theta(eig, 3, torch.tensor(5.0, dtype=F64), fro * 100)) == pytest.approx(3**0.5)


def test_subspace_bounds_batched():
    eig = torch.tensor([[4.0, 3.0, 1.0], [2.0, 2.0, 1.0], [5.0, 1.0, 0.0]], dtype=F64)
    n2 = torch.tensor([0.1, 0.1, 5.0], dtype=F64)
    dk = davis_kahan_sin_theta(eig, 1, n2)
    torch.testing.assert_close(dk, torch.tensor([0.1 / 0.9, 1.0, 1.0], dtype=F64))
    yws = yu_wang_samworth_sin_theta(eig, 1, n2, n2)
    torch.testing.assert_close(yws, torch.tensor([0.2, 1.0, 1.0], dtype=F64))
    assert wedin_sin_theta(eig, 2, n2).shape == (3,)


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 0.5], ids=lambda s: f"delta{s:g}")
def test_degenerate_gap_gives_trivial_bounds_that_hold(scale):
    vals, r = [3.0, 2.0, 2.0, 1.0], 2  # λ_2 = λ_3: the top-2 eigenspace is not determined
    g = gen(7)
    h = _psd(vals, g)
    delta = _sym_noise(4, scale, g)
    eig = torch.tensor(vals, dtype=F64)
    norm2, fro = torch.linalg.matrix_norm(delta, ord=2), torch.linalg.matrix_norm(delta)
    dk = davis_kahan_sin_theta(eig, r, norm2)
    yws = yu_wang_samworth_sin_theta(eig, r, norm2, fro)
    wedin = wedin_sin_theta(eig, r, norm2)
    assert float(dk) == float(wedin) == 1.0
    assert float(yws) == pytest.approx(2**0.5)
    u1, u2 = _top_eigvecs(h, r), _top_eigvecs(h + delta, r)
    assert float(sin_theta(u1, u2)) <= float(dk) + 1e-9
    assert float(sin_theta(u1, u2, "fro")) <= float(yws) + 1e-9


@pytest.mark.parametrize("r", [0, 4, 5, -1], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("fn", ["davis_kahan", "yws", "wedin"])
def test_rank_out_of_range_raises(fn, r):
    eig, n2 = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64), torch.tensor(0.1, dtype=F64)
    call = {
        "davis_kahan": lambda: davis_kahan_sin_theta(eig, r, n2),
        "yws": lambda: yu_wang_samworth_sin_theta(eig, r, n2, n2),
        "wedin": lambda: wedin_sin_theta(eig, r, n2),
    }[fn]
    with pytest.raises(ValueError, match="rank r"):
        call()


def test_sin_theta_measures_angles():
    g = gen(8)
    u = orthonormal(6, 6, g=g)
    a, b = u[:, :2], u[:, 2:4]
    assert float(sin_theta(a, a)) == pytest.approx(0.0, abs=1e-12)
    assert float(sin_theta(a, a @ orthonormal(2, 2, g=g))) == pytest.approx(0.0, abs=1e-12)
    assert float(sin_theta(a, b)) == pytest.approx(1.0)
    assert float(sin_theta(a, b, "fro")) == pytest.approx(2**0.5)
    t = 0.3
    rotated = torch.stack([u[:, 0] * math.cos(t) + u[:, 5] * math.sin(t), u[:, 1]], -1)
    assert float(sin_theta(a, rotated)) == pytest.approx(math.sin(t))
