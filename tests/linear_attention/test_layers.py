"""DeltaNet token mixer: the short convolution (naive loop, step, tail, causality), the layer against its documented
equations, chunked forward == prefill + decode steps, causality, gradients, Q/K channel slicing and bf16."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.linear_attention import DeltaNet, ShortConvolution, naive_delta_rule
from tests.linalg.helpers import F64, gen

D, H, DK, DV = 16, 2, 8, 6
GATED = pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])


def _conv(c, k, seed=0) -> ShortConvolution:
    torch.manual_seed(seed)
    return ShortConvolution(c, k).double()


def _layer(gated, seed=0, chunk_size=4, dk=DK, dv=DV, **kw) -> DeltaNet:
    torch.manual_seed(seed)
    m = DeltaNet(D, H, dk, dv, gated=gated, chunk_size=chunk_size, **kw).double()
    with torch.no_grad():  # a non-trivial output norm, so its weight is exercised too
        m.o_norm.weight.copy_(1 + 0.3 * torch.randn(dv, dtype=F64))
    return m


def _x(t, seed=1, b=2, d=D, dtype=F64):
    return torch.randn(b, t, d, generator=gen(seed), dtype=F64).to(dtype)


def _close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- ShortConvolution


def naive_conv(conv: ShortConvolution, x: torch.Tensor) -> torch.Tensor:
    """y[b, t, c] = SiLU(Σ_j w[c, j] x[b, t − (K − 1) + j, c]), inputs before t = 0 read as zero."""
    b, t, c = x.shape
    k = conv.kernel_size[0]
    w = conv.weight[:, 0, :]
    y = torch.zeros_like(x)
    for ti in range(t):
        for j in range(k):
            src = ti - (k - 1) + j
            if src >= 0:
                y[:, ti] += w[:, j] * x[:, src]
    return F.silu(y)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_short_conv_matches_naive_loop_and_steps(k):
    conv, x = _conv(5, k), _x(9, d=5)
    y = conv(x)
    assert y.shape == x.shape
    _close(y, naive_conv(conv, x), 1e-13)
    cache = torch.zeros(2, 5, k - 1, dtype=F64)
    steps = []
    for t in range(x.shape[1]):
        out, cache = conv.step(x[:, t], cache)
        assert cache.shape == (2, 5, k - 1)
        steps.append(out)
    _close(torch.stack(steps, 1), y, 1e-13)


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 5), t=st.integers(1, 12), data=st.data())
def test_short_conv_tail_then_step_equals_forward(k, t, data):
    """The cache after any prefix (also one shorter than the kernel) continues the sequence exactly."""
    split = data.draw(st.integers(1, t))
    conv, x = _conv(3, k, seed=t), _x(t, seed=k, d=3)
    y = conv(x)
    cache = conv.tail(x[:, :split])
    assert cache.shape == (2, 3, k - 1)
    _close(conv(x[:, :split]), y[:, :split], 1e-13)
    for i in range(split, t):
        out, cache = conv.step(x[:, i], cache)
        _close(out, y[:, i], 1e-13)


def test_short_conv_is_causal():
    conv, x = _conv(4, 4), _x(10, d=4)
    y = conv(x)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    y2 = conv(x2)
    assert torch.equal(y2[:, :6], y[:, :6])
    assert not torch.allclose(y2[:, 6], y[:, 6])


# ----------------------------------------------------------------------------- DeltaNet: forward form


def reference_forward(m: DeltaNet, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's equations, term by term, with the float64 naive delta rule."""
    heads = lambda z, d: z.unflatten(-1, (m.n_head, d)).transpose(1, 2)
    q = F.normalize(heads(naive_conv(m.q_conv1d, x @ m.q_proj.weight.T), m.head_k_dim), dim=-1)
    k = F.normalize(heads(naive_conv(m.k_conv1d, x @ m.k_proj.weight.T), m.head_k_dim), dim=-1)
    v = heads(naive_conv(m.v_conv1d, x @ m.v_proj.weight.T), m.head_v_dim)
    beta = torch.sigmoid(x @ m.b_proj.weight.T).transpose(1, 2)
    g = None
    if m.gated:
        g = (-m.A_log.exp() * F.softplus(x @ m.a_proj.weight.T + m.dt_bias)).transpose(1, 2)
    o, _ = naive_delta_rule(q, k, v, beta, g, m.scale)
    o = o.transpose(1, 2)  # (B, T, H, d_v)
    o = o / (o.square().mean(-1, keepdim=True) + m.o_norm.eps).sqrt() * m.o_norm.weight
    if m.gated:
        o = o * F.silu((x @ m.g_proj.weight.T).unflatten(-1, (m.n_head, m.head_v_dim)))
    return o.flatten(-2) @ m.o_proj.weight.T


