import math

import pytest
import torch
import torch.nn.functional as F

from drrl import flops
from drrl.attention import DynamicLowRankAttention, calibrating
from drrl.attention.drrl import attend_offset, kernel_path, naive_lowrank_attention
from drrl.attention.drrl import kernels as drrl_kernels
from drrl.attention.full import naive_attention
from drrl.config import FieldError
from drrl.linalg import gram, lowrank_score_maps
from drrl.models import GPT, GPTConfig

D64 = torch.float64
H, DH = 2, 16


def qkv(B=2, L=40, dtype=D64, seed=0, low=6):
    """Queries with a dominant rank-``low`` part (so low ranks are meaningful), random keys and values."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, low, generator=g, dtype=dtype) @ torch.randn(low, DH, generator=g, dtype=dtype)
    q = q + 0.1 * torch.randn(B, H, L, DH, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H, L, DH, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def naive(m, q, k, v, causal=True):
    """The reference for the last call of ``m``: each row with its own plan."""
    plans = m.last_plans if len(m.last_plans) == q.shape[0] else m.last_plans * q.shape[0]
    rows = [
        naive_lowrank_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], p, m.segment, causal)
        for b, p in enumerate(plans)
    ]
    return torch.cat(rows)


def make(basis="online", controller="energy", causal=True, **kw):
    kw = {"segment": 8, "rank": 8, "tau": 0.9, **kw}
    return DynamicLowRankAttention(H * DH, H, causal=causal, basis=basis, controller=controller, **kw).double()


def calibrate(m, seed=1):
    with calibrating(m):
        for i in range(3):
            m.attend(*qkv(seed=seed + i))
    assert bool(m.calibrated)
    return m


CASES = [
    (basis, ctrl, causal)
    for basis in ("online", "calibrated")
    for ctrl in ("energy", "fixed", "random")
    for causal in (True, False)
    if causal or basis == "calibrated"
]


@pytest.mark.parametrize(("basis", "controller", "causal"), CASES, ids=lambda x: str(x))
def test_matches_naive_reference_outputs_and_grads(basis, controller, causal):
    m = make(basis, controller, causal)
    if basis == "calibrated":
        calibrate(m)
    q, k, v = (x.requires_grad_() for x in qkv())
    y = m.attend(q, k, v)
    plan = m.last_plan
    ref = naive(m, q, k, v, causal)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad((y * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    if controller == "fixed":
        decided = plan.stats.decide.tolist()
        assert all(r == 8 for r, dec in zip(plan.ranks, decided, strict=True) if dec)


@pytest.mark.parametrize("basis", ["online", "calibrated"])
def test_full_rank_equals_exact_attention(basis):
    m = make(basis, "fixed", rank=DH)
    if basis == "calibrated":
        calibrate(m)
    q, k, v = qkv()
    torch.testing.assert_close(m.attend(q, k, v), naive_attention(q, k, v, True), rtol=1e-10, atol=1e-10)


def test_calibrated_maps_are_the_exact_factorisation_of_the_calibration_data():
    m = make("calibrated")
    batches = [qkv(seed=s) for s in (1, 2)]
    with calibrating(m):
        for b in batches:
            m.attend(*b)
    q = torch.cat([b[0] for b in batches], 0).transpose(0, 1).flatten(1, 2)  # (H, N, d)
    k = torch.cat([b[1] for b in batches], 0).transpose(0, 1).flatten(1, 2)
    pq, pk, _ = lowrank_score_maps(gram(q), gram(k), ridge=m.ridge)
    torch.testing.assert_close(m.pq, pq)
    torch.testing.assert_close(m.pk, pk)


@pytest.mark.parametrize(
    ("basis", "controller"), [(b, c) for b in ("online", "calibrated") for c in ("energy", "fixed", "random")]
)
def test_no_causal_leakage_of_outputs_and_ranks(basis, controller):
    """Within one call nothing after position t changes positions <= t. (In training mode the online basis
    of the last call is the warm start of the next, so the comparison runs in eval mode.)"""
    m = make(basis, controller)
    if basis == "calibrated":
        calibrate(m)
    m.eval()
    q, k, v = qkv(L=40)
    base = m.attend(q, k, v)
    ranks = m.last_plan.ranks
    for t in (3, 8, 21, 38):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] += torch.randn_like(x[:, :, t + 1 :])
        out = m.attend(q2, k2, v2)
        torch.testing.assert_close(out[:, :, : t + 1], base[:, :, : t + 1], rtol=0, atol=1e-12)
        assert m.last_plan.ranks[: t // 8 + 1] == ranks[: t // 8 + 1]
        assert not torch.allclose(out[:, :, t + 1], base[:, :, t + 1])


@pytest.mark.parametrize("basis", ["online", "calibrated"])
def test_gpt_with_drrl_has_no_causal_leakage(basis):
    torch.manual_seed(0)
    kw = {"segment": 4, "basis": basis, "controller": "energy", "tau": 0.8}
    cfg = GPTConfig(vocab_size=97, context=24, n_layer=2, n_head=2, d_model=32, attention="drrl", attention_kwargs=kw)
    model = GPT(cfg).double().eval()
    idx = torch.randint(0, 97, (2, 24))
    if basis == "calibrated":
        with calibrating(model):
            model(torch.randint(0, 97, (4, 24)))
    base = model(idx)
    for t in (2, 9, 22):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 97
        torch.testing.assert_close(model(changed)[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-12)


def test_kernel_path_choice_per_device():
    assert kernel_path("cpu", 64, 64) == "sdpa"
    assert kernel_path("cpu", 32, 64) == "sdpa-padded"
    assert kernel_path("cuda", 32, 64) == "sdpa-narrow"
    assert kernel_path("cuda", 64, 64) == "sdpa"


def test_cpu_runs_sdpa_at_full_width_with_the_original_scale(monkeypatch):
    """On CPU the rank-8 queries/keys reach SDPA zero-padded to d_head, with scale 1/sqrt(d_head)."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[-1], k.shape[-1], kw.get("scale")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(drrl_kernels.F, "scaled_dot_product_attention", spy)
    m = calibrate(make("calibrated", "fixed"))
    seen.clear()
    m.attend(*qkv())
    assert seen and all(s == (DH, DH, 1 / math.sqrt(DH)) for s in seen)
    assert m.last_plan.path == "sdpa-padded"


