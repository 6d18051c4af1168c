import pytest
import torch

from drrl.attention.base import available_attentions, build_attention
from drrl.attention.full import naive_attention
from drrl.attention.linformer import LinformerAttention
from drrl.attention.rope import RotaryEmbedding


def _qkv(shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=requires_grad) for _ in range(3))


@pytest.mark.parametrize("share_kv", [False, True])
def test_identity_init_is_exact_attention_at_max_len(share_kv):
    q, k, v = _qkv((2, 3, 20, 8), requires_grad=True)
    attn = LinformerAttention(24, 3, max_len=20, k=20, init="identity", share_kv=share_kv).double()
    out, ref = attn.attend(q, k, v), naive_attention(q, k, v, causal=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_matches_explicit_projection_formula_for_shorter_sequences():
    q, k, v = _qkv((2, 2, 12, 4))
    attn = LinformerAttention(8, 2, max_len=32, k=6).double()
    e, f = attn.E[:, :12], attn.F[:, :12]
    ref = ((q @ (e @ k).transpose(-2, -1)) / 2.0).softmax(-1) @ (f @ v)
    out = attn.attend(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref)


def test_longer_than_max_len_raises():
    attn = LinformerAttention(8, 2, max_len=16, k=4)
    q = torch.randn(1, 2, 17, 4)
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds linformer max_len=16; raise max_len or truncate"):
        attn.attend(q, q, q)
    with pytest.raises(ValueError, match="max_len=16"):
        attn(torch.randn(1, 17, 8))
    with pytest.raises(ValueError, match="max_len=16"):
        attn.flops(1, 17)


def test_causal_raises_with_leak_explanation():
    with pytest.raises(
        ValueError, match="length projection .* leaks the future; use it in an encoder \\(causal=False\\)"
    ):
        LinformerAttention(16, 2, causal=True)
    with pytest.raises(ValueError, match="cannot run causally"):
        build_attention("linformer", 16, 2)  # build_attention defaults to causal=True


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="identity.*k == max_len"):
        LinformerAttention(16, 2, max_len=32, k=8, init="identity")
    with pytest.raises(ValueError, match="unknown linformer init"):
        LinformerAttention(16, 2, init="orthogonal")
    with pytest.raises(ValueError, match=">= 1"):
        LinformerAttention(16, 2, k=0)


def test_share_kv_ties_parameters():
    shared = LinformerAttention(16, 2, max_len=32, k=8, share_kv=True)
    e, f = shared.projections()
    assert e is f is shared.E
    names = dict(shared.named_parameters())
    assert "E" in names and "F" not in names
    separate = LinformerAttention(16, 2, max_len=32, k=8)
    assert separate.projections()[1] is separate.F and separate.F is not separate.E
    n_shared = sum(p.numel() for p in shared.parameters())
    assert sum(p.numel() for p in separate.parameters()) - n_shared == 8 * 32
    # The shared projection receives the gradient of both uses.
    x = torch.randn(2, 10, 16)
    shared(x).square().sum().backward()
    assert shared.E.grad is not None and shared.E.grad[:, :10].abs().sum() > 0


def test_gradients_reach_E_and_F_only_on_used_columns():
    attn = LinformerAttention(16, 2, max_len=32, k=8)
    attn(torch.randn(2, 10, 16)).square().sum().backward()
    for p in (attn.E, attn.F):
        assert p.grad is not None and p.grad[:, :10].abs().sum() > 0
        assert (p.grad[:, 10:] == 0).all()


def test_flops_explicit_small_case():
    attn = LinformerAttention(8, 2, max_len=16, k=3)  # d = 4
    # B=2, H=2, L=5, k=3, d=4; per head: E K and F V 2·(2·3·5·4), scores 2·5·3·4, softmax 5·5·3, pv 2·5·3·4.
    assert attn.flops(2, 5) == {"length_proj": 4 * 240, "scores": 4 * 120, "softmax": 4 * 75, "pv": 4 * 120}


def test_state_dict_round_trip():
    torch.manual_seed(0)
    for share_kv in (False, True):
        a = LinformerAttention(16, 2, max_len=24, k=6, share_kv=share_kv)
        b = LinformerAttention(16, 2, max_len=24, k=6, share_kv=share_kv)
        assert set(a.state_dict()) == ({"qkv.weight", "proj.weight", "E"} | (set() if share_kv else {"F"}))
        b.load_state_dict(a.state_dict())
        x = torch.randn(2, 24, 16)
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_module_forward_shape_and_registry():
    assert "linformer" in available_attentions(causal=False)
    assert "linformer" not in available_attentions(causal=True)
    attn = build_attention("linformer", 32, 4, causal=False, max_len=64, k=16)
    assert isinstance(attn, LinformerAttention)
    x = torch.randn(2, 37, 32)
    y = attn(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert attn(x, RotaryEmbedding(8, 64)).shape == x.shape
    y_bf16 = attn.bfloat16()(x.bfloat16())
    assert y_bf16.dtype == torch.bfloat16 and torch.isfinite(y_bf16).all()
