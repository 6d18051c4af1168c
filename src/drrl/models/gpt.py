"""Decoder-only transformer: pre-norm blocks, RoPE, tied input/output embeddings, and an attention
chosen by name from :mod:`drrl.attention` (``full`` = SDPA with a causal mask).

>>> model = GPT(GPTConfig(n_layer=2, n_head=4, d_model=64, context=32))
>>> model(torch.zeros(1, 8, dtype=torch.long)).shape
torch.Size([1, 8, 50304])
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from drrl.attention import RotaryEmbedding, available_attentions, build_attention, get_attention_class
from drrl.config import FieldError, from_dict, require
from drrl.models.deltanet import DeltaNetConfig, DeltaNetLM
from drrl.models.lm import CausalLM
from drrl.rl.controllers import RLController
from drrl.rl.policy import RankPolicy


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
class GPTConfig:
    """The ``model`` section: a transformer (``kind: gpt``, attention chosen by name) or a DeltaNet LM
    (``kind: deltanet``, settings under ``deltanet``); sizes, vocabulary and context are shared."""

    kind: Literal["gpt", "deltanet"] = "gpt"
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
        require(self.kind in ("gpt", "deltanet"), "kind", f"must be gpt or deltanet, got {self.kind!r}")
        if isinstance(self.deltanet, dict):  # the Python API may pass the section as a dict
            self.deltanet = from_dict(DeltaNetConfig, self.deltanet, prefix="deltanet.")
        require(0 < self.mlp_ratio < math.inf, "mlp_ratio", f"must be a finite number > 0, got {self.mlp_ratio}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
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

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = build_attention(
            cfg.attention, cfg.d_model, cfg.n_head, causal=True, bias=cfg.bias, **cfg.attention_kwargs
        )
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), rope))
        return x + self.mlp(self.ln2(x))


class GPT(CausalLM):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        for i, block in enumerate(self.blocks):
            block.attn.layer_idx = i
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings
        self.rope = RotaryEmbedding(cfg.d_head, cfg.context, cfg.rope_base)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self.rank_controller = None
        if cfg.attention == "drrl" and cfg.attention_kwargs.get("controller") == "rl":
            # one policy decides for every layer (its decisions form one sequence per forward pass); built
            # after the language model, which is thus initialised exactly as with any other controller
            nb = len(self.blocks[0].attn.buckets)
            self.rank_controller = RLController(RankPolicy(RLController.n_features(nb), nb, cfg.n_layer))
            for block in self.blocks:
                block.attn.set_controller(self.rank_controller)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def attention_stats(self) -> list[dict]:
        """Per-layer statistics of attentions that keep them (e.g. drrl's mean executed rank), since the last call."""
        return [b.attn.pop_stats() if hasattr(b.attn, "pop_stats") else {} for b in self.blocks]

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` (B, L) int64 token ids, L ≤ ``cfg.context`` -> final hidden states (B, L, d_model)."""
        L = idx.shape[1]
        if L > self.cfg.context:
            raise ValueError(f"sequence length {L} exceeds the model context {self.cfg.context}")
        x = self.drop(self.wte(idx))
        for block in self.blocks:
            x = block(x, self.rope)
        return self.ln_f(x)


def build_model(cfg: GPTConfig) -> CausalLM:
    """The language model ``cfg.kind`` names: :class:`GPT` or :class:`~drrl.models.deltanet.DeltaNetLM`."""
    if cfg.kind == "deltanet":
        return DeltaNetLM(cfg)
    return GPT(cfg)
