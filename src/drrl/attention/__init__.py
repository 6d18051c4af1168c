"""Attention modules, one registry by name: ``build_attention("full", d_model, n_head)``."""

from drrl.attention.base import (
    Attention,
    available_attentions,
    build_attention,
    get_attention_class,
    register_attention,
)
from drrl.attention.drrl import DynamicLowRankAttention, calibrating
from drrl.attention.full import FullAttention
from drrl.attention.rope import RotaryEmbedding

__all__ = [
    "Attention",
    "DynamicLowRankAttention",
    "FullAttention",
    "RotaryEmbedding",
    "available_attentions",
    "build_attention",
    "calibrating",
    "get_attention_class",
    "register_attention",
]
