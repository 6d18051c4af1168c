"""The controller room: registry (built-ins and the entry-point plugin), attach_controller, heuristics."""

import pytest
import torch

from drrl.attention import DynamicLowRankAttention
from drrl.controllers import (
    EnergyController,
    FixedController,
    PendingController,
    RandomController,
    RankController,
    SegmentStats,
    TableController,
    attach_controller,
    available_controllers,
    build_controller,
    controller_class,
    register_controller,
)
from drrl.controllers import base as controllers_base


def stats(energy, allowed=None):
    energy = torch.tensor(energy, dtype=torch.float64)
    allowed = torch.ones_like(energy, dtype=torch.bool) if allowed is None else torch.tensor(allowed)
    n = energy.shape[0]
    return SegmentStats(
        0, torch.tensor([8, 16, 32]), energy, torch.zeros_like(energy), allowed, torch.ones(n, dtype=bool)
    )


def test_builtin_heuristics_and_the_rl_plugin_are_registered():
    assert {"energy", "fixed", "random", "rl"} <= set(available_controllers())
    rl = controller_class("rl")
    assert rl.shared and rl.learns and rl.__module__ == "drrl.rl.controller"  # found through the entry point
    for name in ("energy", "fixed", "random", "table"):
        assert not controller_class(name).shared and not controller_class(name).learns


@pytest.mark.parametrize("bad", ["policy", 3, None, ["rl"]])
def test_unknown_controllers_get_one_line_naming_the_registered_ones(bad):
    with pytest.raises(ValueError, match="controller must be one of energy, fixed, random, rl"):
        controller_class(bad)


def test_energy_picks_the_smallest_bucket_that_keeps_tau_and_obeys_the_mask():
    ctrl = EnergyController(tau=0.9)
    assert ctrl(stats([[0.5, 0.95, 1.0], [0.2, 0.5, 1.0]])).tolist() == [1, 2]
    masked = stats([[0.95, 0.97, 1.0]], allowed=[[False, True, True]])
    assert ctrl(masked).tolist() == [1]


def test_fixed_and_random_choose_buckets():
    assert FixedController(16)(stats([[1.0] * 3] * 4)).tolist() == [1] * 4
    a = RandomController(seed=3)(stats([[1.0] * 3] * 32))
    b = RandomController(seed=3)(stats([[1.0] * 3] * 32))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) > 1


@pytest.mark.parametrize("mean_rank", [8.0, 13.0, 16.0, 20.5, 32.0])
def test_random_at_a_mean_rank_has_that_expectation_over_its_widest_interval(mean_rank):
    ctrl = RandomController(seed=1, mean_rank=mean_rank)
    st = stats([[1.0] * 3] * 4000)  # buckets 8, 16, 32
    ranks = torch.tensor([8.0, 16.0, 32.0])[ctrl(st)]
    w = min(mean_rank - 8, 32 - mean_rank)
    # E[rank] = mean_rank; each draw is a bucket next to u in [ρ - w, ρ + w]; the s.e. of 4000 draws is < 0.2
    assert abs(ranks.mean().item() - mean_rank) < 0.8
    below = max([b for b in (8, 16, 32) if b <= mean_rank - w], default=8)
    above = min([b for b in (8, 16, 32) if b >= mean_rank + w], default=32)
    assert below <= ranks.min().item() and ranks.max().item() <= above
    assert ctrl(st).tolist() == RandomController(seed=1, mean_rank=mean_rank)(st).tolist()
    with pytest.raises(ValueError, match="within the buckets"):
        RandomController.from_options({"mean_rank": 40}, [8, 16, 32])
    with pytest.raises(ValueError, match="positive number"):
        RandomController(mean_rank=float("nan"))


def test_table_replays_a_rank_per_layer_and_segment():
    table = TableController([[8, 16], [32]])
    layer0 = stats([[1.0] * 3] * 4)
    assert table(layer0).tolist() == [0, 1, 1, 1]  # past the row's end: its last rank
    layer1 = SegmentStats(1, layer0.buckets, layer0.energy, layer0.bound, layer0.allowed, layer0.decide)
    assert table(layer1).tolist() == [2] * 4
    with pytest.raises(ValueError, match="no row for layer 2"):
        table(SegmentStats(2, layer0.buckets, layer0.energy, layer0.bound, layer0.allowed, layer0.decide))
    with pytest.raises(ValueError, match="not buckets"):
        TableController.from_options({"table": [[8, 12]]}, [8, 16, 32])
    with pytest.raises(ValueError, match="non-empty"):
        TableController([[8], []])


def test_a_new_controller_is_one_class_and_one_registration():
    @register_controller("always-smallest")
    class Smallest(RankController):
        needs_stats = False

        def forward(self, s):
            return torch.zeros(s.energy.shape[0], dtype=torch.long)

    try:
        m = DynamicLowRankAttention(32, 2, segment=8, controller="always-smallest")
        m(torch.randn(1, 24, 32))
        assert m.last_plan.ranks[1:] == [8, 8]
    finally:
        del controllers_base._CONTROLLERS["always-smallest"]


def test_a_shared_controller_waits_for_attach_and_is_built_once_for_all_layers():
    layers = [DynamicLowRankAttention(32, 2, segment=8, controller="rl") for _ in range(3)]
    assert all(isinstance(m.controller, PendingController) for m in layers)
    with pytest.raises(RuntimeError, match="attach_controller"):
        layers[0](torch.randn(1, 16, 32))
    shared = attach_controller(layers)
    assert shared is not None and all(m.controller is shared for m in layers)
    assert shared.policy.layer_emb.num_embeddings == 3
    assert attach_controller(layers) is None  # nothing pending any more


def test_attach_by_name_or_instance():
    layers = [DynamicLowRankAttention(32, 2, segment=8) for _ in range(2)]
    assert attach_controller(layers, "energy", tau=0.5) is None
    assert layers[0].controller is not layers[1].controller and layers[0].controller.tau == 0.5
    one = build_controller("fixed", rank=8)
    attach_controller([*layers, torch.nn.Linear(2, 2)], one)  # modules without a controller are skipped
    assert all(m.controller is one for m in layers)


def test_attention_never_reads_a_controller_by_name():
    # a controller is described by its attributes: a subclass of the energy rule under another name behaves alike
    @register_controller("energy-alias")
    class Alias(EnergyController):
        pass

    try:
        torch.manual_seed(0)
        x = torch.randn(1, 32, 32)
        a = DynamicLowRankAttention(32, 2, segment=8, controller="energy-alias", tau=0.9)
        b = DynamicLowRankAttention(32, 2, segment=8, controller="energy", tau=0.9)
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(x), b(x))
        assert a.last_plan.ranks == b.last_plan.ranks
    finally:
        del controllers_base._CONTROLLERS["energy-alias"]
