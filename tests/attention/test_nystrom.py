import pytest
import torch

from drrl.attention.base import available_attentions, build_attention
from drrl.attention.full import naive_attention
from drrl.attention.nystrom import NystromAttention, iterative_pinv, nystrom_attention, segment_means
from drrl.attention.rope import RotaryEmbedding


def _qkv(shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=requires_grad) for _ in range(3))


def _check_outputs_and_grads(out, ref, inputs, atol, rtol=0.0):
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * w).sum(), inputs)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_formula_is_exact_when_every_token_is_a_landmark():
    """With L ≤ m each token is its own landmark and A A⁺ A = A: the formula (through the iterative
    pseudo-inverse, 30 iterations) is exact softmax attention, outputs and gradients."""
    q, k, v = _qkv((2, 2, 16, 8), requires_grad=True)
    torch.testing.assert_close(segment_means(q, 40), q, rtol=0, atol=0)  # m > L: min(m, L) = L landmarks
    out = nystrom_attention(q, k, v, n_landmarks=40, pinv_iters=30)
    _check_outputs_and_grads(out, naive_attention(q, k, v, causal=False), (q, k, v), atol=1e-8)


@pytest.mark.parametrize("pinv_iters", [6, 30])
def test_module_is_exact_when_seq_len_at_most_landmarks(pinv_iters):
    q, k, v = _qkv((2, 3, 17, 8), requires_grad=True)
    attn = NystromAttention(24, 3, n_landmarks=17, pinv_iters=pinv_iters).double()
    _check_outputs_and_grads(attn.attend(q, k, v), naive_attention(q, k, v, causal=False), (q, k, v), atol=1e-12)


