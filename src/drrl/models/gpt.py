"""Decoder-only transformer: pre-norm blocks, RoPE, tied input/output embeddings, and an attention
chosen by name from :mod:`drrl.attention` (``full`` = SDPA with a causal mask).

>>> model = GPT(GPTConfig(n_layer=2, n_head=4, d_model=64, context=32))
>>> model(torch.zeros(1, 8, dtype=torch.long)).shape
torch.Size([1, 8, 50304])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from drrl.attention import RotaryEmbedding, build_attention
from drrl.controllers import attach_controller
from drrl.models.config import DeltaNetConfig, GPTConfig, validate_attention
from drrl.models.deltanet import DeltaNetLM
from drrl.models.lm import CausalLM

__all__ = ["GPT", "Block", "DeltaNetConfig", "GPTConfig", "MLP", "build_model", "validate_attention"]


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
        # a controller shared by the layers (the RL policy: its decisions form one sequence per forward pass) is
        # built after the language model, which is thus initialised exactly as with any other controller
        self.rank_controller = attach_controller(block.attn for block in self.blocks)

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
    """The language model ``cfg.kind`` names: :class:`GPT`, :class:`~drrl.models.deltanet.DeltaNetLM` or a
    transformers architecture (:class:`~drrl.models.hf.HFCausalLM`)."""
    if cfg.kind == "deltanet":
        return DeltaNetLM(cfg)
    if cfg.kind == "hf":
        from drrl.models.hf import HFCausalLM

        return HFCausalLM(cfg)
    return GPT(cfg)
