"""Hugging Face integrations: surgery that puts drrl attention into pretrained models (``hf``), a generation cache
that keeps keys at rank (``cache``) and loading of models and tokenizers (``hub``)."""

from drrl.integrations.cache import LowRankCache, observed_widths
from drrl.integrations.hf import DynamicRankConfig, apply_dynamic_rank, cache_bytes_per_token, remove_dynamic_rank
from drrl.integrations.hub import EMBEDDED_MODEL, load_causal_lm, resolve_model

__all__ = [
    "EMBEDDED_MODEL",
    "DynamicRankConfig",
    "LowRankCache",
    "apply_dynamic_rank",
    "cache_bytes_per_token",
    "load_causal_lm",
    "observed_widths",
    "remove_dynamic_rank",
    "resolve_model",
]
