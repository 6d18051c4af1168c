"""Which state features a rank policy uses: decisions that change when a feature group is replaced by its mean
over windows at the same (layer, segment)."""

import pytest
import torch

from drrl.controllers import SegmentStats
from drrl.rl import RLController
from drrl.rl.analysis import feature_use

pytestmark = pytest.mark.usefixtures("one_thread")

BUCKETS = torch.tensor([4, 8, 12, 16])


def records(ctrl, n_windows=6, n_layers=2, n_seg=4):
    """Greedy decisions of ``ctrl`` on windows whose kept energy and norms differ (positions do not)."""
    g = torch.Generator().manual_seed(0)
    ctrl.eval()
    out = []
    for _ in range(n_windows):
        ctrl.begin()
        for layer in range(n_layers):
            energy = torch.rand(n_seg, len(BUCKETS), generator=g).sort(-1).values
            feats = torch.cat([torch.rand(n_seg, 2, generator=g), torch.arange(n_seg)[:, None].float().log1p()], -1)
            stats = SegmentStats(layer, BUCKETS, energy, torch.zeros_like(energy),
                                 torch.ones(n_seg, len(BUCKETS), dtype=torch.bool), torch.ones(n_seg, dtype=torch.bool),
                                 0, 0, feats)  # fmt: skip
            ctrl(stats)
        out.append(ctrl.decisions(0))
    return out


def new_ctrl(seed=0):
    torch.manual_seed(seed)
    return RLController.for_layers([type("L", (), {"buckets": BUCKETS})()] * 2, seed=seed)


def test_feature_use_finds_what_the_policy_reads():
    ctrl = new_ctrl()
    with torch.no_grad():  # make the policy read the kept energy strongly, and nothing else of the state
        ctrl.policy.inp.weight.zero_()
        ctrl.policy.inp.weight[:, : len(BUCKETS)] = 20 * torch.randn(ctrl.policy.inp.weight.shape[0], len(BUCKETS))
    use = feature_use(ctrl, records(ctrl), BUCKETS)
    assert use["replayed"] == 1.0  # one pass over the recorded sequence reproduces the layer-by-layer decisions
    assert use["energy"] > 0.2
    assert use["query norm"] == use["key norm"] == use["position"] == 0.0


def test_a_policy_blind_to_its_input_is_a_fixed_table():
    ctrl = new_ctrl(1)
    with torch.no_grad():
        ctrl.policy.inp.weight.zero_()
    use = feature_use(ctrl, records(ctrl), BUCKETS)
    assert use["replayed"] == 1.0 and all(use[k] == 0.0 for k in ("energy", "query norm", "key norm", "position"))
    assert feature_use(ctrl, records(ctrl)[:1], BUCKETS) == {}  # one window: nothing to average