@pytest.mark.parametrize("offset", [1, 8, 24])
def test_attend_offset_merge_and_mask_paths_agree(offset):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 8, 16, generator=g)
    k, v = torch.randn(2, 3, offset + 8, 16, generator=g), torch.randn(2, 3, offset + 8, 16, generator=g)
    merged = attend_offset(q, k, v, offset, 0.25, merge=True)
    masked = attend_offset(q, k, v, offset, 0.25, merge=False)
    full = naive_attention(torch.cat([torch.zeros(2, 3, offset, 16), q], 2) * 0.25 * 4, k, v, True)[:, :, offset:]
    torch.testing.assert_close(merged, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked, full, rtol=1e-5, atol=1e-5)


def test_guardrail_masks_unsafe_ranks_for_every_controller():
    for controller in ("fixed", "random", "energy"):
        m = make("online", controller, guard_eps=0.05, tau=0.1)
        m.attend(*qkv())
        plan = m.last_plan
        st = plan.stats
        for s, r in enumerate(plan.ranks):
            if not bool(st.decide[s]):
                continue
            b = m.buckets.tolist().index(r)
            assert bool(st.allowed[s, b])
            assert st.bound[s, b] <= 0.05 or r == m.r_max
        assert (~st.allowed[1:]).any(), "the test needs some unsafe buckets"


def test_nan_statistics_fall_back_to_full_rank():
    m = make("online", "fixed")
    q, k, v = qkv()
    k[:, :, 20] = float("nan")  # segment 2; prefix statistics of segments 3 and 4 are non-finite
    y = m.attend(q, k, v)
    plan = m.last_plan
    assert plan.fallbacks == 2 and plan.ranks[3:] == [DH, DH]
    assert torch.isfinite(y[:, :, :20]).all()
    assert m.pop_stats()["fallbacks"] == 4  # two segments in each of the two rows


