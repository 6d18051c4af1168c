import pytest
import torch
from safetensors.torch import load_file, save_file

from drrl.attention import DynamicLowRankAttention
from drrl.models import GPT, GPTConfig
from drrl.rl import PPO, Episode, EpsilonSchedule, PPOConfig, RankPolicy, RewardConfig, RLController
from drrl.rl.policy import PolicyCache, decision_mask, mixture_log_probs, sample
from drrl.rl.reward import cost_ratio

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def test_epsilon_schedule_is_step_based():
    sched = EpsilonSchedule(start=0.5, end=0.1, decay_steps=4)
    assert [round(sched(s), 3) for s in (0, 2, 4, 10)] == [0.5, 0.3, 0.1, 0.1]


def test_decisions_never_see_later_segments_of_earlier_layers():
    # layer-major order: (l0, s0), (l0, s1), (l1, s0), (l1, s1)
    blocked = decision_mask(torch.tensor([0, 1, 0, 1]))
    assert blocked[2, 1]  # layer 1 segment 0 must not see layer 0 segment 1 (later tokens)
    assert not blocked[2, 0] and not blocked[3, 1] and not blocked[3, 2]
    assert blocked[0, 1]  # nor anything later in the sequence


@pytest.mark.parametrize("n_layer_enc", [1, 2])
def test_extending_the_cached_sequence_equals_re_encoding_it(n_layer_enc):
    """Layer by layer, with some segments undecided (so layers add different counts): the logits and values of the
    new decisions equal those of a full pass over the whole sequence, and a later segment of an earlier layer
    never reaches an earlier segment (changing it leaves those rows alone)."""
    torch.manual_seed(0)
    nb, n_feat = 5, 7
    policy = RankPolicy(n_feat, nb, 4, d_model=32, n_head=4, n_layer_enc=n_layer_enc).double().eval()
    g = torch.Generator().manual_seed(1)
    segs_per_layer = [[0, 1, 2, 3], [1, 2, 3], [0, 2, 3], [3]]
    rows = [(layer, s) for layer, segs in enumerate(segs_per_layer) for s in segs]
    feats = torch.randn(len(rows), n_feat, generator=g, dtype=torch.float64)
    layers, segments = (torch.tensor(c) for c in zip(*rows, strict=True))
    prev = torch.randint(0, nb + 1, (len(rows),), generator=g)
    allowed = torch.rand(len(rows), nb, generator=g) > 0.3
    allowed[:, -1] = True
    with torch.no_grad():
        full_logits, full_values = policy(feats, layers, segments, prev, allowed)
    cache, at = PolicyCache(), 0
    for segs in segs_per_layer:
        sl = slice(at, at + len(segs))
        logits, values = policy.extend(cache, feats[sl], layers[sl], segments[sl], prev[sl], allowed[sl])
        torch.testing.assert_close(logits, full_logits[sl], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(values, full_values[sl], rtol=1e-10, atol=1e-10)
        at += len(segs)
    assert len(cache) == len(rows)
    feats2 = feats.clone()
    feats2[3] += 1.0  # layer 0, segment 3: every later decision of a segment < 3 must not move
    cache = PolicyCache()
    policy.extend(cache, feats2[:4], layers[:4], segments[:4], prev[:4], allowed[:4])
    logits, _ = policy.extend(cache, feats2[4:7], layers[4:7], segments[4:7], prev[4:7], allowed[4:7])
    torch.testing.assert_close(logits[:2], full_logits[4:6], rtol=1e-10, atol=1e-10)  # segments 1, 2
    assert not torch.allclose(logits[2], full_logits[6])  # segment 3 sees it


def test_masked_actions_are_never_sampled_and_mixture_is_a_distribution():
    torch.manual_seed(0)
    logits = torch.randn(64, 5)
    allowed = torch.rand(64, 5) > 0.4
    allowed[:, 2] = True
    logits = logits.masked_fill(~allowed, float("-inf"))
    g = torch.Generator().manual_seed(0)
    for eps in (0.0, 0.5, 1.0):
        lp = mixture_log_probs(logits, allowed, eps)
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(64))
        for _ in range(20):
            a, logp = sample(logits, allowed, eps, g)
            assert allowed[torch.arange(64), a].all()
            torch.testing.assert_close(logp, lp[torch.arange(64), a])


