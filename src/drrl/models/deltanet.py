"""Causal language model built from DeltaNet / Gated DeltaNet token mixers (``model.kind: deltanet``).

Pre-norm blocks x = x + Mixer(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)), tied input/output embeddings, no
positional encoding (the short convolutions and the recurrence carry order). Training and evaluation run
the chunked form; :meth:`DeltaNetLM.prefill` and :meth:`DeltaNetLM.step` decode with a constant-size state.

>>> model = DeltaNetLM(GPTConfig(kind="deltanet", n_layer=2, n_head=2, d_model=64, context=32, vocab_size=256))
>>> logits, cache = model.prefill(torch.zeros(1, 8, dtype=torch.long))   # (1, 256) for the next token
>>> logits = model.step(logits.argmax(-1), cache)                          # one more token
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from drrl.linear_attention.layers import DeltaNet
from drrl.models.config import DeltaNetConfig, GPTConfig
from drrl.models.lm import CausalLM

__all__ = ["DeltaNetBlock", "DeltaNetConfig", "DeltaNetLM", "SwiGLU"]


def _mlp_width(cfg: GPTConfig) -> int:
    """SwiGLU hidden width with the parameters of a GELU MLP of ``mlp_ratio`` (2/3 of it), rounded up to 32."""
    return 32 * math.ceil(2 * cfg.mlp_ratio * cfg.d_model / 3 / 32)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeltaNetBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        dn = cfg.deltanet
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = DeltaNet(
            cfg.d_model, cfg.n_head, dn.head_k_dim or cfg.d_head, dn.head_v_dim or cfg.d_head,
            conv_size=dn.conv_size, gated=dn.gated, chunk_size=dn.chunk_size, scale=dn.qk_scale,
        )  # fmt: skip
        self.mlp_norm = nn.RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model, _mlp_width(cfg))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:  # x (B, D)
        x = x + self.attn.step(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class DeltaNetLM(CausalLM):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(DeltaNetBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings
        self.rank_controller = None  # the training loop's hook for a rank policy; DeltaNet has none
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def mixers(self) -> list[DeltaNet]:
        return [b.attn for b in self.blocks]

    def hidden(self, idx: torch.Tensor, caches: list[dict] | None = None) -> torch.Tensor:
        """``idx`` (B, L) int64 token ids, L ≤ ``cfg.context`` -> final hidden states (B, L, d_model).
        With ``caches`` (one empty dict per layer) they are filled for :meth:`step`."""
        L = idx.shape[1]
        if L > self.cfg.context:
            raise ValueError(f"sequence length {L} exceeds the model context {self.cfg.context}")
        x = self.drop(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.norm(x)

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """Run the prompt ``idx`` (B, L): logits for the next token (B, vocab) and the decode caches."""
        caches = [{} for _ in self.blocks]
        h = self.hidden(idx, caches)
        return self.lm_head(h[:, -1]), caches

    @torch.no_grad()
    def step(self, token: torch.Tensor, caches: list[dict]) -> torch.Tensor:
        """One decoding step: ``token`` (B,) int64 -> logits (B, vocab); ``caches`` are updated in place.
        Its cost does not grow with the number of tokens seen (no context limit applies)."""
        x = self.wte(token)
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block.step(x, cache)
        return self.lm_head(self.norm(x))

    def empty_caches(self, batch: int = 1) -> list[dict]:
        """Caches for decoding from an empty prompt."""
        p = self.wte.weight
        return [m.empty_cache(batch, p.device, p.dtype) for m in self.mixers()]

    def state_bytes(self, batch: int = 1) -> int:
        """Bytes of the recurrent states of all layers (fp32) for ``batch`` sequences; convolution caches aside."""
        return sum(m.state_bytes(batch) for m in self.mixers())
