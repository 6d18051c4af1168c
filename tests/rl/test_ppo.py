"""PPO learns a known answer: contextual bandits over rank buckets, with episodes built the way the controller
builds them (layer-major decisions, each layer decided in one policy pass, previous rank = the layer below's
at the same segment) and random guardrail masks."""

from __future__ import annotations

import pytest
import torch

from drrl.rl import PPO, Episode, PPOConfig, RankPolicy
from drrl.rl.policy import sample

N_LAYERS, N_SEG, NB, NF = 2, 8, 4, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def by_layer(layers: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    return torch.where(layers == 0, 3, 0)


def by_feature(layers: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    return torch.where(feats[:, 0] > 0, 1, 2)


def episode(policy: RankPolicy, best, g: torch.Generator, eps: float, greedy=False, masked=True) -> Episode:
    """One forward pass of N_LAYERS × N_SEG decisions with random features; reward 1 for the right bucket
    ``best(layers, feats)``, else 0. With ``masked`` each decision allows its right bucket and every other
    bucket with probability 1/2, else all buckets."""
    feats = torch.randn(N_LAYERS * N_SEG, NF, generator=g)
    feats[:, 0] += 0.5 * feats[:, 0].sign()  # a margin around by_feature's threshold: the rule, not its decimals
    layers = torch.arange(N_LAYERS).repeat_interleave(N_SEG)
    segments = torch.arange(N_SEG).repeat(N_LAYERS)
    right = best(layers, feats)
    allowed = torch.rand(N_LAYERS * N_SEG, NB, generator=g) < (0.5 if masked else 2.0)
    allowed[torch.arange(len(right)), right] = True
    prev = torch.full_like(layers, NB)
    actions, logp, values = [], [], []
    for layer in range(N_LAYERS):
        n = (layer + 1) * N_SEG
        with torch.no_grad():
            logits, v = policy(feats[:n], layers[:n], segments[:n], prev[:n], allowed[:n])
        a, lp = sample(logits[-N_SEG:], allowed[n - N_SEG : n], eps, g, greedy=greedy)
        actions.append(a), logp.append(lp), values.append(v[-N_SEG:])
        if layer + 1 < N_LAYERS:
            prev[n : n + N_SEG] = a
    actions = torch.cat(actions)
    rewards = (actions == right).float()
    return Episode(feats, layers, segments, prev, allowed, actions, torch.cat(logp), torch.cat(values), rewards, eps)


def chooses_allowed(e: Episode) -> bool:
    return bool(e.allowed[torch.arange(len(e.actions)), e.actions].all())


def greedy_accuracy(policy: RankPolicy, best, masked: bool, n_episodes: int = 25) -> float:
    """Fraction of right greedy decisions on fresh episodes (the same ones at every call); asserts that no masked
    bucket is ever chosen."""
    g = torch.Generator().manual_seed(1)
    right = total = 0
    for _ in range(n_episodes):
        e = episode(policy, best, g, eps=0.0, greedy=True, masked=masked)
        assert chooses_allowed(e)
        right, total = right + int(e.rewards.sum()), total + len(e.rewards)
    return right / total


def new_policy() -> RankPolicy:
    torch.manual_seed(0)
    return RankPolicy(NF, NB, N_LAYERS, d_model=16, n_head=2, n_layer_enc=1)


@pytest.mark.parametrize("best", [by_layer, by_feature], ids=["layer", "feature"])
def test_ppo_learns_the_right_bucket_of_a_contextual_bandit(best):
    """Trained on episodes with random guardrail masks; greedy choices are then right in ≥ 95% of fresh decisions
    with all buckets allowed and under random masks, and never pick a masked bucket."""
    policy = new_policy()
    before = greedy_accuracy(policy, best, masked=False), greedy_accuracy(policy, best, masked=True)
    assert max(before) < 0.6
    ppo = PPO(policy, PPOConfig(lr=1e-2, epochs=2, discount=0.0, entropy_coef=0.0))
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        episodes = [episode(policy, best, g, eps=0.2, masked=True) for _ in range(4)]
        ppo.update(episodes)
    after = greedy_accuracy(policy, best, masked=False), greedy_accuracy(policy, best, masked=True)
    assert min(after) >= 0.95, (before, after)


def test_exploring_samples_never_choose_masked_buckets():
    policy = new_policy()
    g = torch.Generator().manual_seed(3)
    for eps in (0.0, 0.2, 1.0):
        for _ in range(10):
            e = episode(policy, by_layer, g, eps=eps, masked=True)
            assert not bool(e.allowed.all())  # the masks do mask something
            assert chooses_allowed(e)
            assert bool(torch.isfinite(e.logp).all())


def test_ppo_update_on_masked_episodes_keeps_the_policy_finite():
    """mixture_log_probs once took log(0) on masked buckets, whose backward is 0/0: one PPO update on an
    episode with a masked bucket made every policy parameter NaN."""
    policy = new_policy()
    g = torch.Generator().manual_seed(4)
    episodes = [episode(policy, by_layer, g, eps=0.2, masked=True) for _ in range(2)]
    stats = PPO(policy, PPOConfig(epochs=1)).update(episodes)
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    assert all(v == v for v in stats.values())  # no NaN statistics
