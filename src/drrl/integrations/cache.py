"""A Hugging Face cache that keeps keys at rank: generation through ``model.generate()`` with DR-RL attention.

>>> layers = apply_dynamic_rank(model, controller="fixed", rank=32)   # drrl.integrations.hf
>>> with calibrating(model): model(calibration_ids)
>>> out = model.generate(ids, max_new_tokens=64, cache=LowRankCache(model))  # older transformers: past_key_values=

Each layer of :class:`LowRankCache` stores its post-RoPE keys multiplied by the layer's calibrated key basis P_k,
at width r_l (the most that layer's controller can ask for, or what ``widths`` says), once per key/value head, and
its values at full width. Keys are kept transposed, (B, H_kv, r_l, N), so that a step at rank r ≤ r_l reads r
contiguous rows. The attention (:func:`drrl.integrations.hf.drrl_attention_forward`) recognises the cache's own key
tensor: a prefill without padding into an empty cache runs the layer's own forward (planned ranks, as without a
cache); every other call (decode steps, padded prefill, chunked prefill) attends the new queries against the keys in
the basis (:func:`drrl.attention.drrl.cache.attend_in_basis`) at each segment's rank. Exact: at r_l = d_head the
scores are those of full attention (P_q P_kᵀ = I), so greedy generation reproduces the dense model.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, DynamicLayer

from drrl.attention.drrl.cache import segment_ranks
from drrl.errors import DrrlError


class LowRankKeyLayer(DynamicLayer):
    """One layer's cache: keys in the layer's calibrated basis at width ``width`` (transposed), full-width values.
    ``new_keys`` holds the last update's full-width keys until the attention has read them (a prefill runs its own
    plan on them)."""

    def __init__(self, core, width: int):
        super().__init__()
        if not bool(core.calibrated):
            raise DrrlError(
                f"layer {core.layer_idx}: the low-rank cache needs calibrated bases; run forward passes inside "
                "drrl.attention.calibrating(model) first"
            )
        if not 0 < width <= core.r_max:
            raise DrrlError(f"layer {core.layer_idx}: cache width must be in 1..r_max={core.r_max}, got {width}")
        self.core, self.width = core, width
        self.new_keys: torch.Tensor | None = None
        self.start = 0  # cached tokens before the last update
        self.ranks: dict = {}  # segment count -> per-segment ranks (drrl.attention.drrl.cache.attend_in_basis)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        B, hkv, _, d = key_states.shape
        self.keys = key_states.new_zeros(B, hkv, self.width, 0)
        self.values = value_states.new_zeros(B, hkv, 0, d)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pk = self.core.pk[..., : self.width].to(key_states.dtype)
        kt = (key_states @ pk).transpose(-2, -1)  # (B, H_kv, width, t)
        self.start = self.keys.shape[-1]
        self.keys = torch.cat([self.keys, kt], -1)
        self.values = torch.cat([self.values, value_states], -2)
        self.new_keys = key_states
        # the attention recognises self.keys and reads new_keys and start (weakly held: the cache dies with generate)
        self.core.hf_cache_layer = weakref.ref(self)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-1]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized:
            self.keys = self.keys[..., :tokens_to_remove]
            self.values = self.values[..., :tokens_to_remove, :]

    def nbytes(self) -> int:
        """Bytes of the cached tensors (keys at rank and values)."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class LowRankCache(Cache):
    """The cache of a model whose attention :func:`~drrl.integrations.hf.apply_dynamic_rank` replaced, with keys at
    rank per layer (see the module docstring). ``widths``: one width for every layer, a {layer index: width} map,
    or None for each layer's widest rank its controller can choose (a fixed rank or a rank table: the largest rank
    in its row; a controller that reads statistics: r_max). A cache serves one generation under one controller
    setting: it remembers the ranks it has asked for. Pass it as ``generate``'s cache
    (:func:`drrl.integrations.hf.cache_kwarg` names the argument)."""

    def __init__(self, model, widths: int | dict[int, int] | None = None):
        from drrl.integrations.hf import attention_modules

        cores = [getattr(m, "drrl_attention", None) for m in attention_modules(model)]
        if any(c is None for c in cores):
            raise DrrlError(
                "LowRankCache needs drrl attention in every layer: run apply_dynamic_rank(model, ...) first"
            )
        layers = []
        for c in cores:
            w = widths.get(c.layer_idx) if isinstance(widths, dict) else widths
            layers.append(LowRankKeyLayer(c, w or widest_rank(c)))
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes of every layer's cached tensors."""
        return sum(layer.nbytes() for layer in self.layers)

    @property
    def widths(self) -> dict[int, int]:
        """Each layer's key width r_l."""
        return {layer.core.layer_idx: layer.width for layer in self.layers}


def widest_rank(core) -> int:
    """The largest rank ``core``'s controller can choose over any number of segments: for a controller that reads no
    statistics, the largest rank it gives over the first 1024 segments (a fixed rank, a table row's maximum);
    otherwise r_max."""
    if core.needs_stats or not bool(core.calibrated):
        return core.r_max
    return max(max(h) for h in segment_ranks(core, 1024))
