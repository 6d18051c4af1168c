"""The DR-RL reward R = α·fidelity − β·cost(r)/cost(full) − γ·bound(r) of one executed decision.

fidelity: cosine similarity of the layer's attention output on the segment against a full-rank
teacher branch (computed without gradient on the steps that train the policy); cost: attention FLOPs
of the segment at rank r over those at full rank (drrl.flops: QKᵀ, softmax, PV); bound: the guardrail
bound of drrl.linalg at the executed rank, divided by its trivial maximum √(2·rows) and clipped to 1 (the
attention module does this), so that all three terms live in [0, 1]. Defaults are the paper's α = 1.0,
β = 0.05, γ = 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drrl import flops


@dataclass
class RewardConfig:
    alpha: float = 1.0
    beta: float = 0.05
    gamma: float = 0.1


def segment_fidelity(y: torch.Tensor, teacher: torch.Tensor, segment: int) -> torch.Tensor:
    """Mean cosine similarity per segment of outputs (B, H, L, d) against the teacher -> (n_segments,)."""
    L = y.shape[-2]
    cos = F.cosine_similarity(y.float(), teacher.float(), dim=-1).mean((0, 1))  # (L,)
    n_seg = -(-L // segment)
    return torch.stack([cos[s * segment : (s + 1) * segment].mean() for s in range(n_seg)])


def cost_ratio(rank: int, d_head: int, q_start: int, q_len: int, causal: bool = True) -> float:
    """Attention FLOPs of a segment at ``rank`` over those at full rank (same pairs)."""
    pairs = flops.causal_pairs(q_start, q_len, causal)
    low, full = flops.attention_core(pairs, rank, d_head), flops.attention_core(pairs, d_head, d_head)
    return sum(low.values()) / sum(full.values())


def reward(fidelity: torch.Tensor, cost: torch.Tensor, bound: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """Elementwise R = α·fidelity − β·cost − γ·bound."""
    return cfg.alpha * fidelity - cfg.beta * cost - cfg.gamma * bound