def bandit_episode(policy, eps, g, best=2):
    feats, z = torch.ones(1, 3), torch.zeros(1, dtype=torch.long)
    allowed = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        logits, values = policy(feats, z, z, torch.full((1,), 4), allowed)
    a, lp = sample(logits, allowed, eps, g)
    r = (a == best).float()
    return Episode(feats, z, z, torch.full((1,), 4), allowed, a, lp, values, r, eps)


def test_ppo_finds_the_best_arm_of_a_bandit():
    torch.manual_seed(0)
    policy = RankPolicy(3, 4, 1, d_model=16, n_head=2, n_layer_enc=1)
    ppo = PPO(policy, PPOConfig(lr=3e-3, epochs=4))
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        ppo.update([bandit_episode(policy, 0.1, g) for _ in range(16)])
    feats, z = torch.ones(1, 3), torch.zeros(1, dtype=torch.long)
    logits, _ = policy(feats, z, z, torch.full((1,), 4), torch.ones(1, 4, dtype=torch.bool))
    assert int(logits.argmax()) == 2
    assert logits.softmax(-1)[0, 2] > 0.8


def rl_attention(bias_to: int | None = None, explore=True):
    torch.manual_seed(0)
    m = DynamicLowRankAttention(32, 2, segment=8).double()
    nb = len(m.buckets)
    policy = RankPolicy(RLController.n_features(nb), nb, 1, d_model=16, n_head=2, n_layer_enc=1).double()
    if bias_to is not None:  # force one bucket
        with torch.no_grad():
            policy.pi.weight.zero_()
            policy.pi.bias.fill_(-50.0)
            policy.pi.bias[bias_to] = 50.0
    ctrl = RLController(policy, epsilon=EpsilonSchedule(0.0, 0.0), reward=RewardConfig())
    ctrl.explore = explore
    m.set_controller(ctrl)
    return m, ctrl


def test_reward_depends_on_the_executed_rank_with_no_constant_terms():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(3))
    rewards = {}
    for bucket in (0, 1):  # rank 8, rank 16 (= full for d_head 16)
        m, ctrl = rl_attention(bias_to=bucket)
        m.train()
        ctrl.begin()
        m.attend(q, k, v)
        (ep,) = ctrl.collect()
        assert (ep.actions == bucket).all() and len(ep.rewards) == 4  # segments 1..4 decided (0 has no prefix)
        rewards[bucket] = ep.rewards
    # full rank: fidelity 1, bound 0, cost 1 -> R = alpha - beta exactly
    torch.testing.assert_close(rewards[1], torch.full((4,), 1.0 - 0.05, dtype=torch.float32), rtol=0, atol=1e-5)
    assert (rewards[0] != rewards[1]).all()
    assert cost_ratio(8, 16, 8, 8) < cost_ratio(16, 16, 8, 8) == 1.0


