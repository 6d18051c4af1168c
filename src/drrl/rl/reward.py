"""The DR-RL reward R = α·fidelity − β·cost(r)/cost(full) − γ·bound(r) of one executed decision.

The attention measures the three terms of each decision it executed (:class:`drrl.controllers.Feedback`):
fidelity: cosine similarity of the layer's attention output on the segment against a full-rank teacher
branch (computed without gradient on the steps that train the policy); cost: attention FLOPs of the segment
at rank r over those at full rank (drrl.flops: QKᵀ, softmax, PV); bound: the guardrail bound of drrl.linalg at
the executed rank, divided by its trivial maximum √(2·rows) and clipped to 1, so that all three terms live in
[0, 1]. The learned controller weighs them here. Defaults are the paper's α = 1.0, β = 0.05, γ = 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drrl.controllers.base import cost_ratio, segment_fidelity

__all__ = ["RewardConfig", "cost_ratio", "reward", "segment_fidelity"]


@dataclass
class RewardConfig:
    alpha: float = 1.0
    beta: float = 0.05
    gamma: float = 0.1


def reward(fidelity: torch.Tensor, cost: torch.Tensor, bound: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """Elementwise R = α·fidelity − β·cost − γ·bound."""
    return cfg.alpha * fidelity - cfg.beta * cost - cfg.gamma * bound
