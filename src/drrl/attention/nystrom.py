"""Nyströmformer attention (Xiong et al. 2021): softmax attention through m landmarks, O(L·m) per head.

Per head, with landmarks Q̃, K̃ (m, d) the means of Q and K over m contiguous segments of the sequence,

    out = softmax(Q K̃ᵀ/√d) · pinv(softmax(Q̃ K̃ᵀ/√d)) · (softmax(Q̃ Kᵀ/√d) V)
            (L, m)                 (m, m)                  (m, L)      (L, d)

where pinv is the iterative Moore–Penrose pseudo-inverse of the paper (Razavi et al. 2014). The
(L, L) score matrix is never formed; the two (L, m) kernels go through SDPA as attention of Q over
(K̃, W) and of Q̃ over (K, V).

Segments: L tokens are split into m' = min(m, L) contiguous segments whose sizes differ by at most one
(the first L mod m' have ⌈L/m'⌉ tokens, the rest ⌊L/m'⌋), so there are always exactly m' landmarks, none
empty, for any L. When L ≤ m every token is its own landmark and the formula is exact:
A A⁺ A = A with A = softmax(Q Kᵀ/√d), so the module then returns exact softmax attention directly
(SDPA, no pseudo-inverse). :func:`nystrom_attention` always evaluates the formula (used by the tests to
check that the iterative pseudo-inverse converges to exact attention).

Precision: the (m, m) kernel and its pseudo-inverse are computed in at least float32 (a Newton-type
iteration in bf16 does not converge); the (L, m) work stays in the input dtype.

Non-causal only: a landmark is a mean over a segment, so a query attends (through the landmarks) to
tokens after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from drrl import flops as fl
from drrl.attention.base import Attention, check_int, register_attention


def segment_means(x: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Means of ``x`` (..., L, d) over min(n_segments, L) contiguous, non-empty segments → (..., m', d).

    The first ``L mod m'`` segments hold ⌈L/m'⌉ tokens and the others ⌊L/m'⌋ (a partition of the sequence).
    """
    L = x.shape[-2]
    m = min(n_segments, L)
    s, r = divmod(L, m)
    if r == 0:
        return x.unflatten(-2, (m, s)).mean(-2)
    big = x[..., : r * (s + 1), :].unflatten(-2, (r, s + 1)).mean(-2)
    small = x[..., r * (s + 1) :, :].unflatten(-2, (m - r, s)).mean(-2)
    return torch.cat([big, small], dim=-2)


