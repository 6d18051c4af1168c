"""Analytic FLOPs and bytes for attention variants, counted the same way for every method.

Conventions: a multiply-add is 2 FLOPs; a (m × k) @ (k × n) matmul is 2·m·k·n. Softmax is counted as
5 non-matmul operations per unmasked score (max, subtract, exp, sum, divide) and reported separately.
Causal attention counts exactly the unmasked (query, key) pairs. Small dense factorisations use the
usual leading terms (Cholesky r³/3, triangular solve d·r²).
"""

from __future__ import annotations

from collections import Counter

SOFTMAX_OPS = 5


def matmul(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def causal_pairs(q_start: int, q_len: int, causal: bool = True, k_len: int | None = None) -> int:
    """Unmasked (query, key) pairs for queries at positions [q_start, q_start + q_len) against keys
    [0, q_start + q_len) (causal) or ``k_len`` keys (non-causal)."""
    if not causal:
        return q_len * (k_len if k_len is not None else q_len)
    return q_len * q_start + q_len * (q_len + 1) // 2


def attention_core(pairs: int, d_qk: int, d_v: int) -> Counter:
    """Scores, softmax and P·V for ``pairs`` unmasked pairs, one head."""
    return Counter(scores=2 * pairs * d_qk, softmax=SOFTMAX_OPS * pairs, pv=2 * pairs * d_v)


def projections(n_tokens: int, d_model: int) -> Counter:
    """Dense q/k/v and output projections (identical for every attention variant compared here)."""
    return Counter(qkv=matmul(n_tokens, d_model, 3 * d_model), out=matmul(n_tokens, d_model, d_model))


def gram(n: int, d: int) -> int:
    """Xᵀ X for X of shape (n, d)."""
    return matmul(d, n, d)


def cholesky(r: int) -> int:
    return r**3 // 3


def cholesky_qr2(d: int, r: int, metric: bool = True) -> int:
    """Two passes of: Xᵀ M X, r × r Cholesky, triangular solve."""
    one = (matmul(d, d, r) if metric else 0) + matmul(r, d, r) + cholesky(r) + d * r * r
    return 2 * one


def whitened_refresh(d: int, r: int, steps: int) -> int:
    """drrl.linalg.subspace_iteration: Cholesky of G_q, A = R G_k Rᵀ, Y = orth(R Z), ``steps`` times
    Y ← orth(A Y) (CholeskyQR2 without a metric), and Z = R⁻¹ Y; plus P_k = G_q Z."""
    setup = cholesky(d) + 2 * matmul(d, d, d) + matmul(d, d, r) + cholesky_qr2(d, r, metric=False)
    per_step = matmul(d, d, r) + cholesky_qr2(d, r, metric=False)
    return setup + steps * per_step + d * d * r + matmul(d, d, r)


def truncation_errors(d: int, r: int, n_ranks: int) -> int:
    """Exact per-bucket error of a factorisation from the Grams (drrl.linalg.truncation_errors)."""
    return 2 * matmul(d, d, r) + 2 * matmul(r, d, r) + matmul(r, r, n_ranks) + 2 * d * d + 4 * r * n_ranks


def spectral_upper(d: int, squarings: int = 4, iters: int = 3) -> int:
    return squarings * matmul(d, d, d) + iters * matmul(d, d, 1)


def reductions(method: dict, baseline: dict) -> dict:
    """``score_flops_reduction`` (QKᵀ only) and ``attention_flops_reduction`` (every counted term)."""
    return {
        "score_flops_reduction": 1 - method["scores"] / baseline["scores"],
        "attention_flops_reduction": 1 - sum(method.values()) / sum(baseline.values()),
    }


def full_attention(batch: int, heads: int, seq_len: int, d_head: int, causal: bool = True, with_projections=False):
    """FLOPs of exact softmax attention by category (projections optional, off by default)."""
    pairs = causal_pairs(0, seq_len, causal)
    out = Counter({k: v * batch * heads for k, v in attention_core(pairs, d_head, d_head).items()})
    if with_projections:
        out.update(projections(batch * seq_len, heads * d_head))
    return dict(out)


def decode_bytes_limit(d_head: int, rank: int) -> float:
    """Best possible speed-up of a memory-bound decode step from a rank-r key cache: 2d / (r + d)."""
    return 2 * d_head / (rank + d_head)


def attention_module(attn, batch: int, seq_len: int) -> dict:
    """FLOPs of one attention layer's core at (batch, seq_len), by category: the module's own ``flops(batch,
    seq_len)`` (Performer, Nyström, Linformer count their algorithm there), else exact attention. drrl and
    static attention depend on the data (ranks, statistics): read them from ``pop_stats(with_flops=True)``."""
    if hasattr(attn, "pop_stats"):
        raise ValueError(f"{type(attn).__name__} FLOPs depend on the executed plan; use pop_stats(with_flops=True)")
    fn = getattr(attn, "flops", None)
    if callable(fn):
        return dict(fn(batch, seq_len))
    return full_attention(batch, attn.n_head, seq_len, attn.d_head, attn.causal)
