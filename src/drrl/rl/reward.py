"""The DR-RL reward R = α·fidelity − β·cost(r)/cost(full) − γ·bound(r) of one executed decision.

The attention measures the three terms of each decision it executed (:class:`drrl.controllers.Feedback`).
Fidelity: the cosine similarity of the layer's attention output on the segment against a full-rank teacher
branch (computed without gradient on the steps that train the policy), or the second-order estimate of the KL
that the output error costs (``fisher``), or the model-level KL on the segment's tokens (``kl``). Cost: the
attention FLOPs of the segment at rank r over those at full rank (drrl.flops: QKᵀ, softmax, PV). Bound: the
guardrail bound of drrl.linalg at the executed rank, divided by its trivial maximum √(2·rows) and clipped to 1.
All three terms live in [0, 1] (the ``fisher`` fidelity is instead a KL in nats, ≤ 0). The learned controller
weighs them here. Defaults are the paper's α = 1.0, β = 0.05, γ = 0.1.

With a budget (a score-FLOPs cut the user states instead of β) the cost weight is a Lagrange multiplier λ that
training moves until the executed cut meets the budget (:func:`budget_reward`, :class:`drrl.rl.PolicyTrainer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drrl.controllers.base import cost_ratio, segment_fidelity

__all__ = [
    "FIDELITIES",
    "RewardConfig",
    "budget_reward",
    "cost_ratio",
    "fisher_fidelity",
    "reward",
    "segment_fidelity",
    "segment_kl",
]


FIDELITIES = ("cosine", "kl", "fisher")


@dataclass
class RewardConfig:
    alpha: float = 1.0
    beta: float = 0.05
    gamma: float = 0.1
    budget: float | None = None  # a score-FLOPs cut to meet: β is then a Lagrange multiplier (budget_reward)
    # "cosine": each layer's attention output against a full-rank teacher branch (per layer); "kl": the model's
    # next-token distribution against the full-rank model's, exp(−KL) on the segment's tokens (segment_kl), shared
    # by every layer's decision for that segment; "fisher": the KL that each layer's output error costs, estimated to
    # second order from the layer's output Fisher (fisher_fidelity), so every decision gets its own loss-aware reward
    fidelity: str = "cosine"

    def __post_init__(self):
        if self.fidelity not in FIDELITIES:
            raise ValueError(f"reward fidelity must be one of {', '.join(FIDELITIES)}, got {self.fidelity!r}")


def reward(fidelity: torch.Tensor, cost: torch.Tensor, bound: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """Elementwise R = α·fidelity − β·cost − γ·bound."""
    return cfg.alpha * fidelity - cfg.beta * cost - cfg.gamma * bound


def budget_reward(
    fidelity: torch.Tensor,
    rank_fraction: torch.Tensor,
    pairs: torch.Tensor,
    bound: torch.Tensor,
    lagrange: float,
    cfg: RewardConfig,
) -> torch.Tensor:
    """The Lagrangian reward of a budgeted policy, elementwise over one layer's decisions of one sequence:
    R = α·fidelity − λ·w·(r/d) − γ·bound, with w = pairs / mean(pairs) the segment's weight in the score
    FLOPs (Σ w·r/d / Σ w is the executed score-FLOPs fraction the budget bounds) and λ the multiplier
    that :class:`~drrl.rl.trainer.PolicyTrainer` moves towards the budget (dual ascent)."""
    w = pairs / pairs.mean().clamp(min=1e-12)
    return cfg.alpha * fidelity - lagrange * w * rank_fraction - cfg.gamma * bound


def fisher_fidelity(error: torch.Tensor, n_layers: int) -> torch.Tensor:
    """The "fisher" fidelity of decisions whose estimated KL cost per token is ``error`` (:class:`~drrl.controllers.
    Feedback` ``error``): −n_layers·error, the model's KL per token were every layer's error this one's. Summed over
    a forward pass's decisions and divided by n_layers·n_segments it is minus the estimated KL of the whole model
    (so a budget's multiplier λ is in nats per unit of the score-FLOPs fraction: it ended at 0.39–0.51 on SmolLM2
    at a 40% cut) and no term of it is shared by two decisions."""
    return -float(n_layers) * error


def segment_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, segment: int) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions, averaged over the tokens of each segment of
    ``segment`` positions: (B, L, V) logits and (B, L, V) teacher log-probabilities -> (B, n_segments), float32.
    Position t's prediction is made from tokens ≤ t, so segment s's KL is what the decisions for segment s (in
    every layer) and those before it bought."""
    logp = F.log_softmax(student_logits.float(), -1)
    t = teacher_logprobs.float()
    kl = (t.exp() * (t - logp)).sum(-1).clamp(min=0)  # (B, L)
    B, L = kl.shape
    n = -(-L // segment)
    kl = F.pad(kl, (0, n * segment - L))
    counts = F.pad(torch.ones(L, device=kl.device), (0, n * segment - L)).view(n, segment).sum(-1)
    return kl.view(B, n, segment).sum(-1) / counts
