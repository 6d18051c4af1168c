import pytest
import torch

from drrl.attention import DynamicLowRankAttention, StaticRankAttention, build_attention, calibrating
from drrl.attention.full import naive_attention


def _qkv(B=2, H=2, L=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, d, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("causal", [True, False])
def test_full_rank_static_is_exact_after_calibration(causal):
    m = StaticRankAttention(32, 2, rank=16, causal=causal, segment=8).double()
    q, k, v = _qkv()
    with calibrating(m):
        m.attend(q, k, v)
    torch.testing.assert_close(m.attend(q, k, v), naive_attention(q, k, v, causal), rtol=0, atol=1e-8)


@pytest.mark.parametrize("causal", [True, False])
def test_static_equals_drrl_with_a_fixed_rank(causal):
    q, k, v = _qkv(seed=1)
    st = StaticRankAttention(32, 2, rank=8, causal=causal, segment=8).double()
    dyn = DynamicLowRankAttention(32, 2, causal=causal, segment=8, basis="calibrated", controller="fixed", rank=8)
    dyn = dyn.double()
    for m in (st, dyn):
        with calibrating(m):
            m.attend(q, k, v)
    out = st.attend(q, k, v)
    torch.testing.assert_close(out, dyn.attend(q, k, v), rtol=0, atol=1e-10)
    assert (out - naive_attention(q, k, v, causal)).abs().max() > 1e-3  # rank 8 of 16 is not exact
    assert tuple(st.pq.shape) == (2, 16, 8)  # maps stored at width r only
    st.attend(q, k, v)
    if not causal:  # one block: exactly r/d of the score FLOPs
        assert st.pop_stats()["score_flops_reduction"] == pytest.approx(0.5)


def test_uncalibrated_and_bad_rank_are_clear_errors():
    m = build_attention("static", 32, 2, rank=4)
    with pytest.raises(RuntimeError, match="calibrating"):
        m.attend(*(x.float() for x in _qkv()))
    for bad in (None, 0, 17):
        with pytest.raises(ValueError, match="rank"):
            StaticRankAttention(32, 2, rank=bad)


def test_bidirectional_drrl_computes_calibration_statistics_once_per_calibration():
    m = DynamicLowRankAttention(32, 2, causal=False, basis="calibrated", controller="energy", tau=0.9).double()
    q, k, v = _qkv()
    with calibrating(m):
        m.attend(q, k, v)
    first = m.attend(q, k, v)
    st1 = m.pop_stats(with_flops=True)
    again = m.attend(*(x[:, :, :25] for x in _qkv(seed=5)))  # another batch, another length: no new statistics
    st2 = m.pop_stats(with_flops=True)
    assert st1["flops"]["calibration"] > 0 and "calibration" not in st2["flops"]  # a one-time cost
    assert "stats" not in st1["flops"]  # nothing is measured per call
    assert m.last_plan.ranks == [int(st1["mean_rank"])] and first.shape[2] == 40 and again.shape[2] == 25
    m.load_state_dict(m.state_dict())  # new maps invalidate the cache
    m.attend(q, k, v)
    assert m.pop_stats(with_flops=True)["flops"]["calibration"] > 0


@pytest.mark.parametrize("length", [7, 40, 300])
def test_bidirectional_statistics_rescale_exactly_with_length(length):
    """Energy is invariant to the Grams' token count and the bound grows linearly with it: the cached
    statistics equal those computed directly on the calibration Grams rescaled to each length."""
    m = DynamicLowRankAttention(32, 2, causal=False, basis="calibrated", controller="energy", guard_eps=0.5).double()
    with calibrating(m):
        m.attend(*_qkv())
    gq, gk, gv = (g.unsqueeze(0) for g in m._calibration_grams(m.pq, length))
    e_ref, b_ref = m._bucket_stats(gq, gk, gv, m.pq, m.pk)
    e, b = m._calibration_stats(torch.float64, gq.device, True, length)
    torch.testing.assert_close(e, e_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b, b_ref, rtol=1e-10, atol=1e-6)  # √(round-off) at full rank
    assert b.max() > 0


def test_bidirectional_batch_shares_one_plan_and_matches_rows():
    """A bidirectional calibrated layer plans once per batch: outputs equal those of each row alone."""
    m = DynamicLowRankAttention(
        32, 2, causal=False, basis="calibrated", controller="energy", tau=0.3, bucket=4
    ).double()
    q, k, v = _qkv(B=3)
    with calibrating(m):
        m.attend(q, k, v)
    out = m.attend(q, k, v)
    assert len(m.last_plans) == 1 and m.last_plan.ranks[0] < 16  # one decision, below full rank
    rows = torch.cat([m.attend(q[b : b + 1], k[b : b + 1], v[b : b + 1]) for b in range(3)])
    torch.testing.assert_close(out, rows, rtol=0, atol=1e-12)
