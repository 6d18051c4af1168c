"""Linformer attention (Wang et al. 2020): keys and values projected along the sequence to k rows.

Per head, with learned projections E, F ∈ R^{k × max_len} (one pair per layer, shared across heads) and a
sequence of L ≤ max_len tokens,

    K' = E[:, :L] K,   V' = F[:, :L] V      (k, d)
    out = softmax(Q K'ᵀ/√d) V'              (L, d)

so the score matrix is (L, k) instead of (L, L). The attention of Q over (K', V') goes through SDPA.
When L < max_len only the first L columns of E and F are used (the paper's convention for shorter
inputs). ``init="identity"`` (k == max_len) starts from E = F = I, for which the layer is exact softmax
attention at L = max_len.

Non-causal only: every projected key and value mixes all L positions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.functional import scaled_dot_product_attention

from drrl import flops as fl
from drrl.attention.base import Attention, check_int, register_attention

INITS = ("xavier", "identity")


@register_attention("linformer")
class LinformerAttention(Attention):
    """Linformer self-attention (encoder only).

    Args:
        d_model: model width D.
        n_head: number of heads H; d = D / H.
        causal: must be False (the length projection leaks the future).
        bias: whether the q/k/v and output projections carry a bias.
        max_len: longest sequence accepted; E and F have ``max_len`` columns.
        k: projected length (rows of E and F).
        share_kv: use one projection for keys and values (F = E; only ``E`` is a parameter).
        init: ``"xavier"`` (Xavier-normal E and F) or ``"identity"`` (E = F = I; requires k == max_len).

    ``attend(q, k, v)`` takes (B, H, L, d) tensors with L ≤ max_len and returns (B, H, L, d).
    """

    supports_causal = False

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        causal: bool = False,
        bias: bool = False,
        max_len: int = 512,
        k: int = 64,
        share_kv: bool = False,
        init: str = "xavier",
    ):
        if causal:
            raise ValueError(
                "LinformerAttention cannot run causally: the length projection E·K mixes all positions (future ones "
                "included) into every projected key and value, so it leaks the future; use it in an encoder (causal=False)"
            )
        super().__init__(d_model, n_head, causal=causal, bias=bias)
        max_len, k = check_int(max_len, "linformer max_len"), check_int(k, "linformer k")
        if init not in INITS:
            raise ValueError(f"unknown linformer init {init!r}; choose one of {', '.join(INITS)}")
        if init == "identity" and k != max_len:
            raise ValueError(f"linformer init='identity' needs k == max_len, got k={k}, max_len={max_len}")
        self.max_len, self.k, self.share_kv, self.init = max_len, k, share_kv, init
        self.E = nn.Parameter(torch.empty(k, max_len))
        self.F = None if share_kv else nn.Parameter(torch.empty(k, max_len))
        self.reset_length_projections()

    def reset_length_projections(self) -> None:
        """(Re)initialise E and F according to ``init``."""
        with torch.no_grad():
            for p in (self.E, self.F):
                if p is None:
                    continue
                if self.init == "identity":
                    p.copy_(torch.eye(self.k, self.max_len))
                else:
                    nn.init.xavier_normal_(p)

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, F), each (k, max_len); the same tensor twice when ``share_kv``."""
        return self.E, (self.E if self.F is None else self.F)

    def _check_len(self, L: int) -> None:
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds linformer max_len={self.max_len}; raise max_len or truncate")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, H, L, d) → (B, H, L, d)."""
        L = q.shape[-2]
        self._check_len(L)
        e, f = (p[:, :L].to(q.dtype) for p in self.projections())  # (k, L) each
        return scaled_dot_product_attention(q, e @ k, f @ v)  # K', V': (B, H, k, d)

    def flops(self, batch: int, seq_len: int) -> dict[str, int]:
        """Algorithmic FLOPs of :meth:`attend` for ``batch`` sequences of ``seq_len`` tokens, all heads.

        A multiply-add is 2 FLOPs; softmax is :data:`drrl.flops.SOFTMAX_OPS` per score. Per head:
        ``length_proj`` = E K and F V, 2 · 2·k·L·d (also with ``share_kv``: K ≠ V); ``scores`` =
        2·L·k·d; ``softmax`` = 5·L·k; ``pv`` = 2·L·k·d.
        """
        L, d = seq_len, self.d_head
        self._check_len(L)
        core = fl.attention_core(L * self.k, d, d)
        per_head = {
            "length_proj": 2 * fl.matmul(self.k, L, d),
            "scores": core["scores"],
            "softmax": core["softmax"],
            "pv": core["pv"],
        }
        return {key: val * batch * self.n_head for key, val in per_head.items()}