@GATED
def test_forward_matches_documented_equations(gated):
    m, x = _layer(gated), _x(11)
    _close(m(x), reference_forward(m, x), 1e-12)


@GATED
@pytest.mark.parametrize("prefix", [1, 4, 6], ids=lambda p: f"prefix{p}")
def test_prefill_then_steps_equals_forward(gated, prefix):
    """T = 11 with chunks of 4: prefixes that end on and off a chunk boundary."""
    m, x = _layer(gated), _x(11)
    y = m(x)
    cache = {}
    _close(m(x[:, :prefix], cache), y[:, :prefix], 1e-12)
    assert cache["state"].shape == (2, H, DK, DV)
    assert cache["q"].shape == cache["k"].shape == (2, H * DK, 3) and cache["v"].shape == (2, H * DV, 3)
    for t in range(prefix, 11):
        _close(m.step(x[:, t], cache), y[:, t], 1e-10)


@GATED
def test_steps_from_empty_cache_equal_forward(gated):
    m, x = _layer(gated), _x(9)
    y = m(x)
    cache = m.empty_cache(2, dtype=F64)
    for t in range(9):
        out = m.step(x[:, t], cache)
        assert out.shape == (2, D) and out.dtype == F64
        _close(out, y[:, t], 1e-10)


@GATED
def test_forward_is_causal_inside_a_chunk(gated):
    m, x = _layer(gated, chunk_size=4), _x(13)  # T not a multiple of 4; t0 = 6 is in the middle of chunk 1
    y = m(x)
    x2 = x.clone()
    x2[:, 6:] += torch.randn(2, 7, D, generator=gen(5), dtype=F64)
    y2 = m(x2)
    _close(y2[:, :6], y[:, :6], 1e-14)
    assert (y2[:, 6] - y[:, 6]).abs().max() > 1e-3


@GATED
def test_chunk_size_does_not_change_the_output(gated):
    m, x = _layer(gated, chunk_size=4), _x(13)
    y = m(x)
    for c in (1, 5, 64):
        m.chunk_size = c
        _close(m(x), y, 1e-12)


@GATED
def test_gradients_reach_every_parameter(gated):
    m, x = _layer(gated), _x(7)
    x.requires_grad_(True)
    (m(x) * torch.randn(2, 7, D, generator=gen(3), dtype=F64)).sum().backward()
    names = {n for n, _ in m.named_parameters()}
    gate_params = {"A_log", "dt_bias", "a_proj.weight", "g_proj.weight"}
    assert gate_params <= names if gated else not gate_params & names
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    assert x.grad.abs().max() > 0


@GATED
def test_input_gradient_matches_finite_differences(gated):
    torch.manual_seed(0)
    m = DeltaNet(6, 2, 3, 2, gated=gated, chunk_size=2, conv_size=2).double()
    x = torch.randn(1, 5, 6, generator=gen(2), dtype=F64, requires_grad=True)
    tol = {"eps": 1e-6, "atol": 1e-7}
    assert torch.autograd.gradcheck(m, (x,), **tol)


@pytest.mark.parametrize(
    "kw", [{"d_model": 0}, {"n_head": 0}, {"head_k_dim": 0}, {"head_v_dim": 0}, {"conv_size": 0}, {"chunk_size": 0}]
)
def test_constructor_rejects_non_positive_sizes(kw):
    args = {"d_model": D, "n_head": H, "head_k_dim": DK, "head_v_dim": DV, **kw}
    with pytest.raises(ValueError, match="must be"):
        DeltaNet(args.pop("d_model"), args.pop("n_head"), args.pop("head_k_dim"), args.pop("head_v_dim"), **args)


def test_scale_and_state_bytes():
    assert _layer(False).scale == DK**-0.5
    assert _layer(False, scale=0.5).scale == 0.5
    m = _layer(True)
    assert m.state_bytes() == H * DK * DV * 4
    assert m.state_bytes(3, torch.bfloat16) == 3 * H * DK * DV * 2


# ----------------------------------------------------------------------------- slice_qk


def _shapes(m: DeltaNet, d: int):
    assert m.head_k_dim == d
    assert m.q_proj.weight.shape == m.k_proj.weight.shape == (H * d, D)
    for conv in (m.q_conv1d, m.k_conv1d):
        assert conv.weight.shape == (H * d, 1, 4)
        assert conv.in_channels == conv.out_channels == conv.groups == H * d
    assert m.v_proj.weight.shape == (H * DV, D) and m.v_conv1d.weight.shape == (H * DV, 1, 4)


