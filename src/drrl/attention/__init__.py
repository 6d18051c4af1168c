"""Attention modules chosen by name from one registry (``build_attention("full", d_model, n_head)``): full (SDPA),
``drrl`` (dynamic low rank, a subpackage), static, performer, nystrom, linformer, and RoPE. A rank-controlled
attention talks to its controller only through :mod:`drrl.controllers`; this room never imports :mod:`drrl.rl`."""

from drrl.attention.base import (
    Attention,
    available_attentions,
    build_attention,
    get_attention_class,
    register_attention,
)
from drrl.attention.drrl import DynamicLowRankAttention, calibrating
from drrl.attention.full import FullAttention
from drrl.attention.linformer import LinformerAttention
from drrl.attention.nystrom import NystromAttention
from drrl.attention.performer import PerformerAttention
from drrl.attention.rope import RotaryEmbedding
from drrl.attention.static import StaticRankAttention

__all__ = [
    "Attention",
    "DynamicLowRankAttention",
    "FullAttention",
    "LinformerAttention",
    "NystromAttention",
    "PerformerAttention",
    "RotaryEmbedding",
    "StaticRankAttention",
    "available_attentions",
    "build_attention",
    "calibrating",
    "get_attention_class",
    "register_attention",
]
