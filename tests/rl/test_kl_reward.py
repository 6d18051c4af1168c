"""The loss-aware rewards: exp(−KL) of the model's next-token distribution against the full-rank model's, per
segment, credited to every layer's decision for that segment ("kl"); and each decision's own second-order KL
estimate from its layer's output Fisher ("fisher")."""

import math

import pytest
import torch
import torch.nn.functional as F

from drrl.controllers import Feedback, FixedController, attach_controller
from drrl.models import GPT, GPTConfig
from drrl.rl import PolicyTrainer, RLConfig, RLController
from drrl.rl.reward import fisher_fidelity, segment_kl
from tests.rl.toy import fraction, model_kl, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_segment_kl_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 11, 7, generator=g), torch.randn(2, 11, 7, generator=g)
    t = F.log_softmax(teacher.double(), -1)
    kl = segment_kl(student, t, 4)
    assert kl.shape == (2, 3)
    for b in range(2):
        for s, (a, e) in enumerate([(0, 4), (4, 8), (8, 11)]):
            direct = sum(
                sum(
                    math.exp(t[b, i, v]) * (t[b, i, v] - F.log_softmax(student[b, i].double(), -1)[v]) for v in range(7)
                )
                for i in range(a, e)
            ) / (e - a)
            assert kl[b, s].item() == pytest.approx(float(direct), rel=1e-5)
    assert torch.equal(segment_kl(teacher, F.log_softmax(teacher, -1), 4), torch.zeros(2, 3))


def test_kl_reward_equals_two_forwards_and_skips_the_teacher_branch():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=32, context=32, vocab_size=64, attention="drrl",
                    attention_kwargs={"controller": "rl", "segment": 8, "bucket": 4})  # fmt: skip
    model = GPT(cfg)
    with torch.no_grad():  # sharper attention: at the default init the KLs are ~1e-7 and exp(−KL) rounds to 1
        for b in model.blocks:
            b.attn.qkv.weight.mul_(6)
    ctrl = model.rank_controller
    layers = [b.attn for b in model.blocks]
    trainer = PolicyTrainer(ctrl, RLConfig(alpha=1.0, beta=0.0, gamma=0.0, fidelity="kl"), seed=0)
    x = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    attach_controller(layers, FixedController(16))  # the full-rank model: its log-probs, once per window
    with torch.no_grad():
        teacher = F.log_softmax(model(x), -1)
    attach_controller(layers, ctrl)
    for m in layers:
        m.pop_stats()
    model.train()
    trainer.begin()
    with torch.no_grad():
        logits = model(x)
    kl = trainer.observe_output(logits, teacher, 8)
    assert trainer.collect() == 2
    stats = [m.pop_stats(with_flops=True) for m in layers]
    assert all(st["flops"].get("teacher", 0) == 0 for st in stats)  # no per-layer teacher branch
    direct = (teacher.exp() * (teacher - F.log_softmax(logits, -1))).sum(-1)  # (B, L)
    for row, ep in enumerate(trainer.episodes):
        for seg, r in zip(ep.segments.tolist(), ep.rewards.tolist(), strict=True):
            expect = math.exp(-direct[row, 8 * seg : 8 * seg + 8].mean().item())
            assert r == pytest.approx(expect, rel=1e-5)
            assert kl[row, seg].item() == pytest.approx(direct[row, 8 * seg : 8 * seg + 8].mean().item(), abs=1e-6)
    rewards = torch.cat([e.rewards for e in trainer.episodes])
    assert rewards.std() > 1e-5  # not a constant: the segments' decisions bought different fidelities
    assert trainer.update()["mean_reward"] == pytest.approx(rewards.mean().item(), rel=1e-6)


def test_the_kl_reward_needs_the_output_before_collecting():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, d_model=32, context=16, vocab_size=32, attention="drrl",
                    attention_kwargs={"controller": "rl", "segment": 8, "bucket": 8})  # fmt: skip
    model = GPT(cfg).train()
    trainer = PolicyTrainer(model.rank_controller, RLConfig(fidelity="kl"), seed=0)
    trainer.begin()
    with torch.no_grad():
        model(torch.randint(0, 32, (1, 16)))
    with pytest.raises(RuntimeError, match="observe_output"):  # the fidelity term would be missing
        trainer.collect()
    with pytest.raises(ValueError, match="fidelity"):
        RLConfig(fidelity="loss")