@GATED
def test_slice_keeping_every_channel_is_bit_identical(gated):
    m, x = _layer(gated), _x(11)
    y = m(x)
    perm = torch.stack([torch.randperm(DK, generator=gen(h)) for h in range(H)])
    for idx in (torch.arange(DK).repeat(H, 1), perm.sort(dim=1).values):
        s = copy.deepcopy(m)
        s.slice_qk(idx)
        _shapes(s, DK)
        assert torch.equal(s(x), y)
    s = copy.deepcopy(m)
    s.slice_qk(perm)  # the same channels in another order: the same function, up to summation order
    _close(s(x), y, 1e-13)


@GATED
def test_slicing_away_zeroed_channels_keeps_the_outputs(gated):
    """Zero rows of q_proj and k_proj give q = k = SiLU(conv(0)) = 0 there: no effect on norms, scores or state."""
    m, x = _layer(gated), _x(11)
    drop = torch.tensor([[0, 3, 5], [1, 2, 7]])  # different channels in each head
    keep = torch.stack([torch.tensor([c for c in range(DK) if c not in row]) for row in drop.tolist()])
    with torch.no_grad():
        for h in range(H):
            for proj in (m.q_proj, m.k_proj):
                proj.weight[h * DK + drop[h]] = 0
    y, before, scale = m(x), m.state_bytes(2), m.scale
    m.slice_qk(keep)
    _shapes(m, DK - 3)
    assert m.scale == scale == DK**-0.5
    assert m.state_bytes(2) == before * (DK - 3) // DK
    _close(m(x), y, 1e-13)
    cache = {}
    m(x[:, :5], cache)  # decoding still matches on the smaller state
    assert cache["state"].shape == (2, H, DK - 3, DV)
    for t in range(5, 11):
        _close(m.step(x[:, t], cache), y[:, t], 1e-10)
    cache = m.empty_cache(2, dtype=F64)
    assert cache["q"].shape == (2, H * (DK - 3), 3) and cache["state"].shape == (2, H, DK - 3, DV)
    _close(torch.stack([m.step(x[:, t], cache) for t in range(11)], 1), y, 1e-10)


def test_sliced_layer_trains():
    m, x = _layer(False), _x(6)
    m.slice_qk(torch.tensor([[0, 2], [5, 1]]))
    m(x).square().sum().backward()
    assert m.q_proj.weight.grad.shape == (H * 2, D) and m.q_proj.weight.grad.abs().max() > 0
    assert m.k_conv1d.weight.grad.shape == (H * 2, 1, 4) and m.k_conv1d.weight.grad.abs().max() > 0


@pytest.mark.parametrize(
    "idx, match",
    [
        (torch.arange(4), r"shape \(n_head=2, d'\), got \(4,\)"),
        (torch.zeros(3, 2, dtype=torch.long), r"shape \(n_head=2, d'\), got \(3, 2\)"),
        (torch.zeros(2, 0, dtype=torch.long), r"1\.\.8 channel indices in \[0, 8\)"),
        (torch.tensor([[0, 8], [1, 2]]), r"1\.\.8 channel indices in \[0, 8\)"),
        (torch.tensor([[0, 1], [-1, 2]]), r"1\.\.8 channel indices in \[0, 8\)"),
        (torch.tensor([[0, 1], [2, 2]]), "must not repeat a channel"),
    ],
    ids=["1d", "wrong-heads", "empty", "too-large", "negative", "repeated"],
)
def test_slice_rejects_bad_indices_and_leaves_the_layer_intact(idx, match):
    m = _layer(True)
    with pytest.raises(ValueError, match=match):
        m.slice_qk(idx)
    _shapes(m, DK)


# ----------------------------------------------------------------------------- bf16


@GATED
def test_bf16_runs_and_stays_close_to_fp32(gated):
    m32, x = _layer(gated).float(), _x(11, dtype=torch.float32)
    y32 = m32(x)
    m16 = copy.deepcopy(m32).bfloat16()
    y16 = m16(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    err = (y16.float() - y32).abs().max() / y32.abs().max()
    assert err < 0.05, err
    cache = {}
    m16(x[:, :5].bfloat16(), cache)
    assert cache["state"].dtype == torch.float32  # the recurrent state stays fp32
    out = m16.step(x[:, 5].bfloat16(), cache)
    assert out.dtype == torch.bfloat16 and cache["state"].dtype == torch.float32
    assert (out.float() - y32[:, 5]).abs().max() / y32.abs().max() < 0.05
