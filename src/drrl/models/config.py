"""The shared model configurations: the ``model`` section of a run (:class:`GPTConfig`, which also describes a
DeltaNet LM through :class:`DeltaNetConfig`) and the attention check every model uses."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from drrl.attention import available_attentions, get_attention_class
from drrl.config import FieldError, from_dict, require


def validate_attention(name: str, kwargs: dict, d_model: int, n_head: int, causal: bool, bias: bool) -> None:
    """Config check shared by the models: ``name`` is registered for this direction, and ``kwargs`` fit its
    constructor, whose own checks run on the meta device at no cost. Raises FieldError."""
    names = available_attentions(causal=causal)
    require(name in names, "attention", f"must be one of {', '.join(names)}, got {name!r}")
    cls = get_attention_class(name)
    try:
        inspect.signature(cls.__init__).bind(None, d_model, n_head, causal=causal, bias=bias, **kwargs)
    except TypeError as e:
        raise FieldError("attention_kwargs", f"do not fit attention {name!r}: {e}") from None
    try:  # the constructor's own checks (ranks above the head dimension, unknown modes), at no cost
        with torch.device("meta"):
            cls(d_model, n_head, causal=causal, bias=bias, **kwargs)
    except (ValueError, TypeError, ArithmeticError) as e:  # ArithmeticError: e.g. int(inf) in a constructor
        raise FieldError("attention_kwargs", f"invalid for attention {name!r}: {e}") from None


@dataclass
class DeltaNetConfig:
    """The ``model.deltanet`` section (used when ``model.kind`` is deltanet)."""

    head_k_dim: int | None = None  # d_k, the state's rows per head (what Q/K pruning shrinks); None = d_model/n_head
    head_v_dim: int | None = None  # d_v; None = d_model / n_head
    conv_size: int = 4  # kernel of the short causal convolutions on q, k, v
    gated: bool = False  # Gated DeltaNet: decay α_t and an output gate
    chunk_size: int = 64  # tokens per chunk of the training form
    qk_scale: float | None = None  # readout scale; None = head_k_dim^-1/2 (a pruned model keeps its original one)

    def __post_init__(self):
        for name in ("head_k_dim", "head_v_dim"):
            v = getattr(self, name)
            require(v is None or v > 0, name, f"must be a positive integer or null, got {v}")
        for name in ("conv_size", "chunk_size"):
            v = getattr(self, name)
            require(v > 0, name, f"must be a positive integer, got {v}")
        require(self.qk_scale is None or self.qk_scale > 0, "qk_scale", f"must be > 0 or null, got {self.qk_scale}")


@dataclass
class GPTConfig:
    """The ``model`` section: a transformer (``kind: gpt``, attention chosen by name), a DeltaNet LM
    (``kind: deltanet``, settings under ``deltanet``) or a transformers architecture (``kind: hf``, its config
    under ``hf``: :mod:`drrl.models.hf`); sizes, vocabulary and context are shared."""

    kind: Literal["gpt", "deltanet", "hf"] = "gpt"
    vocab_size: int = 50304  # GPT-2's 50,257 ids padded to a multiple of 64 (faster matmuls)
    context: int = 256  # maximum sequence length
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * d_model
    dropout: float = 0.0
    bias: bool = False
    rope_base: float = 10000.0
    attention: str = "full"  # any name in drrl.attention.available_attentions()
    attention_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the attention constructor
    deltanet: DeltaNetConfig = field(default_factory=DeltaNetConfig)  # kind: deltanet only
    hf: dict[str, Any] = field(default_factory=dict)  # kind: hf only: model_type and the transformers config keys

    def __post_init__(self):
        for name in ("vocab_size", "context", "n_layer", "n_head", "d_model"):
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) and v > 0  # the Python API skips from_dict's types
            require(ok, name, f"must be a positive integer, got {v!r}")
        require(
            self.d_model % self.n_head == 0,
            "n_head",
            f"must divide d_model ({self.d_model}), got {self.n_head}",
        )
        require(self.kind in ("gpt", "deltanet", "hf"), "kind", f"must be gpt, deltanet or hf, got {self.kind!r}")
        require(self.kind == "hf" or not self.hf, "hf", "applies to kind=hf only")
        if isinstance(self.deltanet, dict):  # the Python API may pass the section as a dict
            self.deltanet = from_dict(DeltaNetConfig, self.deltanet, prefix="deltanet.")
        require(0 < self.mlp_ratio < math.inf, "mlp_ratio", f"must be a finite number > 0, got {self.mlp_ratio}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        if self.kind == "hf":
            self._check_hf()
            return
        if self.kind == "deltanet":
            require(
                self.attention == "full" and not self.attention_kwargs,
                "attention",
                "applies to kind=gpt only; a DeltaNet model's token mixer is set under model.deltanet",
            )
            return
        d_head = self.d_model // self.n_head
        require(d_head % 2 == 0, "n_head", f"must leave an even head dimension for RoPE, got d_head={d_head}")
        require(self.rope_base > 1, "rope_base", f"must be > 1, got {self.rope_base}")
        validate_attention(self.attention, self.attention_kwargs, self.d_model, self.n_head, True, self.bias)

    def _check_hf(self) -> None:
        require(
            self.attention == "full" and not self.attention_kwargs and self.dropout == 0,
            "attention",
            "and dropout apply to kind=gpt only; a kind=hf model's layers and dropouts are set under model.hf",
        )
        from drrl.models.hf import hf_config

        try:
            hf_config(self)
        except (ValueError, TypeError, KeyError) as e:
            raise FieldError("hf", str(e).splitlines()[0]) from None

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head
