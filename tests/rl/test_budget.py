"""The budgeted policy: a Lagrange multiplier on the score FLOPs that training moves until the executed cut
meets the budget the user states, on a toy whose answer is known."""

import pytest
import torch

from drrl.config import FieldError
from drrl.rl import PolicyTrainer, RLConfig, RLController
from drrl.rl.reward import RewardConfig, budget_reward
from tests.rl.toy import BUCKETS, fraction, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def test_budget_is_met_with_the_rank_where_it_matters():
    # 1 − 0.375 = 0.625 of the score FLOPs: (16, 4) per layer is the optimum, (12, 8) a local one that also meets it
    ctrl, greedy, history = train(budget=0.375)
    assert abs(sum(h["score_fraction"] for h in history[-10:]) / 10 - 0.625) < 0.03  # the rollouts meet the budget
    assert abs(fraction(greedy) - 0.625) <= 0.02  # and so does the greedy policy
    assert sum(greedy[0]) > sum(greedy[1])  # the sensitive layer keeps the rank
    lam = [h["lagrange"] for h in history]
    assert lam[0] != lam[-1] and all(x > 0 for x in lam)  # the multiplier moved (and it is logged)


def test_a_tighter_budget_raises_the_multiplier_and_cuts_more():
    _, loose, h_loose = train(budget=0.2, steps=60)
    _, tight, h_tight = train(budget=0.6, steps=60)
    assert h_tight[-1]["lagrange"] > h_loose[-1]["lagrange"]
    assert fraction(tight) < fraction(loose)


def test_budget_reward_weights_segments_by_their_pairs():
    cfg = RewardConfig(alpha=1.0, gamma=0.5, budget=0.5)
    fid, frac = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5])
    pairs, bound = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.2])
    r = budget_reward(fid, frac, pairs, bound, 2.0, cfg)
    torch.testing.assert_close(r, torch.tensor([1 - 2.0 * 0.5 * 0.5, 1 - 2.0 * 1.5 * 0.5 - 0.5 * 0.2]))


@pytest.mark.parametrize(("kwargs", "field"), [({"budget": 1.0}, "budget"), ({"budget": 0.4, "beta": 0.0}, "beta")])
def test_bad_budget_settings_are_clear_errors(kwargs, field):
    with pytest.raises(FieldError, match=field):
        RLConfig(**kwargs)


def test_trainer_state_keeps_the_multiplier():
    ctrl, _, history = train(budget=0.5, steps=3)
    other = PolicyTrainer(RLController.for_layers([type("L", (), {"buckets": BUCKETS})()] * 2),
                          RLConfig(budget=0.5), seed=1)  # fmt: skip
    state = {"updates": 3, "generator": ctrl.generator.get_state().tolist(), "lagrange": ctrl.lagrange}
    other.load_state_dict(state)
    assert other.controller.lagrange == history[-1]["lagrange"]
