"""The rank policy's training settings (the ``rl`` section of a run config, and the recipes' policies)."""

from __future__ import annotations

from dataclasses import dataclass

from drrl.config import require
from drrl.rl.reward import FIDELITIES


@dataclass
class RLConfig:
    """The rank policy's training (``train.mode`` hybrid or policy; ``model.attention_kwargs.controller: rl``)."""

    lr: float = 3e-4  # the policy's own AdamW
    loss_weight: float = 0.1  # λ in L_total = L_LM + λ·L_RL (hybrid); scales the policy's Adam step
    clip: float = 0.2  # PPO ratio clipping
    discount: float = 0.99  # across the decisions of a forward pass
    gae_lambda: float = 0.95
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    epochs: int = 4  # PPO passes per training step
    alpha: float = 1.0  # reward: α·fidelity − β·cost/cost_full − γ·bound
    beta: float = 0.05
    gamma: float = 0.1
    eps_start: float = 0.1  # ε-greedy exploration, linear over eps_decay_steps policy updates
    eps_end: float = 0.0
    eps_decay_steps: int = 1000
    # a score-FLOPs cut in (0, 1) to meet instead of trading fidelity against β: β becomes the initial Lagrange
    # multiplier λ of the cost, moved after every update by λ ← λ·exp(lagrange_lr·(executed − (1 − budget)))
    budget: float | None = None
    lagrange_lr: float = 1.0
    # the reward's fidelity: "cosine" (each layer's output), "fisher" (the KL each layer's output error costs, to
    # second order) or "kl" (the model's output)
    fidelity: str = "cosine"

    def __post_init__(self):
        for name in ("lr", "clip", "epochs", "eps_decay_steps"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("loss_weight", "value_coef", "entropy_coef", "alpha", "beta", "gamma"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        if self.budget is not None:
            require(0 < self.budget < 1, "budget", f"must be a score-FLOPs cut in (0, 1), got {self.budget}")
            require(self.beta > 0, "beta", "is the initial Lagrange multiplier when a budget is set: must be > 0")
        require(self.lagrange_lr > 0, "lagrange_lr", f"must be > 0, got {self.lagrange_lr}")
        require(
            self.fidelity in FIDELITIES, "fidelity", f"must be one of {', '.join(FIDELITIES)}, got {self.fidelity!r}"
        )
        for name in ("discount", "gae_lambda", "eps_start", "eps_end"):
            require(0 <= getattr(self, name) <= 1, name, f"must be in [0, 1], got {getattr(self, name)}")
