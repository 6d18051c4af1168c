import pytest
import torch

from drrl.attention import (
    Attention,
    FullAttention,
    RotaryEmbedding,
    available_attentions,
    build_attention,
    register_attention,
)
from drrl.attention.full import naive_attention


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("shape", [(2, 3, 17, 6), (1, 1, 1, 4), (2, 2, 64, 32)], ids=str)
def test_full_matches_naive_outputs_and_grads(causal, shape):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attn = FullAttention(shape[1] * shape[3], shape[1], causal=causal).double()
    out = attn.attend(q, k, v)
    ref = naive_attention(q, k, v, causal)
    torch.testing.assert_close(out, ref)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_module_forward_shape_and_causality():
    torch.manual_seed(0)
    attn = build_attention("full", 32, 4, causal=True)
    rope = RotaryEmbedding(8, 16)
    x = torch.randn(2, 16, 32)
    y = attn(x, rope)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, 10] += 1.0
    y2 = attn(x2, rope)
    torch.testing.assert_close(y[:, :10], y2[:, :10], rtol=0, atol=0)
    assert not torch.allclose(y[:, 10:], y2[:, 10:])


def _rope_reference(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Complex-number RoPE in the rotate-half layout: pair (i, i + d/2) rotates by pos * base^(-2i/d)."""
    L, d = x.shape[-2], x.shape[-1]
    half = d // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float64) * 2 / d)
    angle = torch.arange(L, dtype=torch.float64)[:, None] * freqs[None]
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_matches_complex_reference_and_is_relative():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, 64)
    x = torch.randn(2, 3, 40, 16, dtype=torch.float64)
    torch.testing.assert_close(rope(x), _rope_reference(x), rtol=1e-5, atol=1e-5)
    # Scores depend only on the relative offset: shifting both positions leaves q·k unchanged.
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    seq_q = q.expand(1, 1, 64, 16)
    seq_k = k.expand(1, 1, 64, 16)
    rq, rk = rope(seq_q)[0, 0], rope(seq_k)[0, 0]
    assert torch.allclose((rq[10] * rk[3]).sum(), (rq[50] * rk[43]).sum(), atol=1e-5)
    assert torch.allclose(rope(x).norm(dim=-1), x.norm(dim=-1))


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7, 8)


def test_registry():
    assert "full" in available_attentions()
    assert "full" in available_attentions(causal=True)
    assert "full" in available_attentions(causal=False)
    assert isinstance(build_attention("full", 16, 2), FullAttention)
    with pytest.raises(ValueError, match="unknown attention 'nope'; available: .*full"):
        build_attention("nope", 16, 2)
    with pytest.raises(ValueError, match="already registered"):

        @register_attention("full")
        class Other(Attention):
            pass

    with pytest.raises(ValueError, match="divisible"):
        build_attention("full", 30, 4)
