"""One PPO loop for the learned rank controller, used alike by language-model training (hybrid and policy
modes), the demo's policy fitting on a frozen LLM and classification fine-tuning.

>>> trainer = PolicyTrainer(model.rank_controller, RLConfig(beta=0.5), seed=0)
>>> for batch in batches:
...     trainer.begin()            # a new forward pass: new episodes
...     model(batch)               # the attention layers decide, execute and report their feedback
...     trainer.collect()          # finished episodes join the rollout
...     stats = trainer.update()   # PPO on the rollout (when the caller decides it is long enough)
"""

from __future__ import annotations

import math

import torch

from drrl.rl.config import RLConfig
from drrl.rl.controller import RLController
from drrl.rl.policy import EpsilonSchedule
from drrl.rl.ppo import PPO, Episode, PPOConfig
from drrl.rl.reward import RewardConfig, segment_kl


class PolicyTrainer:
    """Configures ``controller`` from ``cfg`` (reward weights, ε schedule, exploration seed) and owns its PPO.

    ``comm`` (data-parallel training, :class:`drrl.train.distributed.Collectives`) makes every update that of
    the union of every process's episodes (see :class:`~drrl.rl.ppo.PPO`).
    """

    def __init__(self, controller: RLController, cfg: RLConfig, *, seed: int, comm=None):
        controller.reward_cfg = RewardConfig(cfg.alpha, cfg.beta, cfg.gamma, cfg.budget, cfg.fidelity)
        controller.lagrange = cfg.beta
        controller.epsilon = EpsilonSchedule(cfg.eps_start, cfg.eps_end, cfg.eps_decay_steps)
        controller.generator.manual_seed(seed)
        self.controller, self.cfg = controller, cfg
        ppo_cfg = PPOConfig(
            cfg.lr, cfg.clip, cfg.discount, cfg.gae_lambda, cfg.value_coef, cfg.entropy_coef, cfg.epochs
        )
        self.ppo = PPO(controller.policy, ppo_cfg, comm=comm)
        self.comm = comm
        self.episodes: list[Episode] = []

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.ppo.optimizer

    def begin(self) -> None:
        """A new forward pass starts (its decisions form new episodes)."""
        self.controller.begin()

    def observe_output(self, logits: torch.Tensor, teacher_logprobs: torch.Tensor, segment: int) -> torch.Tensor:
        """The KL reward of the forward pass just run (``fidelity: kl``): per row and segment, exp(−KL) of the
        model's next-token distribution (``logits`` (B, L, V)) against the full-rank model's (``teacher_logprobs``,
        computed once per window), credited to every layer's decision for that segment. Returns the KL (B, n)."""
        kl = segment_kl(logits, teacher_logprobs, segment)
        for row in range(kl.shape[0]):
            self.controller.observe_segments(row, torch.exp(-kl[row]))
        return kl

    def collect(self) -> int:
        """Add the finished episodes of the forward passes since :meth:`begin` to the rollout; returns its size."""
        self.episodes += self.controller.collect()
        return len(self.episodes)

    def update(self, scale: float = 1.0) -> dict:
        """One PPO update on the rollout, which is then cleared, and one step of the ε schedule. ``scale`` is λ
        of the hybrid objective (it multiplies the policy's step size). Returns PPO's statistics (empty when no
        process had an episode) with the ε the rollout was sampled with."""
        stats = self.ppo.update(self.episodes, scale=scale)
        if stats:
            stats["epsilon"] = self.controller.epsilon(self.controller.updates)
        if self.cfg.budget is not None:
            stats.update(self._dual_step())
        self.controller.updates += 1
        self.episodes = []
        return stats

    def _dual_step(self) -> dict:
        """Dual ascent on the budget: λ grows while the rollout's executed score-FLOPs fraction is above
        1 − budget and shrinks while below (a multiplicative step, so λ needs no scale of its own). Every
        process takes the same step (the fractions are summed across processes first)."""
        ctrl = self.controller
        spent, pairs = ctrl.spent if self.comm is None else self.comm.sum(ctrl.spent)
        ctrl.spent = [0.0, 0.0]
        if not pairs:
            return {}
        fraction = spent / pairs
        gap = fraction - (1 - self.cfg.budget)
        ctrl.lagrange = min(max(ctrl.lagrange * math.exp(self.cfg.lagrange_lr * gap), 1e-6), 1e6)
        return {"score_fraction": fraction, "budget_gap": gap, "lagrange": ctrl.lagrange}

    def state_dict(self) -> dict:
        """Updates so far and the exploration stream (the optimizer is saved beside it by the caller)."""
        return {
            "updates": self.controller.updates,
            "generator": self.controller.generator.get_state().tolist(),
            "lagrange": self.controller.lagrange,
        }

    def load_state_dict(self, state: dict) -> None:
        self.controller.updates = int(state["updates"])
        self.controller.lagrange = float(state.get("lagrange", self.cfg.beta))
        self.controller.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
