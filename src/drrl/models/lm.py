"""What every causal language model of drrl shares: logits, summed and mean next-token loss, parameter count.

A subclass sets ``self.lm_head`` (tied to ``self.wte``) and ``self.rank_controller`` (a shared RL rank policy
or None; not a class attribute, which would shadow the registered submodule), and implements
``hidden(idx) -> (B, L, d_model)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from drrl.models.loss import linear_cross_entropy


class CausalLM(nn.Module):
    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attention_stats(self) -> list[dict]:
        """Per-layer statistics of layers that keep them, since the last call (none by default)."""
        return []

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` (B, L) int64 token ids, L ≤ ``cfg.context`` -> logits (B, L, vocab_size)."""
        return self.lm_head(self.hidden(idx))

    def nll(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed next-token negative log-likelihood (fp32 or wider) over ``targets`` (B, L) != -100."""
        h, t = self.hidden(idx).flatten(0, 1), targets.flatten()
        if (
            h.device.type == "cpu"
            and h.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu")
        ):
            return linear_cross_entropy(h, self.lm_head.weight, t)  # no (N, V) logits: see models/loss.py
        logits = self.lm_head(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits -> fp32 loss
        return F.cross_entropy(logits, t, ignore_index=-100, reduction="sum")

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over ``targets`` (B, L) != -100."""
        return self.nll(idx, targets) / (targets != -100).sum().clamp(min=1)
