"""Hugging Face model surgery: DR-RL dynamic low-rank attention inside pretrained Llama-family and GPT-2 models.

>>> model, path = load_causal_lm()     # drrl.integrations.hub: embedded SmolLM2-135M (or a folder / hub name)
>>> layers = apply_dynamic_rank(model, DynamicRankConfig(controller="energy", tau=0.95))
>>> with calibrating(model): model(calibration_ids)            # calibrated post-RoPE bases

Each attention module of the model gets a :class:`~drrl.attention.drrl.DynamicLowRankAttention` child,
``module.drrl_attention``, and the model's attention implementation becomes ``"drrl"``, a function
registered with transformers' ``AttentionInterface``. The model keeps its own projections and RoPE: the
function receives the *rotated* queries and keys, so the rank-r maps act after RoPE (they cannot fold into
the projection weights there; their cost is counted as ``maps`` FLOPs). With grouped-query attention
(``num_key_value_heads < num_attention_heads``) each KV head has one key basis shared by its query heads:
the joint factorisation of the group's stacked score matrices, so a decode cache keeps keys at width r
once per KV head (:func:`cache_bytes_per_token`).

Generation runs at low rank through :class:`drrl.integrations.cache.LowRankCache`, which keeps keys at rank
(pass it as ``generate``'s cache: ``cache=`` in recent transformers, ``past_key_values=`` in older ones, as
:func:`cache_kwarg` tells; or ``apply_dynamic_rank(..., cache=True)`` to make it ``generate``'s default). Without it, calls with an attention mask (padding) or with fewer queries than keys
(generation through Hugging Face's own KV cache) run exact attention; they are counted as ``hf_exact_calls`` in the
layer's statistics and logged once per layer as a warning.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn

from drrl._deprecated import moved_names
from drrl.attention.base import Attention
from drrl.attention.drrl import BASIS_MODES, DynamicLowRankAttention
from drrl.attention.drrl.cache import attend_in_basis
from drrl.attention.full import grouped_sdpa
from drrl.controllers import attach_controller
from drrl.errors import DrrlError

log = logging.getLogger(__name__)

IMPLEMENTATION = "drrl"

# model loading moved to drrl.integrations.hub (these names still work here for one release, with a warning)
__getattr__ = moved_names(
    __name__, {n: "drrl.integrations.hub" for n in ("EMBEDDED_MODEL", "load_causal_lm", "resolve_model")}
)


@dataclass
class DynamicRankConfig:
    """Options of the swapped-in attention (see :class:`~drrl.attention.drrl.DynamicLowRankAttention`).
    ``basis`` defaults to ``calibrated``: pretrained models are calibrated once on a calibration set."""

    controller: str = "energy"
    basis: str = "calibrated"
    r_max: int | None = None
    bucket: int = 8
    segment: int = 128
    rank: int | None = None
    tau: float = 0.95
    seed: int = 0
    guard_eps: float | None = None
    refresh_tol: float = 0.01
    refresh_steps: int = 2
    ridge: float = 1e-6

    def __post_init__(self):
        if self.basis not in BASIS_MODES:
            raise ValueError(f"basis must be one of {', '.join(BASIS_MODES)}, got {self.basis!r}")


def _geometry(model: nn.Module) -> tuple[str, int, int, int]:
    """(family, n_head, n_kv_head, head_dim) of a supported Hugging Face causal LM."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype == "gpt2":
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
            raise DrrlError(
                "GPT-2 models with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are not supported"
            )
        return "gpt2", cfg.n_head, cfg.n_head, cfg.n_embd // cfg.n_head
    if cfg is not None and hasattr(cfg, "num_attention_heads") and hasattr(cfg, "hidden_size"):
        h = cfg.num_attention_heads
        hkv = getattr(cfg, "num_key_value_heads", None) or h
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
        if mtype in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "olmo", "olmo2"):
            return "llama", h, hkv, d
    raise DrrlError(
        f"apply_dynamic_rank supports Llama-family and GPT-2 models, got model_type {mtype!r}; "
        "pass a LlamaForCausalLM-, MistralForCausalLM-, Qwen2ForCausalLM- or GPT2LMHeadModel-style model"
    )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a supported model, in layer order (those carrying ``layer_idx``)."""
    family, *_ = _geometry(model)
    name = "GPT2Attention" if family == "gpt2" else "Attention"
    mods = [m for m in model.modules() if type(m).__name__.endswith(name) and hasattr(m, "layer_idx")]
    mods = [m for m in mods if not getattr(m, "is_cross_attention", False) and not isinstance(m, Attention)]
    if not mods:
        raise DrrlError(f"found no attention modules with a layer index in {type(model).__name__}")
    return sorted(mods, key=lambda m: m.layer_idx)


def _exact(module, query, key, value, attention_mask, scaling):
    causal = attention_mask is None and query.shape[2] > 1  # transformers' SDPA convention (mask-free prefill)
    return grouped_sdpa(query, key, value, causal=causal, mask=attention_mask, scale=scaling)


def drrl_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``"drrl"`` entry of transformers' AttentionInterface: (B, H, L, d) post-RoPE queries and (B, H_kv,
    L, d) keys/values -> ((B, L, H, d), None)."""
    core: DynamicLowRankAttention | None = getattr(module, "drrl_attention", None)
    if core is None:  # a module the surgery did not reach (should not happen): exact attention
        out = _exact(module, query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    d = query.shape[-1]
    if scaling is not None and not math.isclose(scaling, 1 / math.sqrt(d), rel_tol=1e-6):
        raise DrrlError(f"layer {core.layer_idx}: attention scale {scaling} is not 1/sqrt(head_dim); not supported")
    ref = getattr(core, "hf_cache_layer", None)
    cached = ref() if ref is not None else None
    kv_len = key.shape[-1] if cached is not None and key is cached.keys else key.shape[2]
    if attention_mask is not None and _plain_causal(attention_mask, query.shape[2], kv_len):
        attention_mask = None  # a mask without padding (transformers 4.x materialises one for an all-ones mask)
    if cached is not None and key is cached.keys:  # keys kept at rank by drrl.integrations.cache.LowRankCache
        if attention_mask is None and cached.start == 0 and query.shape[2] == key.shape[-1]:
            out = core.attend(query, cached.new_keys, value)  # a prefill without padding: the layer's own plan
            cached.new_keys = None  # full-width keys are not kept past the call that needs them
        else:
            core._totals["hf_cache_calls"] += 1
            out = attend_in_basis(core, query, key, value, cached.start, _bool_mask(attention_mask), cached.ranks)
    elif attention_mask is not None or query.shape[2] != key.shape[2]:
        core._totals["hf_exact_calls"] += 1  # padding or HF-cache generation: exact attention (module docstring)
        if not getattr(core, "_warned_exact", False):
            core._warned_exact = True
            log.warning(
                "layer %d: a call with %s ran exact attention; to keep keys at rank, give generate a "
                "drrl.integrations.LowRankCache(model) as its cache, or apply_dynamic_rank(..., cache=True)",
                core.layer_idx,
                "padding" if attention_mask is not None else "Hugging Face's own KV cache",
            )
        out = _exact(module, query, key, value, attention_mask, scaling)
    else:
        out = core.attend(query, key, value)
    return out.transpose(1, 2).contiguous(), None


_LAST_MASK: list = [None, None, None]  # (weak reference to a mask, its version, whether it is plain causal)


def _plain_causal(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    """Whether ``mask`` (B or 1, 1, q_len, kv_len; boolean or additive) is exactly the causal pattern of the last
    q_len of kv_len positions for every sequence, i.e. has no padding. Decided once per mask tensor: a forward
    pass hands every layer the same one."""
    ref = _LAST_MASK[0]() if _LAST_MASK[0] is not None else None
    if ref is mask and _LAST_MASK[1] == mask._version:
        return _LAST_MASK[2]
    plain = False
    if mask.dim() == 4 and mask.shape[-2:] == (q_len, kv_len):
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
        plain = bool((_bool_mask(mask) == causal).all())
    _LAST_MASK[:] = [weakref.ref(mask), mask._version, plain]
    return plain


def _bool_mask(mask):
    """Hugging Face's attention mask as a boolean (True: may attend), or None."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask == 0  # an additive float mask: 0 where allowed, a large negative value elsewhere


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, drrl_attention_forward)
    # SDPA's mask convention: no mask at all for plain causal self-attention without padding
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _set_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        for m in model.modules():
            if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
                m.config._attn_implementation = name


def apply_dynamic_rank(
    model: nn.Module, config: DynamicRankConfig | None = None, *, cache: bool = False, **overrides
) -> list[DynamicLowRankAttention]:
    """Swap every self-attention of a Hugging Face Llama-family or GPT-2 model for DR-RL attention, in place.

    Returns the new :class:`DynamicLowRankAttention` layers (one per model layer). With ``basis="calibrated"``
    (the default) run forward passes inside :func:`drrl.attention.calibrating` before evaluating. With
    ``controller="rl"`` one :class:`~drrl.rl.RLController` is shared by all layers and kept as
    ``model.drrl_rank_controller``. With ``cache=True``, ``model.generate`` builds a fresh
    :class:`~drrl.integrations.cache.LowRankCache` (keys at rank) whenever it is not given a cache. Calling it
    again replaces the previous layers.
    """
    cfg = DynamicRankConfig(**{**asdict(config or DynamicRankConfig()), **overrides})
    family, h, hkv, d = _geometry(model)
    mods = attention_modules(model)
    if not hasattr(model, "_drrl_original_attn"):
        model._drrl_original_attn = model.config._attn_implementation
    ref = next(model.parameters())
    layers = []
    for m in mods:
        kw = asdict(cfg)
        core = DynamicLowRankAttention(h * d, h, causal=True, n_kv_head=hkv, **kw)
        core.qkv = core.proj = None  # the model keeps its own projections
        core.layer_idx = m.layer_idx
        m.drrl_attention = core.to(ref.device)
        layers.append(core)
    model.drrl_rank_controller = attach_controller(layers)  # a shared controller (rl), built once
    _register()
    _set_implementation(model, IMPLEMENTATION)
    if cache and not hasattr(model, "_drrl_generate"):
        model._drrl_generate = model.generate
        model.generate = functools.partial(_generate_low_rank, model)
    elif not cache and hasattr(model, "_drrl_generate"):  # an earlier call's switch, turned off
        del model.generate
        del model._drrl_generate
    log.info("drrl attention in %d %s layers (H=%d, H_kv=%d, d=%d, %s)", len(layers), family, h, hkv, d, cfg)
    return layers


def cache_kwarg() -> str:
    """The name ``generate`` takes a cache by: ``cache`` where transformers knows it (``past_key_values`` is
    deprecated there), ``past_key_values`` in older releases."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def _generate_low_rank(model, *args, **kwargs):
    """``model.generate`` with a fresh LowRankCache unless the caller passed a cache (``cache=True``)."""
    from drrl.integrations.cache import LowRankCache

    if not any(kwargs.get(k) is not None for k in ("cache", "past_key_values")):
        kwargs[cache_kwarg()] = LowRankCache(model)
    return model._drrl_generate(*args, **kwargs)


def remove_dynamic_rank(model: nn.Module) -> None:
    """Undo :func:`apply_dynamic_rank`: the model's original attention implementation, no drrl children."""
    for m in attention_modules(model):
        if hasattr(m, "drrl_attention"):
            del m.drrl_attention
    if hasattr(model, "drrl_rank_controller"):
        del model.drrl_rank_controller
    if hasattr(model, "_drrl_original_attn"):
        _set_implementation(model, model._drrl_original_attn)
        del model._drrl_original_attn
    if hasattr(model, "_drrl_generate"):
        del model.generate  # the class's own again
        del model._drrl_generate


def cache_bytes_per_token(model: nn.Module, rank: int | dict[int, int] | None, bytes_per_value: int = 2) -> int:
    """KV-cache bytes one token costs across all layers: keys at width ``rank`` once per KV head (shared by
    the group's query heads) plus full-width values; ``None`` gives the full cache (2·H_kv·d per layer).
    ``rank`` may map layer index -> rank."""
    _, _, hkv, d = _geometry(model)
    n_layers = len(attention_modules(model))
    total = 0
    for i in range(n_layers):
        r = d if rank is None else (rank.get(i, d) if isinstance(rank, dict) else rank)
        total += hkv * (r + d) * bytes_per_value
    return total