def test_failed_calibration_falls_back_to_full_rank():
    m = make("calibrated", "fixed")
    with calibrating(m):
        q, k, v = qkv()
        m.attend(q * float("nan"), k, v)
    assert not bool(m.calibrated)
    q, k, v = qkv()
    torch.testing.assert_close(m.attend(q, k, v), naive_attention(q, k, v, True))
    assert m.last_plan.fallbacks == 5


def test_uncalibrated_calibrated_basis_is_a_clear_error():
    with pytest.raises(RuntimeError, match="calibrating"):
        make("calibrated").attend(*qkv())


@pytest.mark.parametrize("rank", [8, DH])
def test_export_gives_identical_outputs_at_the_exported_rank(rank):
    m = calibrate(make("calibrated", "fixed", rank=rank))
    x = torch.randn(2, 24, H * DH, dtype=D64)
    from drrl.attention import RotaryEmbedding

    rope = RotaryEmbedding(DH, 64).double()
    ex = m.export(rank)
    assert ex.pq.shape == (H, DH, rank)
    torch.testing.assert_close(ex(x, rope), m(x, rope), rtol=1e-12, atol=1e-12)
    folded = m.export(rank, fold=True)
    assert folded.q_small.weight.shape == (H * rank, H * DH)
    torch.testing.assert_close(folded(x), m(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="RoPE"):
        folded(x, rope)


@pytest.mark.parametrize("rank", [8, DH])
def test_decode_step_with_low_rank_key_cache_matches_prefill(rank):
    m = calibrate(make("calibrated", "fixed", rank=rank))
    q, k, v = qkv(L=33)
    full = m.attend(q, k, v)
    cache = m.new_cache(2, 64, dtype=D64)
    m.append_to_cache(cache, k, v)
    assert cache.kt.shape == (2, H, DH, 64)
    out = m.decode_step(q[:, :, -1:], cache, rank)
    torch.testing.assert_close(out, full[:, :, -1:], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="capacity"):
        m.append_to_cache(cache, torch.zeros(2, H, 40, DH, dtype=D64), torch.zeros(2, H, 40, DH, dtype=D64))


def test_state_dict_round_trip_keeps_bases_and_outputs():
    m = calibrate(make("calibrated"))
    m2 = make("calibrated")
    m2.load_state_dict(m.state_dict())
    q, k, v = qkv()
    torch.testing.assert_close(m2.attend(q, k, v), m.attend(q, k, v), rtol=0, atol=0)


def test_online_basis_warm_start_persists_only_in_training():
    m = make("online").train()
    q, k, v = qkv()
    z0 = m.z.clone()
    m.attend(q, k, v)
    assert not torch.equal(m.z, z0)
    m.eval()
    z1 = m.z.clone()
    m.attend(*qkv(seed=5))
    assert torch.equal(m.z, z1)


def test_energy_controller_keeps_the_requested_energy():
    m = make("online", "energy", tau=0.99)
    m.attend(*qkv())
    st = m.last_plan.stats
    for s, r in enumerate(m.last_plan.ranks):
        if bool(st.decide[s]):
            b = m.buckets.tolist().index(r)
            assert st.energy[s, b] >= 0.99 or r == m.r_max
            assert b == 0 or st.energy[s, b - 1] < 0.99


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r_max": 17}, "r_max must be in 1..d_head=16, got 17"),
        ({"basis": "nope"}, "basis must be one of"),
        ({"controller": "fixed", "rank": 12}, "needs rank= one of the buckets"),
        ({"controller": "policy"}, "controller must be one of"),
        ({"guard_eps": -1.0}, "guard_eps"),
        ({"bucket": "8"}, "invalid for attention"),
    ],
)
def test_bad_settings_are_clear_config_errors(kwargs, match):
    with pytest.raises(FieldError, match=match):
        GPTConfig(n_head=H, d_model=H * DH, attention="drrl", attention_kwargs=kwargs)


