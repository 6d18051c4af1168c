"""PPO for the rank policy: clipped ratio, GAE over each forward pass's decision sequence, value loss,
entropy bonus, its own optimizer. Only executed decisions are in an episode, each with the log-probability
of the ε-mixture it was sampled from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from drrl.rl.policy import RankPolicy, entropy, mixture_log_probs


@dataclass
class PPOConfig:
    lr: float = 3e-4
    clip: float = 0.2
    discount: float = 0.99  # across the decisions of one forward pass (layer-major)
    gae_lambda: float = 0.95
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    epochs: int = 4
    max_grad_norm: float = 1.0


@dataclass
class Episode:
    """The executed decisions of one sequence's forward pass, in decision order (all tensors length N)."""

    feats: torch.Tensor  # (N, F)
    layers: torch.Tensor
    segments: torch.Tensor
    prev: torch.Tensor
    allowed: torch.Tensor  # (N, nb) bool
    actions: torch.Tensor
    logp: torch.Tensor  # log-prob under the ε-mixture at sampling time
    values: torch.Tensor
    rewards: torch.Tensor
    eps: float


def gae(rewards: torch.Tensor, values: torch.Tensor, discount: float, lam: float):
    """Generalised advantage estimation over one episode (terminal after the last decision)."""
    adv = torch.zeros_like(rewards)
    last = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        next_v = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + discount * next_v - values[t]
        last = delta + discount * lam * last
        adv[t] = last
    return adv, adv + values


def _to(e: Episode, device: torch.device) -> Episode:
    fields = {k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(e).items()}
    return Episode(**fields)


class PPO:
    """``update(episodes)`` runs ``epochs`` passes of the clipped objective over the episodes.

    ``comm`` (data-parallel training, :class:`drrl.train.distributed.Collectives`) makes the update that of the
    union of every process's episodes: advantages are normalised with global statistics, the loss is divided
    by the global number of decisions and gradients are summed across processes, so every process takes the
    same step. Every process must then call ``update`` at the same steps, with or without episodes of its own.
    """

    def __init__(self, policy: RankPolicy, cfg: PPOConfig | None = None, comm=None):
        self.policy, self.cfg, self.comm = policy, cfg or PPOConfig(), comm
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=self.cfg.lr, weight_decay=0.0)

    def update(self, episodes: list[Episode], scale: float = 1.0) -> dict:
        """One PPO update. ``scale`` (λ of the hybrid objective L_LM + λ·L_RL) multiplies the step size: Adam is
        invariant to the scale of the loss, so λ acts where it would with plain gradient descent."""
        cfg, comm = self.cfg, self.comm
        device = next(self.policy.parameters()).device
        episodes = [_to(e, device) for e in episodes if len(e.actions)]
        targets = [gae(e.rewards, e.values, cfg.discount, cfg.gae_lambda) for e in episodes]
        all_adv = torch.cat([a for a, _ in targets]) if targets else torch.zeros(0, device=device)
        if comm is None:
            if not episodes:
                return {}
            n = len(all_adv)
            mean, std = all_adv.mean(), all_adv.std() if n > 1 else torch.tensor(1.0)
        else:
            adv64 = all_adv.double()
            total, squares, n = comm.sum([adv64.sum().item(), adv64.square().sum().item(), len(all_adv)])
            if n == 0:
                return {}
            mean = total / n
            std = math.sqrt(max(squares - n * mean * mean, 0.0) / (n - 1)) if n > 1 else 1.0
        stats = {}
        for _ in range(cfg.epochs):
            pl = vl = ent = kl = clipped = 0.0
            loss = None
            for e, (adv, ret) in zip(episodes, targets, strict=True):
                adv = (adv - mean) / (std + 1e-8)
                logits, values = self.policy(e.feats, e.layers, e.segments, e.prev, e.allowed)
                logp = mixture_log_probs(logits, e.allowed, e.eps).gather(-1, e.actions[:, None]).squeeze(-1)
                ratio = (logp - e.logp).exp()
                surr = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
                h = entropy(logits)
                term = (-surr.sum() + cfg.value_coef * (values - ret).square().sum() - cfg.entropy_coef * h.sum()) / n
                loss = term if loss is None else loss + term
                pl, vl, ent = (
                    pl - surr.sum().item() / n,
                    vl + (values - ret).square().sum().item() / n,
                    ent + h.sum().item() / n,
                )
                kl += (e.logp - logp).sum().item() / n
                clipped += ((ratio - 1).abs() > cfg.clip).sum().item() / n
            self.optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                loss.backward()
            if comm is not None:
                comm.sum_gradients(self.policy.parameters())
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * scale
            self.optimizer.step()
            stats = {"policy_loss": pl, "value_loss": vl, "entropy": ent, "approx_kl": kl, "clip_fraction": clipped}
        self.optimizer.zero_grad(set_to_none=True)
        rewards = torch.cat([e.rewards for e in episodes]) if episodes else torch.zeros(0)
        if comm is None:
            stats["mean_reward"] = rewards.mean().item()
        else:
            *sums, reward_sum = comm.sum([*stats.values(), rewards.sum().item()])
            stats = dict(zip(stats, sums, strict=True))
            stats["mean_reward"] = reward_sum / n
        return stats
