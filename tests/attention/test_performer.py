import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from drrl.attention.full import naive_attention
from drrl.attention.performer import PerformerAttention, default_n_features, draw_projection
from drrl.models import GPT, GPTConfig


def qkv(shape, seed=0, scale=1.0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))
    q, k = scale * q, scale * k
    return tuple(t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v))


def naive_features(attn: PerformerAttention, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """φ(x) = exp(W x' − ‖x'‖²/2) / √m with x' = x d^(-1/4), no stabiliser."""
    w = attn.projection.to(dtype)
    x = x.to(dtype) * attn.d_head**-0.25
    return torch.exp(x @ w.T - x.square().sum(-1, keepdim=True) / 2) / attn.n_features**0.5


def naive_estimator(attn: PerformerAttention, q, k, v, causal: bool, dtype=torch.float64) -> torch.Tensor:
    """The FAVOR+ estimator as a masked quadratic form: (φ(Q)φ(K)ᵀ ⊙ M) V / (φ(Q)φ(K)ᵀ ⊙ M) 1."""
    a = naive_features(attn, q, dtype) @ naive_features(attn, k, dtype).transpose(-2, -1)
    if causal:
        a = a.tril()
    return (a @ v.to(dtype)) / a.sum(-1, keepdim=True)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_converges_to_softmax_attention(causal):
    """Relative error to exact softmax attention, mean over 3 draws: measured (B 1, H 2, L 48, d 16,
    q, k ~ 0.5·N(0, 1)) 0.32/0.091/0.034 bidirectional and 0.20/0.061/0.023 causal at m = 64/1024/8192."""
    errs = []
    for m in (64, 1024, 8192):
        e = []
        for s in range(3):
            q, k, v = qkv((1, 2, 48, 16), seed=10 + s, scale=0.5)
            attn = PerformerAttention(32, 2, causal=causal, n_features=m, seed=s, chunk=16).double()
            e.append(rel_err(attn.attend(q, k, v), naive_attention(q, k, v, causal)))
        errs.append(sum(e) / len(e))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.05, errs


@pytest.mark.parametrize("chunk", [1, 7, 128])
def test_causal_chunked_equals_quadratic_form_of_same_features(chunk):
    q, k, v = qkv((2, 3, 37, 8), seed=1, scale=2.0)  # large enough that the stabilisers shift a lot
    attn = PerformerAttention(24, 3, causal=True, n_features=20, chunk=chunk).double()
    torch.testing.assert_close(attn.attend(q, k, v), naive_estimator(attn, q, k, v, True), rtol=1e-10, atol=1e-10)


def test_bidirectional_equals_quadratic_form_of_same_features():
    q, k, v = qkv((2, 3, 37, 8), seed=2, scale=2.0)
    attn = PerformerAttention(24, 3, causal=False, n_features=20).double()
    torch.testing.assert_close(attn.attend(q, k, v), naive_estimator(attn, q, k, v, False), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_stabilisers_keep_float32_exact_where_unstabilised_features_underflow(causal):
    q, k, v = qkv((1, 2, 40, 16), seed=3, scale=10.0)  # W k' − ‖k'‖²/2 ≈ −150: exp underflows in float32
    attn = PerformerAttention(32, 2, causal=causal, chunk=16)
    assert torch.isfinite(naive_estimator(attn, q, k, v, causal, dtype=torch.float32)).float().mean() < 0.1  # 0/0
    out = attn.attend(q.float(), k.float(), v.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive_estimator(attn, q, k, v, causal), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_causal_leakage_even_through_the_key_stabiliser(dtype):
    """Outputs before t are bit-identical whatever the tokens at >= t are, including keys so large that a
    global key max would underflow every earlier key's features (float32)."""
    q, k, v = qkv((2, 2, 30, 8), seed=4, dtype=dtype)
    attn = PerformerAttention(16, 2, causal=True, n_features=24, chunk=8).to(dtype)
    base = attn.attend(q, k, v)
    for t in (0, 5, 8, 13, 29):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[..., t:, :] = 50 * torch.randn_like(q2[..., t:, :])
        k2[..., t:, :] = 50 * torch.randn_like(k2[..., t:, :])
        v2[..., t:, :] = torch.randn_like(v2[..., t:, :])
        out = attn.attend(q2, k2, v2)
        torch.testing.assert_close(out[..., :t, :], base[..., :t, :], rtol=0, atol=0)
        assert torch.isfinite(out).all()
        assert not torch.allclose(out[..., t:, :], base[..., t:, :])


def test_in_a_gpt_by_name_without_leakage():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, context=24, n_layer=2, n_head=2, d_model=16, attention="performer")
    model = GPT(cfg).double().eval()
    assert isinstance(model.blocks[0].attn, PerformerAttention)
    idx = torch.randint(0, 97, (2, 24))
    base = model(idx)
    for t in (0, 5, 22):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 97
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_projection_is_deterministic_orthogonal_and_per_seed():
    a, b, c = PerformerAttention(32, 2, seed=3), PerformerAttention(32, 2, seed=3), PerformerAttention(32, 2, seed=4)
    assert a.projection.shape == (default_n_features(16), 16) == (45, 16)
    assert torch.equal(a.projection, b.projection) and not torch.equal(a.projection, c.projection)
    w = draw_projection(45, 16, ortho=True, seed=3, draw=0)
    torch.testing.assert_close(a.projection, w.float())
    for block in w.split(16):  # orthogonal rows within each block, norms ~ chi(16) (not all equal to 1)
        gram = block @ block.T
        torch.testing.assert_close(gram, torch.diag(gram.diagonal()), rtol=0, atol=1e-12)
    assert w.norm(dim=1).std() > 0.1 and 2.5 < w.norm(dim=1).mean() < 5.5
    iid = draw_projection(45, 16, ortho=False, seed=3, draw=0)
    assert (iid[:16] @ iid[:16].T - torch.diag((iid[:16] ** 2).sum(1))).abs().max() > 1
    assert not torch.equal(w, draw_projection(45, 16, ortho=True, seed=3, draw=1))


def test_redraw_schedule_eval_mode_and_state_dict_round_trip():
    q, k, v = qkv((1, 2, 10, 8), seed=5, dtype=torch.float32)
    attn = PerformerAttention(16, 2, redraw_interval=2, seed=7).train()
    w0 = attn.projection.clone()
    attn.attend(q, k, v)
    assert torch.equal(attn.projection, w0) and int(attn.forwards) == 1
    attn.attend(q, k, v)
    assert not torch.equal(attn.projection, w0) and int(attn.forwards) == 2 and int(attn.draws) == 1
    torch.testing.assert_close(attn.projection, draw_projection(attn.n_features, 8, ortho=True, seed=7, draw=1).float())
    w1 = attn.projection.clone()
    attn.eval()
    for _ in range(5):
        attn.attend(q, k, v)
    assert torch.equal(attn.projection, w1) and int(attn.forwards) == 2

    never = PerformerAttention(16, 2, redraw_interval=None).train()
    w = never.projection.clone()
    for _ in range(3):
        never.attend(q, k, v)
    assert torch.equal(never.projection, w)

    fresh = PerformerAttention(16, 2, redraw_interval=2, seed=7).eval()
    assert not torch.equal(fresh.attend(q, k, v), attn.attend(q, k, v))
    fresh.load_state_dict(attn.state_dict())
    assert set(attn.state_dict()) >= {"projection", "forwards", "draws"}
    torch.testing.assert_close(fresh.attend(q, k, v), attn.attend(q, k, v), rtol=0, atol=0)
    fresh.train(), attn.train()  # both continue the same draw sequence
    for _ in range(2):
        fresh.attend(q, k, v), attn.attend(q, k, v)
    assert torch.equal(fresh.projection, attn.projection) and int(fresh.draws) == 2


def test_redraw_does_not_break_a_pending_backward():
    q, k, v = qkv((1, 2, 10, 8), seed=6, dtype=torch.float32, requires_grad=True)
    attn = PerformerAttention(16, 2, redraw_interval=1).train()
    loss = attn.attend(q, k, v).sum() + attn.attend(q, k, v).sum()  # a redraw after each forward
    loss.backward()
    assert int(attn.draws) == 2 and all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_gradients_match_naive_estimator(causal):
    q, k, v = qkv((2, 2, 19, 8), seed=7, scale=1.5, requires_grad=True)
    attn = PerformerAttention(16, 2, causal=causal, n_features=16, chunk=7).double()
    out, ref = attn.attend(q, k, v), naive_estimator(attn, q, k, v, causal)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(causal, dtype):
    q, k, v = qkv((2, 2, 33, 16), seed=9, dtype=torch.float32)
    attn = PerformerAttention(32, 2, causal=causal, chunk=8)
    ref = attn.attend(q, k, v)
    out = attn.attend(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    attn.to(dtype)  # a module cast to low precision (its projection too) still runs
    x = torch.randn(2, 33, 32).to(dtype)
    y = attn(x)
    assert y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_features": 0}, "n_features must be a positive integer or None"),
        ({"n_features": 2.5}, "n_features must be a positive integer or None"),
        ({"redraw_interval": 0}, "redraw_interval must be a positive integer or None"),
        ({"redraw_interval": True}, "redraw_interval must be a positive integer or None"),
        ({"chunk": 0}, "chunk must be a positive integer"),
        ({"ortho": "yes"}, "ortho must be True"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerformerAttention(32, 2, **kwargs)


def test_default_features_and_bad_calls():
    assert [default_n_features(d) for d in (1, 2, 16, 64)] == [1, 2, 45, 267]
    assert PerformerAttention(64, 1).n_features == math.ceil(64 * math.log(64))
    attn = PerformerAttention(32, 2)
    with pytest.raises(ValueError, match="head dimension 16"):
        attn.attend(*qkv((1, 2, 4, 8), dtype=torch.float32))
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        attn.flops(1, 0)
    with pytest.raises(ValueError, match="d_model"):
        PerformerAttention(30, 4)
    with torch.device("meta"):  # GPTConfig validates attention kwargs this way
        PerformerAttention(32, 2, n_features=8)


def test_flops_explicit_count_small_case():
    """B 2, H 3, d 4, m 5, L 10, chunk 4 (blocks 4, 4, 2), counted by hand from the algorithm."""
    B, H, d, m, L = 2, 3, 4, 5, 10
    causal = PerformerAttention(H * d, H, n_features=m, chunk=4).flops(B, L)
    features = 2 * (2 * L * m * d + L * m)  # W q', W k' and one exp per feature entry
    assert causal == {
        "features": B * H * features,
        # S += φ(K_b)ᵀ V_b for blocks 1, 2 (8 tokens)
        "kv_state": B * H * 2 * m * d * 8,
        # scores 2c²m, causal rescale exp + product 2c², A V 2c²d per block; φ(Q_b) S for blocks 2, 3 (6 tokens)
        "output": B * H * (sum(2 * c * c * m + 2 * c * c + 2 * c * c * d for c in (4, 4, 2)) + 2 * m * d * 6),
        # A 1 (c² adds per block), z updates for 8 tokens, φ(Q_b) z for 6 tokens, the division
        "normaliser": B * H * (sum(c * c for c in (4, 4, 2)) + m * 8 + 2 * m * 6 + L * d),
    }
    bidir = PerformerAttention(H * d, H, causal=False, n_features=m).flops(B, L)
    assert bidir == {
        "features": B * H * features,
        "kv_state": B * H * 2 * L * m * d,
        "output": B * H * 2 * L * m * d,
        "normaliser": B * H * (L * m + 2 * L * m + L * d),
    }
    assert list(bidir.values()) == [5400, 2400, 2400, 1140]  # e.g. features 6 · 2 · (2·10·5·4 + 10·5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_flops_matmul_part_matches_torch_flop_counter(causal):
    """torch's FlopCounterMode counts the matmuls (2·m·k·n); the rest of flops() is elementwise."""
    B, H, d, m, L, chunk = 2, 3, 8, 12, 23, 5
    attn = PerformerAttention(H * d, H, causal=causal, n_features=m, chunk=chunk)
    with FlopCounterMode(display=False) as counter:
        attn.attend(*qkv((B, H, L, d), dtype=torch.float32))
    f = attn.flops(B, L)
    sizes = [5, 5, 5, 5, 3]
    if causal:
        elementwise = 2 * L * m + sum(3 * c * c for c in sizes) + m * (L - 3) + L * d
    else:
        elementwise = 2 * L * m + L * m + L * d
    assert counter.get_total_flops() == sum(f.values()) - B * H * elementwise


def test_flops_linear_in_length_when_bidirectional():
    attn = PerformerAttention(64, 4, causal=False, n_features=40)
    one, two = attn.flops(3, 100), attn.flops(3, 200)
    assert two == {key: 2 * value for key, value in one.items()}
    causal = PerformerAttention(64, 4, causal=True, n_features=40, chunk=16)  # linear per token up to the edges
    per_token = [sum(causal.flops(1, n * 16).values()) / (n * 16) for n in (8, 64, 512)]
    assert per_token[2] / per_token[1] < 1.01 and per_token[1] / per_token[0] < 1.05