def test_online_basis_needs_causal():
    with pytest.raises(ValueError, match="needs causal"):
        DynamicLowRankAttention(32, 2, causal=False, basis="online")


def test_flops_count_the_executed_ranks():
    m = make("online", "fixed", rank=8)
    q, k, v = qkv(B=1, L=40)
    m.attend(q, k, v)
    plan = m.last_plan
    full = flops.full_attention(1, H, 40, DH, causal=True)
    expect = sum(
        2 * r * flops.causal_pairs(s * 8, 8) * H for s, r in enumerate(plan.ranks)
    )  # scores at the executed ranks
    assert plan.flops["scores"] == expect
    assert plan.flops["pv"] == full["pv"] and plan.flops["softmax"] == full["softmax"]
    assert plan.flops["grams"] > 0 and plan.flops["maps"] > 0 and plan.flops["basis"] > 0
    assert plan.flops["stats"] > 0  # online bases need them for the staleness test, whatever the controller
    cal = calibrate(make("calibrated", "fixed", rank=8))
    cal.attend(q, k, v)
    assert cal.last_plan.flops["grams"] == cal.last_plan.flops["stats"] == 0  # nothing to measure at run time
    red = flops.reductions({k: plan.flops[k] for k in full}, full)
    assert 0 < red["score_flops_reduction"] < 0.5
    assert red["attention_flops_reduction"] < red["score_flops_reduction"]


def test_bfloat16_module_keeps_statistics_and_bases_precise():
    m = make("calibrated", "fixed").to(torch.bfloat16)
    assert m.cal_gq.dtype == torch.float64 and m.pq.dtype == torch.float32
    with calibrating(m):
        m.attend(*(x.to(torch.bfloat16) for x in qkv()))
    assert bool(m.calibrated) and m.pq.dtype == torch.float32
    q, k, v = (x.to(torch.bfloat16) for x in qkv(seed=3))
    y = m.attend(q, k, v)
    assert y.dtype == torch.bfloat16
    ref = naive(m, q.double(), k.double(), v.double())
    torch.testing.assert_close(y.double(), ref, rtol=0.05, atol=0.05)


def test_rows_of_a_batch_are_independent():
    """Bases, statistics and ranks are per sequence: editing one row never changes another (eval windows of
    a text are batched side by side, so pooled statistics would leak later text into earlier windows)."""
    for basis, controller in (("online", "energy"), ("calibrated", "energy"), ("online", "fixed")):
        m = make(basis, controller)
        if basis == "calibrated":
            calibrate(m)
        m.eval()
        q, k, v = qkv(B=3)
        base = m.attend(q, k, v)
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[1] += torch.randn_like(x[1])
        out = m.attend(q2, k2, v2)
        torch.testing.assert_close(out[[0, 2]], base[[0, 2]], rtol=0, atol=0)
        alone = m.attend(q[:1], k[:1], v[:1])
        torch.testing.assert_close(alone, base[:1], rtol=1e-12, atol=1e-12)