def test_policy_checkpoint_round_trips(tmp_path):
    policy = RankPolicy(7, 3, 2)
    save_file(policy.state_dict(), tmp_path / "policy.safetensors")
    again = RankPolicy(7, 3, 2)
    again.load_state_dict(load_file(tmp_path / "policy.safetensors"))
    args = (
        torch.randn(5, 7),
        torch.tensor([0, 0, 1, 1, 1]),
        torch.tensor([1, 2, 1, 2, 3]),
        torch.tensor([3, 0, 3, 1, 2]),
    )
    allowed = torch.ones(5, 3, dtype=torch.bool)
    for a, b in zip(policy.eval()(*args, allowed), again.eval()(*args, allowed), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ppo_updates_from_attention_rollouts():
    g = torch.Generator().manual_seed(1)
    m, ctrl = rl_attention()
    ctrl.epsilon = EpsilonSchedule(0.3, 0.3)
    ppo = PPO(ctrl.policy, PPOConfig(epochs=2))
    m.train()
    for _ in range(3):
        ctrl.begin()
        m.attend(*(torch.randn(2, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(3)))
        episodes = ctrl.collect()
        assert len(episodes) == 2  # one per sequence
        stats = ppo.update(episodes)
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
        ctrl.updates += 1
    assert m.last_plan.flops["teacher"] > 0 and m.last_plan.flops["controller"] > 0


def test_gpt_with_the_rl_controller_has_no_causal_leakage():
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=97, context=24, n_layer=2, n_head=2, d_model=32, attention="drrl", attention_kwargs={"segment": 4}
    )
    model = GPT(cfg).double().eval()
    nb = len(model.blocks[0].attn.buckets)
    ctrl = RLController(RankPolicy(RLController.n_features(nb), nb, 2, d_model=16, n_head=2).double())
    ctrl.explore = False
    for block in model.blocks:
        block.attn.set_controller(ctrl)
    idx = torch.randint(0, 97, (2, 24))
    ctrl.begin()
    base = model(idx)
    for t in (2, 9, 13):  # a shorter sequence (no later tokens at all) decides and computes the same
        torch.testing.assert_close(model(idx[:, : t + 1]), base[:, : t + 1], rtol=0, atol=1e-12)
    for t in (2, 9, 22):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 97
        ctrl.begin()
        torch.testing.assert_close(model(changed)[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("explore", [True, False])
def test_greedy_and_exploring_controllers_respect_the_guardrail(explore):
    m, ctrl = rl_attention(bias_to=0, explore=explore)
    m.guard_eps = 1e-9  # nothing below full rank is safe
    m.train()
    ctrl.begin()
    g = torch.Generator().manual_seed(2)
    m.attend(*(torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(3)))
    plan, buckets = m.last_plan, m.buckets.tolist()
    decided = [s for s in range(len(plan.ranks)) if bool(plan.stats.decide[s])]
    for s in decided:
        assert plan.stats.bound[s, buckets.index(plan.ranks[s])] <= 1e-9 or plan.ranks[s] == 16
    assert plan.ranks[2:] == [16, 16, 16]  # prefixes of >= d tokens are not exact at rank 8
    if explore:  # the policy's own choices (not only the attention's override) were the safe buckets
        (ep,) = ctrl.collect()
        assert [buckets[a] for a in ep.actions.tolist()] == [plan.ranks[s] for s in decided]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ppo_updates_a_policy_on_the_gpu_from_cpu_rollouts():
    policy = RankPolicy(3, 4, 1, d_model=16, n_head=2, n_layer_enc=1)
    g = torch.Generator().manual_seed(0)
    episodes = [bandit_episode(policy, 0.1, g) for _ in range(4)]
    stats = PPO(policy.cuda(), PPOConfig(epochs=1)).update(episodes)
    assert torch.isfinite(torch.tensor(stats["policy_loss"]))


def test_previous_rank_is_the_layer_below_and_bound_only_while_learning():
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=97, context=32, n_layer=3, n_head=2, d_model=32, attention="drrl",
        attention_kwargs={"segment": 8, "controller": "rl"},
    )  # fmt: skip
    model = GPT(cfg).double()
    ctrl = model.rank_controller
    ctrl.epsilon = EpsilonSchedule(1.0, 1.0)  # uniform exploration: layers pick different ranks
    model.train()
    ctrl.begin()
    model(torch.randint(0, 97, (1, 32)))
    (ep,) = ctrl.collect()
    nb = len(model.blocks[0].attn.buckets)
    act = {(int(i), int(s)): int(a) for i, s, a in zip(ep.layers, ep.segments, ep.actions, strict=True)}
    for i, s, p in zip(ep.layers.tolist(), ep.segments.tolist(), ep.prev.tolist(), strict=True):
        assert p == (nb if i == 0 else act[(i - 1, s)])
    assert ctrl.needs_bound and bool((model.blocks[0].attn.last_plan.stats.bound > 0).any())
    ctrl.eval()  # greedy inference computes no bound: it is a reward term, not a feature
    assert not ctrl.needs_bound and not model.blocks[0].attn.needs_bound
    model(torch.randint(0, 97, (1, 32)))
    assert bool((model.blocks[0].attn.last_plan.stats.bound == 0).all())
