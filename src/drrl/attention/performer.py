"""Performer attention: FAVOR+ positive orthogonal random features (Choromanski et al., ICLR 2021).

Softmax attention softmax(Q Kᵀ / √d) V is approximated by replacing the kernel exp(q·k / √d) with an
inner product of positive random features, φ(q')·φ(k') with x' = x · d^(-1/4) and

    φ(x) = exp(W x − ‖x‖² / 2 − stabiliser) / √m,     W ∈ R^{m × d},

so that attention becomes linear in the sequence length: out = φ(Q)(φ(K)ᵀV) / (φ(Q)(φ(K)ᵀ1)).
For Gaussian rows w, E[exp(w·q' − ‖q'‖²/2) exp(w·k' − ‖k'‖²/2)] = exp(q'·k') = exp(q·k / √d), so
numerator and denominator are unbiased and their ratio converges to exact softmax attention as the
number of features m grows (bias and variance O(1/m)). Orthogonal rows (``ortho=True``) keep each
row's marginal Gaussian and lower the variance.
"""

from __future__ import annotations

import hashlib
import math

import torch

from drrl.attention.base import Attention, register_attention


def default_n_features(d_head: int) -> int:
    """ceil(d · ln d), at least d (the FAVOR+ paper's choice, m = Θ(d log d))."""
    return max(d_head, math.ceil(d_head * math.log(d_head)))