def iterative_pinv(a: torch.Tensor, iters: int) -> torch.Tensor:
    """Moore–Penrose pseudo-inverse of ``a`` (..., m, m) by the iteration of Razavi et al. (2014):

        Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞),    Z ← ¼ Z (13 I − A Z (15 I − A Z (7 I − A Z)))

    with per-matrix norms (‖A‖₁ the largest column sum, ‖A‖∞ the largest row sum of |A|), which makes
    ‖I − A Z₀‖₂ < 1. Four (m, m) matmuls per iteration. Differentiable.

    Each singular value σ of A moves λ = σ² / (‖A‖₁ ‖A‖∞) towards 1 (about ×3.25 per iteration while small,
    then fast); few iterations therefore act as a regularised inverse. For a numerically singular A the
    rounding noise in its null space is amplified the same way, so many iterations end up inverting noise.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    absa = a.abs()
    scale = absa.sum(-2).amax(-1) * absa.sum(-1).amax(-1)  # ‖A‖₁ ‖A‖∞, shape (...)
    z = a.transpose(-2, -1) / scale[..., None, None]
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_landmarks: int, pinv_iters: int
) -> torch.Tensor:
    """The Nyström approximation of softmax(Q Kᵀ/√d) V, always through the pseudo-inverse.

    Args:
        q, k, v: (B, H, L, d).
        n_landmarks: m; min(m, L) landmarks are used.
        pinv_iters: iterations of :func:`iterative_pinv`.

    Returns:
        (B, H, L, d), in the dtype of ``q``.
    """
    dtype = q.dtype
    acc = torch.promote_types(dtype, torch.float32)
    q_l, k_l = segment_means(q, n_landmarks), segment_means(k, n_landmarks)  # (B, H, m, d)
    kernel2 = (q_l.to(acc) @ k_l.to(acc).transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)  # (B, H, m, m)
    z = iterative_pinv(kernel2, pinv_iters)  # (B, H, m, m)
    k3v = F.scaled_dot_product_attention(q_l, k, v)  # softmax(Q̃ Kᵀ/√d) V: (B, H, m, d)
    w = (z @ k3v.to(acc)).to(dtype)  # (B, H, m, d)
    return F.scaled_dot_product_attention(q, k_l, w)  # softmax(Q K̃ᵀ/√d) W: (B, H, L, d)


@register_attention("nystrom")
class NystromAttention(Attention):
    """Nyströmformer self-attention (encoder only).

    Args:
        d_model: model width D.
        n_head: number of heads H; d = D / H.
        causal: must be False (landmark pooling leaks the future).
        bias: whether the projections carry a bias.
        n_landmarks: m, landmarks per head. Sequences with L ≤ m get exact softmax attention.
        pinv_iters: iterations of the pseudo-inverse (the paper uses 6).
        conv_kernel: if set (odd), adds a depthwise convolution over the sequence of V, one kernel of that
            length per head shared across the head's d channels, as in the paper's implementation.

    ``attend(q, k, v)`` takes (B, H, L, d) tensors and returns (B, H, L, d).
    """

    supports_causal = False

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        causal: bool = False,
        bias: bool = False,
        n_landmarks: int = 32,
        pinv_iters: int = 6,
        conv_kernel: int | None = None,
    ):
        if causal:
            raise ValueError(
                "NystromAttention cannot run causally: landmark pooling averages queries and keys over segments "
                "that include future tokens, so every position sees the future; use it in an encoder (causal=False)"
            )
        super().__init__(d_model, n_head, causal=causal, bias=bias)
        n_landmarks = check_int(n_landmarks, "n_landmarks")
        pinv_iters = check_int(pinv_iters, "pinv_iters", minimum=0)
        conv_kernel = check_int(conv_kernel, "conv_kernel", optional=True)
        if conv_kernel is not None and conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be a positive odd integer or None, got {conv_kernel}")
        self.n_landmarks, self.pinv_iters, self.conv_kernel = n_landmarks, pinv_iters, conv_kernel
        self.conv = (
            nn.Conv2d(n_head, n_head, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=n_head, bias=False)
            if conv_kernel is not None
            else None
        )

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, H, L, d) → (B, H, L, d)."""
        if q.shape[-2] <= self.n_landmarks:  # every token a landmark: the formula is exact attention
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = nystrom_attention(q, k, v, self.n_landmarks, self.pinv_iters)
        if self.conv is not None:
            out = out + F.conv2d(v, self.conv.weight.to(v.dtype), padding=self.conv.padding, groups=self.n_head)
        return out

    def flops(self, batch: int, seq_len: int) -> dict[str, int]:
        """Algorithmic FLOPs of :meth:`attend` for ``batch`` sequences of ``seq_len`` tokens, all heads.

        A multiply-add is 2 FLOPs; softmax is :data:`drrl.flops.SOFTMAX_OPS` per score. Per head, with
        m = n_landmarks < L:

        * ``landmarks``: segment means of Q and K, one op per element: 2·L·d.
        * ``kernels``: Q K̃ᵀ, Q̃ K̃ᵀ, Q̃ Kᵀ (2·d per score) and their softmaxes, (2·L·m + m²) scores.
        * ``pinv``: 4 (m, m) matmuls per iteration, 8·m³·pinv_iters (leading term).
        * ``output``: (softmax(Q̃ Kᵀ) V), Z · that, softmax(Q K̃ᵀ) · that: 2·m·L·d + 2·m²·d + 2·L·m·d.
        * ``conv`` (only with ``conv_kernel``): 2·conv_kernel·L·d.

        When L ≤ m the exact path is counted: ``kernels`` = Q Kᵀ and softmax, ``output`` = P V.
        """
        L, d, m = seq_len, self.d_head, self.n_landmarks
        if L <= m:
            core = fl.attention_core(L * L, d, d)
            per_head = {"landmarks": 0, "kernels": core["scores"] + core["softmax"], "pinv": 0, "output": core["pv"]}
        else:
            n_scores = 2 * L * m + m * m
            per_head = {
                "landmarks": 2 * L * d,
                "kernels": 2 * d * n_scores + fl.SOFTMAX_OPS * n_scores,
                "pinv": self.pinv_iters * 4 * fl.matmul(m, m, m),
                "output": fl.matmul(m, L, d) + fl.matmul(m, m, d) + fl.matmul(L, m, d),
            }
        if self.conv_kernel is not None:
            per_head["conv"] = 2 * self.conv_kernel * L * d
        return {key: val * batch * self.n_head for key, val in per_head.items()}
