"""Attention modules share one interface so a model can pick any of them by name.

An attention owns its q/k/v and output projections (low-rank methods fold maps into them) and is
called as ``attn(x, rope)`` with ``x`` of shape (B, L, D) and returns (B, L, D). Subclasses usually
only implement :meth:`Attention.attend` on per-head tensors laid out as in SDPA, (B, H, L, d_head).
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable

import torch
from torch import nn

from drrl.attention.rope import RotaryEmbedding

_REGISTRY: dict[str, type[Attention]] = {}


def check_int(value, name: str, *, minimum: int | None = 1, optional: bool = False) -> int | None:
    """``value`` as an ``int`` >= ``minimum`` (integral floats such as 8.0 pass), or a one-line ValueError that
    names the argument (inf, NaN, 1.5, strings, booleans); ``None`` passes through when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        try:
            v = operator.index(value)
        except TypeError:
            v = int(value) if isinstance(value, float) and value.is_integer() else None
        if v is not None and (minimum is None or v >= minimum):
            return v
    at_least = "" if minimum is None else f" >= {minimum}"
    raise ValueError(f"{name} must be an integer{at_least}{' or None' if optional else ''}, got {value!r}")


def check_real(value, name: str, *, optional: bool = False) -> float | None:
    """``value`` as a ``float`` (NaN and inf included: range checks stay with the caller), or a one-line
    ValueError naming the argument (strings, lists, booleans); ``None`` passes through when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name} must be a number{' or None' if optional else ''}, got {value!r}")


class Attention(nn.Module):
    """Multi-head self-attention with RoPE.

    Args:
        d_model: model width D.
        n_head: number of heads H (``d_model % n_head == 0``); d_head = D / H.
        causal: mask future positions (decoder) or not (encoder).
        bias: whether the projections carry a bias.

    Class attribute ``supports_causal`` says whether ``causal=True`` is exact (no future leakage);
    the causal-leakage test runs for every registered attention that claims it.
    """

    supports_causal: bool = True
    supports_bidirectional: bool = True

    def __init__(self, d_model: int, n_head: int, *, causal: bool = True, bias: bool = False):
        super().__init__()
        d_model, n_head = check_int(d_model, "d_model"), check_int(n_head, "n_head")
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        if causal and not self.supports_causal:
            raise ValueError(f"{type(self).__name__} cannot run causally; use it in an encoder (causal=False)")
        if not causal and not self.supports_bidirectional:
            raise ValueError(f"{type(self).__name__} is causal-only")
        self.d_model, self.n_head, self.d_head, self.causal = d_model, n_head, d_model // n_head, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)  # 3×(B, H, L, dh)
        if rope is not None:
            q, k = rope(q), rope(k)
        y = self.attend(q, k, v)  # (B, H, L, dh)
        return self.proj(y.transpose(1, 2).reshape(B, L, self.d_model))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def register_attention(name: str) -> Callable[[type[Attention]], type[Attention]]:
    """Class decorator: ``@register_attention("full")`` makes the class buildable by name."""

    def deco(cls: type[Attention]) -> type[Attention]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"attention {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return deco


def available_attentions(causal: bool | None = None) -> list[str]:
    """Registered names; ``causal=True``/``False`` keeps those usable in a decoder/encoder."""
    if causal is None:
        return sorted(_REGISTRY)
    return sorted(n for n, c in _REGISTRY.items() if (c.supports_causal if causal else c.supports_bidirectional))


def get_attention_class(name: str) -> type[Attention]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; available: {', '.join(available_attentions())}") from None


def build_attention(name: str, d_model: int, n_head: int, *, causal: bool = True, **kwargs) -> Attention:
    """Instantiate a registered attention by name (extra keyword arguments go to its constructor)."""
    return get_attention_class(name)(d_model, n_head, causal=causal, **kwargs)
