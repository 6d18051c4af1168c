"""Exact softmax attention through ``torch.nn.functional.scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from drrl.attention.base import Attention, register_attention


@register_attention("full")
class FullAttention(Attention):
    """softmax(Q Kᵀ / √d_head [+ causal mask]) V with the fused SDPA kernel."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


def grouped_sdpa(q, k, v, *, causal: bool, mask=None, scale=None) -> torch.Tensor:
    """SDPA for grouped-query attention: (B, H, L, d) queries against (B, H_kv, S, d) keys and values, each KV head
    serving H / H_kv consecutive query heads (Hugging Face's ``repeat_kv`` order)."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Reference: materialises the (L, L) score matrix. For tests only."""
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if causal:
        L = q.shape[-2]
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s.softmax(-1) @ v
