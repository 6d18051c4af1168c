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

import inspect
import weakref

import torch
from transformers.cache_utils import Cache, DynamicLayer

from drrl.attention.drrl.cache import segment_ranks
from drrl.errors import DrrlError

_CROP_TAKES_LENGTH = "max_length" in inspect.signature(DynamicLayer.crop).parameters  # transformers 4.x
GROW = 256  # tokens of room a layer's buffers keep beyond the cached ones when they grow


def _views_of(view: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether ``view`` is a leading slice of ``buf`` along its last token axis (what update() hands out)."""
    return view.data_ptr() == buf.data_ptr() and view.shape[:-2] == buf.shape[:-2] and view.stride() == buf.stride()


class LowRankKeyLayer(DynamicLayer):
    """One layer's cache: keys in the layer's calibrated basis at width ``width`` (transposed), full-width values.
    ``keys`` and ``values`` are views of buffers with room for up to ``GROW`` more tokens, so a decode step writes its
    token in place instead of copying the whole cache (transformers' DynamicLayer concatenates at every step).
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
        self.is_initialized = False  # transformers 4.x's layers have no such flag (they test keys for None)
        self.new_keys: torch.Tensor | None = None
        self.start = 0  # cached tokens before the last update
        self.ranks: dict = {}  # segment count -> per-segment ranks (drrl.attention.drrl.cache.attend_in_basis)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        B, hkv, _, d = key_states.shape
        self.keys = self._kbuf = key_states.new_zeros(B, hkv, self.width, 0)
        self.values = self._vbuf = value_states.new_zeros(B, hkv, 0, d)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pk = self.core.pk[..., : self.width].to(key_states.dtype)
        kt = (key_states @ pk).transpose(-2, -1)  # (B, H_kv, width, t)
        n, t = self.keys.shape[-1], kt.shape[-1]
        if not (_views_of(self.keys, self._kbuf) and _views_of(self.values, self._vbuf)):
            self._kbuf, self._vbuf = self.keys, self.values  # replaced from outside (beam reorder, batch select)
        if n + t > self._kbuf.shape[-1]:  # grow by GROW tokens beyond the need: one copy per GROW decode steps
            kb = kt.new_empty(*kt.shape[:3], n + t + GROW)
            vb = value_states.new_empty(*value_states.shape[:2], n + t + GROW, value_states.shape[-1])
            kb[..., :n], vb[:, :, :n] = self.keys, self.values
            self._kbuf, self._vbuf = kb, vb
        self._kbuf[..., n : n + t] = kt
        self._vbuf[:, :, n : n + t] = value_states
        self.keys, self.values = self._kbuf[..., : n + t], self._vbuf[:, :, : n + t]
        self.start = n
        self.new_keys = key_states
        # the attention recognises self.keys and reads new_keys and start (weakly held: the cache dies with generate)
        self.core.hf_cache_layer = weakref.ref(self)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-1]

    def crop(self, n: int) -> None:
        """Drop cached tokens from the end: transformers 5 passes −(tokens to remove); 4.x passes the length to keep
        (negative: tokens to remove)."""
        length = self.get_seq_length()
        if _CROP_TAKES_LENGTH:
            keep = n if n >= 0 else length + n
        elif n > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {n}")
        else:
            keep = length + n
        if self.is_initialized and keep < length:
            self.keys = self.keys[..., :keep]
            self.values = self.values[..., :keep, :]

    def nbytes(self) -> int:
        """Bytes of the cached tokens (keys at rank and values)."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def allocated_bytes(self) -> int:
        """Bytes held, the room for up to ``GROW`` more tokens included."""
        if not self.is_initialized:
            return 0
        return sum(b.numel() * b.element_size() for b in (self._kbuf, self._vbuf))


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
        """Bytes of every layer's cached tokens."""
        return sum(layer.nbytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        """Bytes every layer holds, its room for up to ``GROW`` more tokens included."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    @property
    def widths(self) -> dict[int, int]:
        """Each layer's key width r_l."""
        return {layer.core.layer_idx: layer.width for layer in self.layers}


def observed_widths(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[int, int]:
    """Each layer's largest rank its controller chooses on ``ids`` (one forward pass, no cache): cache widths for a
    controller that reads a sequence's statistics (energy, rl), whose widest possible rank is r_max, so that its
    cache keeps only the widths it uses. Pass representative text as long as the generations. Where a later
    generation asks a layer for more, the step runs at the width, counted as ``hf_cache_capped`` and warned about.
    Resets the layers' counters (``pop_stats``)."""
    from drrl.integrations.hf import attention_modules

    cores = [getattr(m, "drrl_attention", None) for m in attention_modules(model)]
    if any(c is None for c in cores):
        raise DrrlError("observed_widths needs drrl attention in every layer: run apply_dynamic_rank(model, ...) first")
    for c in cores:
        c.pop_stats()
    with torch.no_grad():
        model(ids, attention_mask=attention_mask, use_cache=False)
    return {c.layer_idx: int(c.pop_stats().get("max_rank", c.r_max)) for c in cores}


def widest_rank(core) -> int:
    """The largest rank ``core``'s controller can choose over any number of segments: for a controller that reads no
    statistics, the largest rank it gives over the first 1024 segments (a fixed rank, a table row's maximum);
    otherwise r_max."""
    if core.needs_stats or not bool(core.calibrated):
        return core.r_max
    return max(max(h) for h in segment_ranks(core, 1024))