def test_autocast_keeps_statistics_in_float32_and_runs_every_path():
    m = make("online", "energy").float().eval()
    q, k, v = (x.float() for x in qkv(L=40))
    m.attend(q, k, v)
    ranks32 = [p.ranks for p in m.last_plans]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = m.attend(q.bfloat16(), k.bfloat16(), v)  # v in another dtype, as autocast can leave it
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert any("merge" in p.path for p in m.last_plans)  # the multi-block CPU path ran
    plan = m.plan(q[:1], k[:1], v[:1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan_ac = m.plan(q[:1], k[:1], v[:1])
    assert plan_ac.ranks == plan.ranks == ranks32[0]
    torch.testing.assert_close(plan_ac.stats.energy, plan.stats.energy, rtol=0, atol=0)


@pytest.mark.parametrize(("L", "r_max"), [(37, 16), (40, 12)], ids=["ragged-last-segment", "r_max<d"])
def test_ragged_segments_and_narrow_bases_match_the_reference(L, r_max):
    m = make("online", "energy", r_max=r_max, bucket=4)
    q, k, v = qkv(L=L)
    y = m.attend(q, k, v)
    torch.testing.assert_close(y, naive(m, q, k, v), rtol=1e-10, atol=1e-10)
    assert max(max(p.ranks[1:]) for p in m.last_plans) <= r_max
    assert m.buckets.tolist()[-1] == r_max


def test_refresh_tolerance_controls_refreshes():
    counts = {}
    for tol in (0.0, 1.0):
        m = make("online", "energy", refresh_tol=tol).eval()
        m.attend(*qkv(B=1))
        counts[tol] = m.last_plan.refreshes
    assert counts[1.0] == 1 and counts[0.0] > 1  # one refresh at segment 1, then only when stale


def test_decode_step_rejects_bad_rank_and_several_queries():
    m = calibrate(make("calibrated", "fixed", rank=8, r_max=12, bucket=4))
    cache = m.new_cache(2, 64, dtype=D64)
    q, k, v = qkv(L=8)
    m.append_to_cache(cache, k, v)
    with pytest.raises(ValueError, match="r_max=12"):
        m.decode_step(q[:, :, -1:], cache, 16)
    with pytest.raises(ValueError, match="one query"):
        m.decode_step(q, cache, 8)


def test_pop_stats_logs_rank_decisions_per_segment_and_score_flops():
    torch.manual_seed(0)
    m = DynamicLowRankAttention(64, 2, segment=8, controller="fixed", rank=16).double()
    q, k, v = (torch.randn(2, 2, 30, 32, dtype=torch.float64) for _ in range(3))
    m.attend(q, k, v)
    st = m.pop_stats()
    assert st["segment_ranks"] == [32, 16, 16, 16]  # segment 0 has no prefix: full rank; 30 tokens, 2 rows
    pairs = [flops.causal_pairs(8 * s, min(8, 30 - 8 * s)) for s in range(4)]
    kept = (pairs[0] * 32 + sum(pairs[1:]) * 16) / (sum(pairs) * 32)
    assert st["score_flops_reduction"] == pytest.approx(1 - kept) and m.pop_stats() == {}


def test_each_segment_executes_at_its_own_rank(monkeypatch):
    """Segments of one basis version with different ranks run at their own widths (the keys projected once and
    sliced), so the executed score FLOPs equal the planned ones; outputs match the per-segment reference."""
    from drrl.attention.drrl import layer as drrl_layer

    widths = []
    real = drrl_layer.sdpa_lowrank

    def spy(q, k, v, offset, scale, causal):
        widths.append((offset, q.shape[-2], q.shape[-1], k.shape[-1]))
        return real(q, k, v, offset, scale, causal)

    monkeypatch.setattr(drrl_layer, "sdpa_lowrank", spy)
    m = calibrate(make("calibrated", "random", seed=3)).eval()
    q, k, v = qkv(B=1, L=64)
    y = m.attend(q, k, v)
    ranks = m.last_plan.ranks
    assert len(set(ranks)) > 1  # the test needs segments of different ranks in one block
    for offset, n, wq, wk in widths:
        assert wq == wk
        assert set(ranks[offset // 8 : (offset + n) // 8]) == {wq}  # every segment of a call at the call's width
    assert len(widths) == sum(1 for i, r in enumerate(ranks) if i == 0 or ranks[i - 1] != r)  # equal runs merge
    torch.testing.assert_close(y, naive(m, q, k, v), rtol=1e-10, atol=1e-10)
    st = m.pop_stats()
    assert st["score_flops_reduction"] == pytest.approx(st["planned_score_flops_reduction"], abs=1e-12)
    assert st["score_flops_reduction"] > 0.1


@pytest.mark.parametrize("calibrated", [False, True], ids=["online", "hybrid"])
def test_training_mode_batch_rows_are_independent_and_causal(calibrated):
    """In training mode the online basis warm-starts from the previous call's, never from another row of the
    batch (a row's basis is fitted on that row's whole sequence, future tokens included): perturbing one row's
    tokens leaves the other rows bit-identical, and perturbing every row after t leaves positions <= t."""
    import copy

    m = make("online", "energy")
    if calibrated:
        calibrate(m)
    m.train()
    m.attend(*qkv(B=2, seed=9))  # a warm start of its own, as after a first training step
    q, k, v = qkv(B=3, L=40)

    def run(*x):
        return copy.deepcopy(m).attend(*x)

    base = run(q, k, v)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[0, :, 30:] += torch.randn_like(x[0, :, 30:])
    out = run(q2, k2, v2)
    torch.testing.assert_close(out[1:], base[1:], rtol=0, atol=0)
    assert not torch.allclose(out[0, :, 30:], base[0, :, 30:])
    for t in (8, 21):
        q3, k3, v3 = (x.clone() for x in (q, k, v))
        for x in (q3, k3, v3):
            x[:, :, t + 1 :] += torch.randn_like(x[:, :, t + 1 :])
        torch.testing.assert_close(run(q3, k3, v3)[:, :, : t + 1], base[:, :, : t + 1], rtol=0, atol=1e-12)
    z0 = m.z.clone()
    m.attend(q, k, v)
    assert not torch.equal(m.z, z0)  # the next call still warm-starts from this batch's last basis


def test_row_certificates_equal_the_direct_logit_error_norms():
    from drrl.attention.drrl.guard import row_certificates

    g = torch.Generator().manual_seed(0)
    u, k = torch.randn(1, 2, 5, 4, generator=g, dtype=D64), torch.randn(1, 2, 5, 4, generator=g, dtype=D64)
    before = torch.randn(1, 2, 7, 4, generator=g, dtype=D64)
    c = row_certificates(u, k, before.transpose(-2, -1) @ before, 0.5)
    for i in range(5):
        keys = torch.cat([before, k[:, :, : i + 1]], 2)  # the keys row i sees
        direct = 0.5 * 0.5 * (u[:, :, i : i + 1] @ keys.transpose(-2, -1)).flatten(2).norm(dim=-1)
        torch.testing.assert_close(c[:, :, i], direct.squeeze(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("basis", "controller"), [("online", "fixed"), ("calibrated", "random"), ("online", "energy")])
@pytest.mark.parametrize("eps", [0.02, 0.2, 1.0])
def test_the_guard_certifies_every_row(basis, controller, eps):
    """With a guard, every row's output error against exact attention is at most eps·‖V_{≤i}‖₂ (rows whose
    certificate exceeds eps are recomputed at full rank); a loose guard recomputes fewer rows than a tight one."""
    m = make(basis, controller, guard_eps=eps, rank=8, tau=0.5)
    if basis == "calibrated":
        calibrate(m)
    m.eval()
    for seed, scale in ((0, 1.0), (1, 3.0), (2, 0.3)):
        q, k, v = (x * scale for x in qkv(B=2, L=40, seed=seed))
        y = m.attend(q, k, v)
        exact = naive_attention(q, k, v, causal=True)
        for i in range(40):
            vn = torch.linalg.matrix_norm(v[:, :, : i + 1], ord=2)  # (B, H)
            err = (y[:, :, i] - exact[:, :, i]).norm(dim=-1)
            assert bool((err <= eps * vn + 1e-10).all()), (i, (err / vn).max().item())
    st = m.pop_stats()
    if eps == 1.0:
        assert st["mean_rank"] < DH  # low ranks ran: the certificates were checked against real errors
    if eps == 0.02:
        assert st["guard_rows"] > 0 or st["mean_rank"] == DH  # the tight guard recomputed rows, or masked all


def test_the_guard_is_causal():
    m = make("online", "fixed", guard_eps=0.05, rank=8).eval()
    q, k, v = qkv(L=40)
    base = m.attend(q, k, v)
    for t in (8, 21):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] += 3 * torch.randn_like(x[:, :, t + 1 :])
        torch.testing.assert_close(m.attend(q2, k2, v2)[:, :, : t + 1], base[:, :, : t + 1], rtol=0, atol=1e-12)