def test_the_kl_reward_puts_rank_where_the_model_needs_it_and_the_cosine_reward_does_not():
    """The toy of tests/rl/toy.py: layer 0's attention output moves with its rank but the model's prediction does
    not, layer 1 the reverse. At a 37.5% cut, the KL-trained policy gives layer 1 the rank; the cosine-trained one
    gives it to layer 0, and its model KL is higher."""
    kw = {"cos_c": (1.0, 0.02), "kl_c": (0.0, 1.0), "seed": 2, "entropy_coef": 0.05, "lagrange_lr": 0.5}
    _, by_kl, _ = train(0.375, fidelity="kl", **kw)
    _, by_cos, _ = train(0.375, fidelity="cosine", **kw)
    assert all(a < b for a, b in zip(*by_kl, strict=True))  # layer 0 below layer 1 in every segment
    assert all(a > b for a, b in zip(*by_cos, strict=True))
    assert fraction(by_kl) <= 0.625 + 0.02 and fraction(by_cos) <= 0.625 + 0.02
    assert model_kl(by_kl, kw["kl_c"]).mean() < model_kl(by_cos, kw["kl_c"]).mean()


def test_the_fisher_reward_learns_the_kl_answer_from_per_layer_terms():
    """The same toy with the fisher reward: each decision is rewarded by its own layer's term of the model's KL, so
    the policy gives layer 1 the rank, as the KL-trained one does, and within the budget."""
    kw = {"cos_c": (1.0, 0.02), "kl_c": (0.0, 1.0), "seed": 2, "entropy_coef": 0.05, "lagrange_lr": 0.5}
    _, by_fisher, _ = train(0.375, fidelity="fisher", **kw)
    assert all(a < b for a, b in zip(*by_fisher, strict=True))
    assert fraction(by_fisher) <= 0.625 + 0.02


def _fisher_controller(n_layers):
    ctrl = RLController.for_layers([type("L", (), {"buckets": torch.tensor([4, 8])})()] * n_layers, seed=0)
    PolicyTrainer(ctrl, RLConfig(alpha=2.0, beta=0.0, gamma=0.0, fidelity="fisher"), seed=0)
    return ctrl.train()


def test_the_fisher_fidelity_is_minus_n_layers_times_each_decisions_error():
    from drrl.controllers import SegmentStats

    ctrl = _fisher_controller(3)
    stats = SegmentStats(0, torch.tensor([4, 8]), torch.ones(2, 2), torch.zeros(2, 2), torch.ones(2, 2, dtype=bool),
                         torch.ones(2, dtype=bool), 0, 0, torch.zeros(2, 3))  # fmt: skip
    ctrl(stats)
    errors = [torch.tensor(0.01), torch.tensor(0.25)]
    fb = Feedback(0, [torch.tensor(0.9)] * 2, [0.5, 0.5], [torch.tensor(0.0)] * 2, [0.5, 1.0], [10, 26], errors)
    ctrl.observe(fb)
    rewards = ctrl._rows[0]["rewards"]
    assert rewards == pytest.approx([2.0 * -3 * 0.01, 2.0 * -3 * 0.25])  # α · (−n_layers · error), β = γ = 0
    assert fisher_fidelity(torch.tensor(0.5), 4).item() == -2.0
    assert ctrl.needs_teacher and not ctrl.needs_bound  # the teacher branch measures the error; γ = 0: no bound
    ctrl(stats)  # a second layer-0 pass: a new forward pass
    with pytest.raises(RuntimeError, match="output_fisher"):  # no Fisher on the layer: no error to reward
        ctrl.observe(Feedback(0, [torch.tensor(0.9)] * 2, [0.5, 0.5], [torch.tensor(0.0)] * 2, [0.5, 1.0], [10, 26]))