def _draw_seed(seed: int, draw: int) -> int:
    """A 63-bit generator seed for the ``draw``-th projection of ``seed`` (platform independent)."""
    digest = hashlib.sha256(f"drrl.performer:{seed}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw_projection(n_features: int, d: int, *, ortho: bool, seed: int, draw: int) -> torch.Tensor:
    """The (m × d) random projection number ``draw`` of ``seed``, float64 on the CPU.

    ``ortho``: stacked blocks of d orthonormal rows (QR of a Gaussian d × d matrix, signs fixed so each
    block is Haar-distributed), truncated to m rows, each row rescaled by the norm of an independent
    Gaussian d-vector (a chi(d) draw), so every row is marginally N(0, I_d). Otherwise i.i.d. N(0, 1).
    """
    g = torch.Generator(device="cpu").manual_seed(_draw_seed(seed, draw))
    kw = {"generator": g, "dtype": torch.float64, "device": "cpu"}
    if not ortho:
        return torch.randn(n_features, d, **kw)
    blocks = []
    for _ in range(-(-n_features // d)):
        qm, r = torch.linalg.qr(torch.randn(d, d, **kw))
        sign = torch.sign(torch.diagonal(r))
        blocks.append((qm * torch.where(sign == 0, 1.0, sign)).T)  # rows orthonormal
    norms = torch.randn(n_features, d, **kw).norm(dim=1, keepdim=True)
    return torch.cat(blocks)[:n_features] * norms


def _positive_int(value, name: str, hint: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''} ({hint}), got {value!r}")


@register_attention("performer")
class PerformerAttention(Attention):
    """FAVOR+ attention with positive (orthogonal) random features; linear in the sequence length.

    :meth:`attend` takes q, k, v of shape (B, H, L, d_head) and returns (B, H, L, d_head) in the input
    dtype (computed in float32, or float64 for float64 inputs). As ``n_features`` → ∞ the output converges
    to exact softmax attention softmax(Q Kᵀ / √d_head [+ causal mask]) V; the error of the ratio estimator
    is O(1/√m) with a constant that grows like exp(‖q + k‖² / √d_head) (large-norm q, k need far more
    features: at d_head 64 and unit-variance q, k even m = 16384 is off by O(1)).

    Args:
        d_model, n_head, causal, bias: as in :class:`~drrl.attention.base.Attention`.
        n_features: number of random features m; default ceil(d_head · ln d_head), at least d_head.
        redraw_interval: draw a new projection every this many training-mode forwards (each projection
            serves exactly that many); None never redraws. Eval mode never redraws.
        ortho: orthogonal random features (blocks of orthonormal rows with chi(d_head) row norms) instead
            of i.i.d. Gaussian rows.
        seed: projection number n is drawn from a generator seeded by (seed, n), so the layer is
            deterministic and does not touch the global RNG. Layers built with the same seed share
            their projections.
        chunk: block size of the causal form (intra-block masked quadratic, inter-block running state).

    Buffers (saved in the state dict): ``projection`` (m, d_head), shared by the heads; ``forwards``, the
    training-mode forwards counted; ``draws``, the number of redraws so far.

    Numerical stabilisers, all exact for the estimator (each multiplies a query's numerator and
    denominator by the same factor, and they are constants for autograd): every query's features are
    shifted by their own row max; keys by the max of W k' − ‖k'‖²/2 over all keys and features of the
    sequence and head (bidirectional) or, causally, over the keys at positions ≤ i for query i (a running
    max, rescaling the state as it grows), so no output ever depends on a later token, not even
    through rounding or underflow.

    Causal form, chunk size C: for each block of queries, A = (φ(Q_c) φ(K_c)ᵀ ⊙ causal mask) gives the
    intra-block part A V_c and A 1; earlier blocks contribute φ(Q_c) S and φ(Q_c) z with the running state
    S = Σ φ(k)ᵀ v (m × d) and z = Σ φ(k) (m), updated after each block. Beyond inputs and output, the
    forward holds O(m·d + C·(m + C)) values per head. Denominators are clamped at the dtype's
    smallest positive normal number.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        causal: bool = True,
        bias: bool = False,
        n_features: int | None = None,
        redraw_interval: int | None = 1000,
        ortho: bool = True,
        seed: int = 0,
        chunk: int = 128,
    ):
        super().__init__(d_model, n_head, causal=causal, bias=bias)
        d = self.d_head
        _positive_int(
            n_features, "n_features", f"None gives ceil(d_head·ln d_head) = {default_n_features(d)}", optional=True
        )
        _positive_int(
            redraw_interval, "redraw_interval", "training forwards between redraws; None never redraws", optional=True
        )
        _positive_int(chunk, "chunk", "block size of the causal form, e.g. 128")
        if not isinstance(ortho, bool):
            raise ValueError(f"ortho must be True (orthogonal features) or False (i.i.d. Gaussian), got {ortho!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.n_features = default_n_features(d) if n_features is None else n_features
        self.redraw_interval, self.ortho, self.seed, self.chunk = redraw_interval, ortho, seed, chunk
        w = draw_projection(self.n_features, d, ortho=ortho, seed=seed, draw=0)
        device = torch.empty(0).device  # the default device (or a torch.device context), like the parameters
        self.register_buffer("projection", w.to(device=device, dtype=torch.get_default_dtype()))
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_head={self.n_head}, causal={self.causal}, n_features={self.n_features}, "
            f"redraw_interval={self.redraw_interval}, ortho={self.ortho}, seed={self.seed}, chunk={self.chunk}"
        )

    @torch.no_grad()
    def redraw(self) -> None:
        """Replace the projection by the next one of this seed (draw count + 1).

        The buffer is reassigned, not overwritten in place, so graphs of earlier forwards that still await
        their backward keep the projection they used.
        """
        self.draws += 1
        w = draw_projection(self.n_features, self.d_head, ortho=self.ortho, seed=self.seed, draw=int(self.draws))
        self.projection = w.to(device=self.projection.device, dtype=self.projection.dtype)

    def _logits(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """W x' − ‖x'‖²/2 with x' = x · d^(-1/4): (..., L, d) -> (..., L, m)."""
        x = x * self.d_head**-0.25
        return x @ w.T - x.square().sum(-1, keepdim=True) / 2

    def _query_features(self, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        u = self._logits(q, w)
        return torch.exp(u - u.amax(-1, keepdim=True).detach()) * self.n_features**-0.5

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[-1] != self.projection.shape[1] or k.shape[-1] != self.projection.shape[1]:
            raise ValueError(
                f"q and k must have head dimension {self.projection.shape[1]}, got {q.shape} and {k.shape}"
            )
        dtype = q.dtype
        ct = torch.promote_types(dtype, torch.float32)
        w = self.projection.to(ct)
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        if q.shape[-2] == 0:
            out = v.new_zeros(v.shape)
        elif self.causal:
            out = self._causal(q, k, v, w)
        else:
            out = self._bidirectional(q, k, v, w)
        if self.training:
            self.forwards += 1
            if self.redraw_interval is not None and int(self.forwards) % self.redraw_interval == 0:
                self.redraw()
        return out.to(dtype)

    def _bidirectional(self, q, k, v, w):
        fq = self._query_features(q, w)  # (B, H, L, m)
        uk = self._logits(k, w)
        fk = torch.exp(uk - uk.amax((-2, -1), keepdim=True).detach()) * self.n_features**-0.5
        kv = fk.transpose(-2, -1) @ v  # (B, H, m, d)
        z = fk.sum(-2, keepdim=True).transpose(-2, -1)  # (B, H, m, 1)
        den = (fq @ z).clamp_min(torch.finfo(q.dtype).tiny)
        return (fq @ kv) / den

    def _causal(self, q, k, v, w):
        L = q.shape[-2]
        C = min(self.chunk, L)
        tiny = torch.finfo(q.dtype).tiny
        mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        s_state = z_state = c_prev = None  # state relative to c_prev, the max over the keys before the block
        outs = []
        for s in range(0, L, C):
            e = min(s + C, L)
            qc, kc, vc = q[..., s:e, :], k[..., s:e, :], v[..., s:e, :]
            fq = self._query_features(qc, w)  # (B, H, c, m)
            uk = self._logits(kc, w)
            c = uk.detach().amax(-1).cummax(-1).values  # (B, H, c): running key max, c_i over keys <= i
            if c_prev is not None:
                c = torch.maximum(c, c_prev)
            fk = torch.exp(uk - c[..., None]) * self.n_features**-0.5  # key j relative to c_j (entries <= 1/√m)
            # query i sees key j relative to c_i: rescale by exp(c_j - c_i) <= 1; future pairs are exactly 0
            n = e - s
            decay = (c[..., None, :] - c[..., :, None]).masked_fill(~mask[:n, :n], float("-inf")).exp()
            a = (fq @ fk.transpose(-2, -1)) * decay  # (B, H, c, c)
            num, den = a @ vc, a.sum(-1, keepdim=True)
            if c_prev is not None:
                r = torch.exp(c_prev - c)[..., None]  # (B, H, c, 1) <= 1
                num = num + (fq @ s_state) * r
                den = den + (fq @ z_state) * r
            outs.append(num / den.clamp_min(tiny))
            if e < L:  # fold the block into the state, relative to its last running max
                c_end = c[..., -1:]  # (B, H, 1)
                fk_end = fk * torch.exp(c - c_end)[..., None]
                kv, ksum = fk_end.transpose(-2, -1) @ vc, fk_end.sum(-2)[..., None]  # (B, H, m, d), (B, H, m, 1)
                if c_prev is None:
                    s_state, z_state = kv, ksum
                else:
                    g = torch.exp(c_prev - c_end)[..., None]  # (B, H, 1, 1) <= 1
                    s_state, z_state = s_state * g + kv, z_state * g + ksum
                c_prev = c_end
        return torch.cat(outs, dim=-2)

    def flops(self, batch: int, seq_len: int) -> dict[str, int]:
        """FLOPs of :meth:`attend` by category, for all heads and the batch (multiply-add = 2 FLOPs).

        With L = ``seq_len``, m = n_features, d = d_head, per head and sequence:

        * ``features``: 2 · (2·L·m·d + L·m) — W q' and W k' plus one exp per feature, for q and k;
        * bidirectional: ``kv_state`` 2·L·m·d (φ(K)ᵀV); ``output`` 2·L·m·d (φ(Q)S);
          ``normaliser`` L·m (z = φ(K)ᵀ1) + 2·L·m (φ(Q)z) + L·d (division);
        * causal, blocks of sizes c_b (chunk, the last one L mod chunk if nonzero), L_first / L_last the
          first / last block's size: ``kv_state`` 2·m·d·(L − L_last) (every block but the last is folded
          into S); ``output`` Σ_b (2·c_b²·m + 2·c_b² + 2·c_b²·d) (intra-block scores, their causal
          rescale exp(c_j − c_i) and product, A V) + 2·m·d·(L − L_first) (φ(Q)S for every block but the
          first); ``normaliser`` Σ_b c_b² (A 1) + m·(L − L_last) (z updates) + 2·m·(L − L_first) (φ(Q)z)
          + L·d (division).

        Not counted: O(L·m) bookkeeping of the stabilisers (maxima, shifts), the 1/√m and d^(-1/4)
        scalings, ‖x‖², masking, O(m·d) state rescales and dtype casts; the q/k/v/output projections.
        """
        _positive_int(batch, "batch", "sequences in the batch")
        _positive_int(seq_len, "seq_len", "tokens per sequence")
        L, m, d = seq_len, self.n_features, self.d_head
        out = {"features": 2 * (2 * L * m * d + L * m)}
        if not self.causal:
            out |= {"kv_state": 2 * L * m * d, "output": 2 * L * m * d, "normaliser": 3 * L * m + L * d}
        else:
            n_full, rest = divmod(L, self.chunk)
            sizes = [self.chunk] * n_full + ([rest] if rest else [])
            sq = n_full * self.chunk**2 + rest**2  # Σ_b c_b²
            folded, later = L - sizes[-1], L - sizes[0]
            out |= {
                "kv_state": 2 * m * d * folded,
                "output": sq * (2 * m + 2 + 2 * d) + 2 * m * d * later,
                "normaliser": sq + m * folded + 2 * m * later + L * d,
            }
        return {key: value * batch * self.n_head for key, value in out.items()}
