"""Delta-rule ops: recurrent == naive float64 reference, chunked WY form == recurrent (outputs, final states and
gradients), state carry-over, causality, the decode step, the state-norm bound and rank utilisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.linear_attention import (
    delta_rule_chunked,
    delta_rule_recurrent,
    delta_rule_step,
    naive_delta_rule,
    state_rank_utilisation,
)
from tests.linalg.helpers import F64, gen

B, H, DK, DV = 2, 2, 16, 24


def _inputs(t, gated, seed=0, dtype=F64, b=B, h=H, dk=DK, dv=DV, decay=1.0):
    """q, k unit-norm (b, h, t, dk), v (b, h, t, dv), beta in (0, 1), g ≤ 0 (or None), initial state."""
    g_ = gen(seed)
    q = F.normalize(torch.randn(b, h, t, dk, generator=g_, dtype=F64), dim=-1)
    k = F.normalize(torch.randn(b, h, t, dk, generator=g_, dtype=F64), dim=-1)
    v = torch.randn(b, h, t, dv, generator=g_, dtype=F64)
    beta = torch.sigmoid(torch.randn(b, h, t, generator=g_, dtype=F64))
    g = -decay * F.softplus(torch.randn(b, h, t, generator=g_, dtype=F64))
    s0 = torch.randn(b, h, dk, dv, generator=g_, dtype=F64)
    return tuple(x.to(dtype) for x in (q, k, v, beta)) + (g.to(dtype) if gated else None, s0.to(dtype))


def _close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _chunked(q, k, v, beta, g, c, s0=None):
    return delta_rule_chunked(q, k, v, beta, g, chunk_size=c, initial_state=s0, output_final_state=True)


def _recurrent(q, k, v, beta, g, s0=None):
    return delta_rule_recurrent(q, k, v, beta, g, initial_state=s0, output_final_state=True)


GATED = pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])


# ----------------------------------------------------------------------------- recurrent vs naive


@GATED
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_recurrent_matches_naive(gated, with_state):
    q, k, v, beta, g, s0 = _inputs(23, gated, seed=1)
    s0 = s0 if with_state else None
    o_ref, states = naive_delta_rule(q, k, v, beta, g, initial_state=s0)
    o, s = _recurrent(q, k, v, beta, g, s0)
    _close(o, o_ref, 1e-12)
    _close(s, states[:, :, -1], 1e-12)
    # a non-default scale is a plain factor on the output
    o2, _ = delta_rule_recurrent(q, k, v, beta, g, scale=0.3, initial_state=s0)
    _close(o2, o_ref * (0.3 / DK**-0.5), 1e-12)


def test_naive_explicit_two_tokens():
    """Two tokens worked by hand: S_1 = β₁ k₁ v₁ᵀ, S_2 = α₂ (S_1 − β₂ k₂ (k₂ᵀ S_1)) + β₂ k₂ v₂ᵀ."""
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=F64)
    v = torch.tensor([[2.0, -1.0, 0.5], [1.0, 3.0, -2.0]], dtype=F64)
    beta, g = torch.tensor([0.5, 0.25], dtype=F64), torch.tensor([0.0, -0.7], dtype=F64)
    s1 = 0.5 * torch.outer(k[0], v[0])
    s2 = torch.exp(g[1]) * (s1 - 0.25 * torch.outer(k[1], k[1] @ s1)) + 0.25 * torch.outer(k[1], v[1])
    q = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    expand = lambda x: x[None, None]
    o, states = naive_delta_rule(expand(q), expand(k), expand(v), expand(beta), expand(g), scale=1.0)
    _close(states[0, 0, 1], s2, 1e-15)
    _close(o[0, 0], torch.stack([s1.T @ q[0], s2.T @ q[1]]), 1e-15)


# ----------------------------------------------------------------------------- chunked vs recurrent


@GATED
@pytest.mark.parametrize("t", [1, 63, 64, 130])
@pytest.mark.parametrize("c", [16, 64])
def test_chunked_matches_recurrent_float64(gated, t, c):
    q, k, v, beta, g, s0 = _inputs(t, gated, seed=t + c)
    for init in (None, s0):
        o_ref, s_ref = _recurrent(q, k, v, beta, g, init)
        o, s = _chunked(q, k, v, beta, g, c, init)
        assert o.dtype == s.dtype == F64 and o.shape == (B, H, t, DV)
        _close(o, o_ref, 1e-10)
        _close(s, s_ref, 1e-10)


@GATED
@pytest.mark.parametrize("t,c", [(63, 16), (130, 64)])
def test_chunked_matches_recurrent_float32(gated, t, c):
    q, k, v, beta, g, s0 = _inputs(t, gated, seed=7)
    o_ref, s_ref = _recurrent(q, k, v, beta, g, s0)  # float64
    f32 = [None if x is None else x.float() for x in (q, k, v, beta, g, s0)]
    o, s = _chunked(*f32[:5], c, f32[5])
    o_rec, s_rec = _recurrent(*f32)
    assert o.dtype == s.dtype == torch.float32
    for got in (o, o_rec):
        _close(got.double(), o_ref, 1e-5)
    _close(s.double(), s_ref, 1e-5)
    _close(o, o_rec, 1e-5)


def test_chunked_strong_decay_float32_is_finite():
    """exp(G) underflows to 0 over a 64-token chunk with g ≈ −8; the masked decays must not overflow."""
    q, k, v, beta, g, _ = _inputs(100, True, seed=3, decay=8.0)
    o_ref, s_ref = _recurrent(q, k, v, beta, g)
    o, s = _chunked(q.float(), k.float(), v.float(), beta.float(), g.float(), 64)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    _close(o.double(), o_ref, 1e-5)
    _close(s.double(), s_ref, 1e-5)


@GATED
def test_gradients_match_recurrent(gated):
    q, k, v, beta, g, s0 = _inputs(37, gated, seed=11)
    w_o = torch.randn(B, H, 37, DV, generator=gen(12), dtype=F64)
    w_s = torch.randn(B, H, DK, DV, generator=gen(13), dtype=F64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, s0) + ((g,) if gated else ())]

    def grads(fn):
        xs = [x.detach().clone().requires_grad_() for x in leaves]
        q_, k_, v_, b_, s0_ = xs[:5]
        o, s = fn(q_, k_, v_, b_, xs[5] if gated else None, s0_)
        ((o * w_o).sum() + (s * w_s).sum()).backward()
        return [x.grad for x in xs]

    ref = grads(lambda *a: _recurrent(*a))
    got = grads(lambda q_, k_, v_, b_, g_, s0_: _chunked(q_, k_, v_, b_, g_, 16, s0_))
    for name, a, r in zip(["q", "k", "v", "beta", "initial_state", "g"], got, ref, strict=False):
        assert r.abs().max() > 1e-3, name  # the loss depends on every input
        _close(a, r, 1e-9)


def test_chunked_gradcheck_tiny():
    q, k, v, beta, g, s0 = (x.requires_grad_() for x in _inputs(7, True, seed=5, b=1, h=1, dk=3, dv=2))
    fn = lambda *a: _chunked(*a[:5], 3, a[5])
    assert torch.autograd.gradcheck(fn, (q, k, v, beta, g, s0))


# ----------------------------------------------------------------------------- carry-over, decode step, causality


@GATED
@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_split_sequence_carries_state(gated, form):
    q, k, v, beta, g, s0 = _inputs(70, gated, seed=21)
    run = (lambda *a, s=None: _chunked(*a, 16, s)) if form == "chunked" else (lambda *a, s=None: _recurrent(*a, s))
    o_all, s_all = run(q, k, v, beta, g, s=s0)
    cut = lambda x, sl: None if x is None else x[:, :, sl]
    o1, s1 = run(*(cut(x, slice(0, 29)) for x in (q, k, v, beta, g)), s=s0)
    o2, s2 = run(*(cut(x, slice(29, None)) for x in (q, k, v, beta, g)), s=s1)
    _close(torch.cat([o1, o2], 2), o_all, 1e-10)
    _close(s2, s_all, 1e-10)


@GATED
def test_step_matches_recurrent(gated):
    q, k, v, beta, g, s0 = (None if x is None else x.float() for x in _inputs(20, gated, seed=31))
    o_ref, s_ref = _recurrent(q, k, v, beta, g, s0)
    s, outs = s0, []
    for t in range(20):
        o, s = delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], None if g is None else g[:, :, t], s)
        assert o.dtype == s.dtype == torch.float32 and o.shape == (B, H, DV)
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 2), o_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-6)


@GATED
def test_chunked_is_causal(gated):
    t0, t = 21, 50  # t0 inside the second chunk of 16
    q, k, v, beta, g, s0 = _inputs(t, gated, seed=41)
    o, _ = _chunked(q, k, v, beta, g, 16, s0)
    g_ = gen(42)
    bump = lambda x: torch.cat(
        [x[:, :, :t0], x[:, :, t0:] + 5 * torch.randn(x[:, :, t0:].shape, generator=g_, dtype=F64)], 2
    )
    q2, k2, v2 = bump(q), F.normalize(bump(k), dim=-1), bump(v)
    beta2 = torch.cat([beta[:, :, :t0], 1 - beta[:, :, t0:]], 2)
    g2 = None if g is None else torch.cat([g[:, :, :t0], 10 * g[:, :, t0:] - 3], 2)
    o2, _ = _chunked(q2, k2, v2, beta2, g2, 16, s0)
    torch.testing.assert_close(o2[:, :, :t0], o[:, :, :t0], rtol=0, atol=1e-13)
    assert (o2[:, :, t0:] - o[:, :, t0:]).abs().amax() > 1e-2  # the perturbation did reach later outputs


# ----------------------------------------------------------------------------- state norm bound (property)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    dk=st.integers(1, 6),
    dv=st.integers(1, 6),
    n_keys=st.integers(1, 4),
    beta_max=st.sampled_from([0.5, 0.99, 1.0 - 1e-9]),
    gated=st.booleans(),
)
def test_state_norm_bound(seed, dk, dv, n_keys, beta_max, gated):
    """With ‖k‖ = 1, β ∈ (0, 1), α ≤ 1: ‖S_t‖₂² ≤ α_t² ‖S_{t−1}‖₂² + β_t ‖v_t‖² (the k-component of S_t x is
    a convex combination of α kᵀS x and vᵀx), so ‖S_t‖₂ never exceeds the accumulated bound. Keys are drawn
    from a small pool to provoke repeated and nearly parallel writes."""
    t, g_ = 24, gen(seed)
    pool = F.normalize(torch.randn(n_keys, dk, generator=g_, dtype=F64), dim=-1)
    k = pool[torch.randint(n_keys, (1, 1, t), generator=g_)]
    v = 3 * torch.randn(1, 1, t, dv, generator=g_, dtype=F64)
    beta = beta_max * torch.rand(1, 1, t, generator=g_, dtype=F64).clamp(min=1e-3)
    g = -torch.rand(1, 1, t, generator=g_, dtype=F64) if gated else None
    s, bound = torch.zeros(1, 1, dk, dv, dtype=F64), 0.0
    for i in range(t):
        alpha2 = 1.0 if g is None else float(torch.exp(2 * g[0, 0, i]))
        gi = None if g is None else g[:, :, i]
        _, s_new = delta_rule_step(k[:, :, i], k[:, :, i], v[:, :, i], beta[:, :, i], gi, s)
        norm2 = lambda x: float(torch.linalg.matrix_norm(x[0, 0], ord=2)) ** 2
        step_bound = alpha2 * norm2(s) + float(beta[0, 0, i]) * float(v[0, 0, i].square().sum())
        assert norm2(s_new) <= step_bound * (1 + 1e-9) + 1e-12
        bound = alpha2 * bound + float(beta[0, 0, i]) * float(v[0, 0, i].square().sum())
        s = s_new
    _, s_chunk = _chunked(k, k, v, beta, g, 8)
    assert float(torch.linalg.matrix_norm(s_chunk[0, 0], ord=2)) ** 2 <= bound * (1 + 1e-9)


# ----------------------------------------------------------------------------- rank utilisation


@GATED
def test_utilisation_matches_naive_states(gated):
    q, k, v, beta, g, _ = _inputs(30, gated, seed=51)
    out = state_rank_utilisation(q, k, v, beta, g)
    _, states = naive_delta_rule(q, k, v, beta, g)
    fro2 = torch.linalg.matrix_norm(states).square()
    sr = fro2 / torch.linalg.matrix_norm(states, ord=2).square()
    sig = torch.linalg.svdvals(states)
    p = sig / sig.sum(-1, keepdim=True)
    erank = torch.exp(-(p * torch.log(p)).sum(-1))
    _close(out["stable_rank"], sr, 1e-10)
    _close(out["utilisation"], sr / min(DK, DV), 1e-10)
    _close(out["effective_rank"], erank, 1e-10)
    u = out["utilisation"]
    assert u.shape == (B, H, 30) and (u > 0).all() and (u <= 1 + 1e-12).all()
    assert (out["effective_rank"] >= out["stable_rank"] - 1e-9).all()  # erank ≥ 1 / max p = Σσ/σ₁ ≥ Σσ²/σ₁² = sr


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_utilisation_repeated_key_is_rank_one(gated):
    q, _, v, beta, g, _ = _inputs(40, gated, seed=61, dtype=torch.float32)
    k = F.normalize(torch.randn(B, H, 1, DK, generator=gen(62)), dim=-1).expand(B, H, 40, DK)
    out = state_rank_utilisation(q, k, v, beta, g)
    ones = torch.ones(B, H, 40)
    torch.testing.assert_close(out["stable_rank"], ones, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["effective_rank"], ones, rtol=0, atol=1e-3)
    torch.testing.assert_close(out["utilisation"], ones / min(DK, DV), rtol=0, atol=1e-6)
    assert out["stable_rank"].dtype == torch.float32


def test_utilisation_orthonormal_writes_reach_one():
    """Writing e_i → e_i with β = 1 for i = 1..d builds S = I after d tokens: full utilisation."""
    d = 5
    eye = torch.eye(d, dtype=F64)[None, None]  # (1, 1, T = d, K = d)
    out = state_rank_utilisation(eye, eye, eye, torch.ones(1, 1, d, dtype=F64))
    _close(out["stable_rank"][0, 0], torch.arange(1, d + 1, dtype=F64), 1e-12)
    _close(out["utilisation"][0, 0, -1], torch.tensor(1.0, dtype=F64), 1e-12)


# ----------------------------------------------------------------------------- dtypes and input checks


@GATED
def test_bfloat16_inputs(gated):
    q, k, v, beta, g, _ = _inputs(40, gated, seed=71, dtype=torch.float32)
    o32, _ = _chunked(q, k, v, beta, g, 16)
    bf = [None if x is None else x.bfloat16() for x in (q, k, v, beta, g)]
    o, s = _chunked(*bf, 16)
    o_rec, s_rec = _recurrent(*bf)
    assert o.dtype == o_rec.dtype == torch.bfloat16 and s.dtype == s_rec.dtype == torch.float32
    scale = o32.abs().max()
    for got in (o, o_rec):
        assert (got.float() - o32).abs().max() < 0.03 * scale
    torch.testing.assert_close(o.float(), o_rec.float(), rtol=0, atol=0.01 * float(scale))


def test_bad_inputs_raise():
    q, k, v, beta, g, s0 = _inputs(5, True)
    with pytest.raises(ValueError, match="q and k"):
        delta_rule_chunked(q, k[..., :3], v, beta, g)
    with pytest.raises(ValueError, match="v must"):
        delta_rule_recurrent(q, k, v[:, :, :4], beta, g)
    with pytest.raises(ValueError, match="beta must"):
        delta_rule_chunked(q, k, v, beta[..., :4], g)
    with pytest.raises(ValueError, match="initial_state"):
        delta_rule_chunked(q, k, v, beta, g, initial_state=s0[..., :3])
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule_chunked(q, k, v, beta, g, chunk_size=0)
    with pytest.raises(ValueError, match="state must"):
        delta_rule_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], beta[:, :, 0], g[:, :, 0], s0[..., :3])