def _clustered_qkv(L=256, d=16, n_clusters=16, noise=0.05, seed=0):
    """Tokens in contiguous runs around ``n_clusters`` centres: scores of (numerical) rank ``n_clusters``,
    and segment means recover the centres once the segments align with the runs."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g, dtype=torch.float64)
    lab = torch.arange(L) // (L // n_clusters)
    q = centres[lab] + noise * torch.randn(L, d, generator=g, dtype=torch.float64)
    k = centres[lab] + noise * torch.randn(L, d, generator=g, dtype=torch.float64)
    v = torch.randn(L, d, generator=g, dtype=torch.float64)
    return q[None, None], k[None, None], v[None, None]


def test_error_finite_and_decreasing_with_landmarks_on_low_rank_data():
    q, k, v = _clustered_qkv()
    ref = naive_attention(q, k, v, causal=False)
    errs = []
    for m in (2, 4, 8, 16):
        out = NystromAttention(16, 1, n_landmarks=m).double().attend(q, k, v)  # default pinv_iters=6
        errs.append(((out - ref).norm() / ref.norm()).item())
    assert all(torch.isfinite(torch.tensor(errs)))
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[0] > 0.1 and errs[-1] < 1e-2, errs  # measured: 0.86, 0.78, 0.61, 2.3e-3


def test_iterative_pinv_matches_torch_pinv():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 16, 16, generator=g, dtype=torch.float64).softmax(-1)  # condition numbers ~1e2..5e2
    ref = torch.linalg.pinv(a)
    rel = [((iterative_pinv(a, it) - ref).norm() / ref.norm()).item() for it in (6, 12, 20)]
    assert rel[0] > rel[1] > rel[2] and rel[2] < 1e-10, rel
    # Rank-deficient input: the iteration converges to the Moore–Penrose inverse on the range (Z stays a
    # polynomial in Aᵀ A times Aᵀ); rounding noise in the null space grows ~3.25x per iteration, so the
    # match is 1e-14 at 6 iterations and degrades after (measured 2e-7 at 20, 3e-2 at 30).
    u, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    b = u[:, :3] @ torch.diag(torch.tensor([1.0, 0.5, 0.3], dtype=torch.float64)) @ w[:, :3].T
    torch.testing.assert_close(iterative_pinv(b, 8), torch.linalg.pinv(b), atol=1e-11, rtol=0)


def test_causal_raises_with_leak_explanation():
    with pytest.raises(ValueError, match="landmark pooling averages .* future tokens.*encoder \\(causal=False\\)"):
        NystromAttention(16, 2, causal=True)
    with pytest.raises(ValueError, match="cannot run causally"):
        build_attention("nystrom", 16, 2)  # build_attention defaults to causal=True


def test_bad_arguments_raise():
    for kwargs in ({"n_landmarks": 0}, {"pinv_iters": -1}, {"conv_kernel": 4}, {"conv_kernel": 0}):
        with pytest.raises(ValueError):
            NystromAttention(16, 2, **kwargs)


@pytest.mark.parametrize("L,m", [(37, 8), (33, 32), (100, 7), (64, 8)])
def test_segments_partition_any_length(L, m):
    x = torch.randn(2, 3, L, 4, dtype=torch.float64)
    lm = segment_means(x, m)
    assert lm.shape == (2, 3, m, 4)
    # Rebuild the partition: sizes differ by at most one and cover the sequence once.
    s, r = divmod(L, m)
    sizes = [s + 1] * r + [s] * (m - r)
    ref = torch.stack([c.mean(-2) for c in x.split(sizes, dim=-2)], dim=-2)
    torch.testing.assert_close(lm, ref)
    q, k, v = _qkv((2, 3, L, 4))
    out = NystromAttention(12, 3, n_landmarks=m).double().attend(q, k, v)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_flops_linear_in_seq_len_for_fixed_landmarks():
    attn = NystromAttention(64, 4, n_landmarks=16, pinv_iters=6, conv_kernel=33)
    f = [attn.flops(2, L) for L in (64, 128, 192, 256)]
    assert set(f[0]) == {"landmarks", "kernels", "pinv", "output", "conv"}
    for key in f[0]:
        diffs = [b[key] - a[key] for a, b in zip(f, f[1:], strict=False)]
        assert len(set(diffs)) == 1, (key, diffs)
    assert f[0]["pinv"] == f[-1]["pinv"] == 2 * 4 * 6 * 4 * 2 * 16**3
    # Explicit small case, B=1, H=1, d=4, L=8, m=2, 1 iteration.
    small = NystromAttention(4, 1, n_landmarks=2, pinv_iters=1).flops(1, 8)
    assert small == {
        "landmarks": 2 * 8 * 4,
        "kernels": 2 * 4 * (2 * 8 * 2 + 4) + 5 * (2 * 8 * 2 + 4),
        "pinv": 4 * 2 * 2**3,
        "output": 2 * 2 * 8 * 4 + 2 * 2 * 2 * 4 + 2 * 8 * 2 * 4,
    }
    # L ≤ m: the exact path.
    assert attn.flops(1, 16) == {
        "landmarks": 0,
        "kernels": 4 * (2 * 256 * 16 + 5 * 256),
        "pinv": 0,
        "output": 4 * 2 * 256 * 16,
        "conv": 4 * 2 * 33 * 16 * 16,
    }


def test_bf16_input_gives_finite_bf16_output_close_to_float64():
    q, k, v = _qkv((2, 2, 64, 16))
    attn = NystromAttention(32, 2, n_landmarks=8)
    out = attn.attend(*(t.bfloat16() for t in (q, k, v)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = attn.double().attend(q, k, v)
    assert (out.double() - ref).abs().max() < 0.05


def test_conv_skip_adds_depthwise_conv_of_v():
    q, k, v = _qkv((1, 2, 24, 4))
    attn = NystromAttention(8, 2, n_landmarks=4, conv_kernel=3).double()
    base = nystrom_attention(q, k, v, 4, attn.pinv_iters)
    w = attn.conv.weight[:, 0, :, 0]  # (H, 3)
    vp = torch.nn.functional.pad(v, (0, 0, 1, 1))
    conv = sum(w[:, j, None, None] * vp[:, :, j : j + 24] for j in range(3))
    torch.testing.assert_close(attn.attend(q, k, v), base + conv)


def test_module_forward_shape_and_registry():
    assert "nystrom" in available_attentions(causal=False)
    assert "nystrom" not in available_attentions(causal=True)
    attn = build_attention("nystrom", 32, 4, causal=False, n_landmarks=8, conv_kernel=3)
    assert isinstance(attn, NystromAttention)
    x = torch.randn(2, 37, 32)
    y = attn(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert attn(x, RotaryEmbedding(8, 64)).shape == x.shape
    y.sum().backward()
    assert all(p.grad is not None for p in attn.parameters())
