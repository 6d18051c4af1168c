"""Grouped-query attention (GQA) in DynamicLowRankAttention: q has H heads, k and v have H_kv < H heads, and
query head h reads KV head h // (H / H_kv) (Hugging Face ``repeat_kv``: ``repeat_interleave`` on the head dim).
Each KV group shares one pair of maps, the exact factorisation of the group's stacked score matrix."""

import math

import pytest
import torch
import torch.nn.functional as F

from drrl.attention import DynamicLowRankAttention, calibrating
from drrl.attention.drrl import naive_lowrank_attention
from drrl.linalg import gram, lowrank_score_maps, truncation_errors

D64 = torch.float64
H, HKV, DH = 6, 2, 16
G = H // HKV  # query heads per KV head


def qkv(B=2, L=40, seed=0, low=4, heads=H, kv_heads=HKV):
    """Queries of each head with a dominant rank-``low`` part in a head-specific subspace (so a group's stacked
    queries have a larger, but still < d, effective rank than any one head), random keys and values."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(low, DH, generator=g, dtype=D64)
    proj = shared + 0.5 * torch.randn(heads, low, DH, generator=g, dtype=D64)  # per-head subspaces
    q = torch.randn(B, heads, L, low, generator=g, dtype=D64) @ proj
    q = q + 0.05 * torch.randn(B, heads, L, DH, generator=g, dtype=D64)
    k, v = (torch.randn(B, kv_heads, L, DH, generator=g, dtype=D64) for _ in range(2))
    return q, k, v


def make(basis="online", controller="energy", n_kv_head=HKV, n_head=H, **kw):
    kw = {"segment": 8, "rank": 8, "tau": 0.9, "bucket": 4, **kw}
    return DynamicLowRankAttention(
        n_head * DH, n_head, basis=basis, controller=controller, n_kv_head=n_kv_head, **kw
    ).double()


def calibrate(m, batches):
    with calibrating(m):
        for b in batches:
            m.attend(*b)
    assert bool(m.calibrated)
    return m


CAL_SEEDS = (11, 12, 13)


def cal_batches():
    return [qkv(seed=s) for s in CAL_SEEDS]


def exact(q, k, v):
    """Full causal attention with the KV heads expanded as Hugging Face ``repeat_kv`` does."""
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)


def naive(m, q, k, v):
    """The reference for the last call of ``m``: each row with its own plan."""
    plans = m.last_plans if len(m.last_plans) == q.shape[0] else m.last_plans * q.shape[0]
    rows = [
        naive_lowrank_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], p, m.segment, True)
        for b, p in enumerate(plans)
    ]
    return torch.cat(rows)


# ----------------------------------------------------------------------------------- 1. full rank is exact


def test_full_rank_calibrated_gqa_equals_exact_attention():
    m = calibrate(make("calibrated", "fixed", rank=DH), cal_batches())  # default ridge 1e-6
    assert m.pq.shape == m.pk.shape == (HKV, DH, DH)
    q, k, v = qkv(L=37, seed=3)
    y = m.attend(q, k, v)
    assert m.last_plan.ranks == [DH] * 5 and m.last_plan.blocks[0].maps is not None  # ran through the maps
    # P_q P_kᵀ = I at full rank whatever the ridge; only float64 round-off (times the maps' conditioning) remains
    torch.testing.assert_close(y, exact(q, k, v), rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------------- 2. naive reference


@pytest.mark.parametrize("L", [40, 37], ids=["whole-segments", "ragged-last-segment"])
@pytest.mark.parametrize(
    ("basis", "controller", "kw"),
    [
        ("online", "energy", {"tau": 0.95}),  # a refresh every segment: one block per segment, offsets merged
        ("online", "energy", {"tau": 0.95, "refresh_tol": 1.0}),  # one stale block with mixed ranks inside
        ("calibrated", "fixed", {"rank": 8}),
        ("calibrated", "fixed", {"rank": 4}),
    ],
    ids=["online-energy", "online-energy-one-refresh", "calibrated-fixed8", "calibrated-fixed4"],
)
def test_matches_naive_reference_outputs_and_grads(basis, controller, kw, L):
    m = make(basis, controller, **kw)
    if basis == "calibrated":
        calibrate(m, cal_batches())
    m.eval()
    q, k, v = (x.requires_grad_() for x in qkv(L=L, seed=5))
    y = m.attend(q, k, v)
    ref = naive(m, q, k, v)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=D64)
    grads = torch.autograd.grad((y * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    ranks = [r for p in m.last_plans for r in p.ranks]
    assert len(m.last_plans[0].ranks) == math.ceil(L / 8)
    if controller == "fixed":
        assert set(ranks) == {kw["rank"]}
    else:  # the comparison must cover several low ranks and more than one basis version
        assert len(set(ranks) - {DH}) >= 2, ranks
        assert all(p.refreshes >= 1 and len(p.blocks) >= 2 for p in m.last_plans)
        if kw.get("refresh_tol") == 1.0:  # segments of one block at different ranks (trailing columns zeroed)
            assert any(len({p.ranks[s] for s in range(b.s0, b.s1)}) > 1 for p in m.last_plans for b in p.blocks)
    assert not torch.allclose(y, exact(q, k, v), atol=1e-6), "low ranks should change the output"


# ----------------------------------------------------------------------------------- 3. joint factorisation


def stacked_calibration_data(batches, kv):
    """The calibration queries of group ``kv`` per head, (G, N, d), and the KV head's keys, (N, d)."""
    q = torch.cat([b[0] for b in batches], 0)[:, kv * G : (kv + 1) * G]  # (B, G, L, d)
    k = torch.cat([b[1] for b in batches], 0)[:, kv]  # (B, L, d)
    return q.transpose(0, 1).flatten(1, 2), k.flatten(0, 1)


@pytest.mark.parametrize("ridge", [0.0, 1e-6])
def test_group_maps_are_the_eckart_young_factorisation_of_the_stacked_scores(ridge):
    batches = cal_batches()
    m = calibrate(make("calibrated", ridge=ridge), batches)
    for kv in range(HKV):
        qh, kk = stacked_calibration_data(batches, kv)
        s = torch.cat([qh[j] @ kk.T for j in range(G)], 0)  # stacked score matrix [Q_h Kᵀ]_h, (G·N, N)
        sigma = torch.linalg.svdvals(s)
        # the module's Grams are those of the stacked queries (query Grams summed over the group)
        torch.testing.assert_close(m.cal_gq[kv], gram(qh).sum(0), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(m.cal_gk[kv], gram(kk), rtol=1e-12, atol=1e-9)
        pq, pk = m.pq[kv], m.pk[kv]
        stats = truncation_errors(m.cal_gq[kv], m.cal_gk[kv], pq, pk)  # what the controller reads at run time
        for r in range(1, DH):
            approx = torch.cat([(qh[j] @ pq[:, :r]) @ (kk @ pk[:, :r]).T for j in range(G)], 0)
            err = ((s - approx) ** 2).sum()
            tail = (sigma[r:] ** 2).sum()
            # exact with ridge 0; with the default relative ridge 1e-6 the excess is second order (~1e-11)
            torch.testing.assert_close(
                err,
                tail,
                rtol=1e-6,
                atol=0,
                msg=lambda msg, r=r, kv=kv: f"group {kv} rank {r}: kept error is not the stacked SVD tail\n{msg}",
            )
            torch.testing.assert_close(stats[r], err, rtol=1e-7, atol=1e-7 * float((s**2).sum()))
            # sanity: any one head's own factorisation, shared by the group, is no better
            for j in range(G):
                pq1, pk1, _ = lowrank_score_maps(gram(qh[j]), gram(kk), r)
                single = torch.cat([(qh[i] @ pq1) @ (kk @ pk1).T for i in range(G)], 0)
                assert err <= ((s - single) ** 2).sum() * (1 + 1e-9), (kv, r, j)
        # the joint maps are strictly better than head 0's somewhere (the heads' subspaces differ)
        pq1, pk1, _ = lowrank_score_maps(gram(qh[0]), gram(kk), 4)
        single = torch.cat([(qh[i] @ pq1) @ (kk @ pk1).T for i in range(G)], 0)
        assert ((s - single) ** 2).sum() > 1.01 * (sigma[4:] ** 2).sum()


# ----------------------------------------------------------------------------------- 4. causality


@pytest.mark.parametrize("calibrated", [False, True], ids=["uncalibrated", "calibrated-segment-0"])
def test_online_energy_has_no_causal_leakage(calibrated):
    """Changing q, k, v at positions >= t leaves outputs (and the ranks of segments starting <= t) at < t
    unchanged; eval mode, since in training the online basis of one call warm-starts the next."""
    m = make("online", "energy")
    if calibrated:
        calibrate(m, cal_batches())
    m.eval()
    q, k, v = qkv(L=40, seed=7)
    base = m.attend(q, k, v)
    ranks = [p.ranks for p in m.last_plans]
    g = torch.Generator().manual_seed(3)
    for t in (5, 16, 29):  # inside segment 0, a segment boundary, inside segment 3
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t:] += torch.randn(x[:, :, t:].shape, generator=g, dtype=D64)
        out = m.attend(q2, k2, v2)
        torch.testing.assert_close(out[:, :, :t], base[:, :, :t], rtol=0, atol=1e-12, msg=f"leak at t={t}")
        for p, r in zip(m.last_plans, ranks, strict=True):
            assert p.ranks[: t // 8 + 1] == r[: t // 8 + 1], (t, p.ranks, r)
        assert not torch.allclose(out[:, :, t], base[:, :, t])


# ----------------------------------------------------------------------------------- 5. GQA vs expanded MHA


@pytest.mark.parametrize("basis", ["calibrated", "online"])
def test_full_rank_gqa_equals_mha_on_expanded_kv(basis):
    gqa = make(basis, "fixed", rank=DH)
    mha = make(basis, "fixed", rank=DH, n_kv_head=H)
    assert mha.group == 1 and gqa.group == G
    if basis == "calibrated":
        batches = cal_batches()
        calibrate(gqa, batches)
        calibrate(mha, [(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)) for q, k, v in batches])
        assert mha.pq.shape == (H, DH, DH) and gqa.pq.shape == (HKV, DH, DH)
    gqa.eval(), mha.eval()
    q, k, v = qkv(L=37, seed=9)
    y_gqa = gqa.attend(q, k, v)
    y_mha = mha.attend(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))
    assert [p.ranks for p in gqa.last_plans] == [p.ranks for p in mha.last_plans]
    torch.testing.assert_close(y_gqa, y_mha, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(y_gqa, exact(q, k, v), rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------------- 6. decode


def naive_decode(m, q, k, v, rank):
    """Rank-``rank`` attention of one query per head (B, H, 1, d) against all keys (B, H_kv, n, d), formed
    explicitly from the module's maps with P_q expanded to the query heads of each group."""
    pq = m.pq[..., :rank].repeat_interleave(G, 0)  # (H, d, r)
    qt = torch.einsum("bhld,hdr->bhlr", q, pq)
    kt = torch.einsum("bhld,hdr->bhlr", k, m.pk[..., :rank]).repeat_interleave(G, 1)
    scores = qt @ kt.transpose(-2, -1) / math.sqrt(DH)
    return scores.softmax(-1) @ v.repeat_interleave(G, 1)


@pytest.mark.parametrize("rank", [4, 8, 12])
def test_decode_with_gqa_low_rank_cache_matches_naive_and_prefill(rank):
    r_max = 12
    m = calibrate(make("calibrated", "fixed", rank=rank, r_max=r_max), cal_batches())
    B, L, n_more, cap = 2, 33, 4, 48
    q, k, v = qkv(B=B, L=L + n_more, seed=21)
    prefill = m.attend(q, k, v)  # causal, the same maps at a fixed rank: row t is the decode step at t
    cache = m.new_cache(B, cap, dtype=D64)
    assert cache.kt.shape == (B, HKV, r_max, cap) and cache.v.shape == (B, HKV, cap, DH)
    per_token = (cache.kt.numel() + cache.v.numel()) // (B * cap)
    assert per_token == HKV * (r_max + DH) < 2 * HKV * DH < 2 * H * DH
    m.append_to_cache(cache, k[:, :, : L - 1], v[:, :, : L - 1])  # the prefix, then one token at a time
    for t in range(L - 1, L + n_more):
        m.append_to_cache(cache, k[:, :, t : t + 1], v[:, :, t : t + 1])
        assert cache.n == t + 1
        out = m.decode_step(q[:, :, t : t + 1], cache, rank)
        assert out.shape == (B, H, 1, DH)
        ref = naive_decode(m, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], rank)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda msg, t=t: f"t={t}: {msg}")
        torch.testing.assert_close(out, prefill[:, :, t : t + 1], rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------- 7. bad input


@pytest.mark.parametrize("n_kv_head", [4, 5, 0, 12])
def test_n_kv_head_must_divide_n_head(n_kv_head):
    with pytest.raises(ValueError, match=f"n_kv_head must divide n_head={H}, got {n_kv_head}"):
        DynamicLowRankAttention(H * DH, H, n_kv_head=n_kv_head)


def test_export_of_a_gqa_layer_is_a_clear_error():
    m = calibrate(make("calibrated", "fixed"), cal_batches())
    with pytest.raises(ValueError, match="GQA"):
        m.export(8)
    mha = make("calibrated", "fixed", n_kv_head=H)
    calibrate(mha, [(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)) for q, k, v in cal_batches()])
    assert mha.export(8).pq.shape == (H, DH, 8)  # n_kv_head == n_head is plain MHA and still exports


def test_the_guard_certifies_every_row_with_grouped_query_attention():
    m = make("online", "fixed", rank=4, guard_eps=0.05).eval()
    q, k, v = qkv()
    y = m.attend(q, k, v)
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    exact = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    for i in range(q.shape[2]):
        vn = torch.linalg.matrix_norm(vv[:, :, : i + 1], ord=2)
        assert bool(((y[:, :, i] - exact[:, :, i]).norm(dim=-1) <= 0.05 * vn + 1e-10).all()), i
    assert m.pop_stats()["guard_rows"] > 0


# ----------------------------------------------------------------------------------- 8. a rank per KV head


def per_head(basis, table):
    from drrl.controllers import TableController

    m = make(basis, "fixed", rank=DH)
    if basis == "calibrated":
        calibrate(m, cal_batches())
    m.layer_idx = 0
    m.set_controller(TableController([table]))
    return m.eval()


# segments: per-head, per-head, equal heads (one call), int (every head)
PER_HEAD_TABLE = [[4, 12], [12, 4], [8, 8], 16, [4, 8]]


@pytest.mark.parametrize("L", [40, 37], ids=["whole-segments", "ragged-last-segment"])
@pytest.mark.parametrize("basis", ["calibrated", "online"])
def test_per_head_ranks_match_the_naive_reference_and_count_each_group_at_its_rank(basis, L):
    m = per_head(basis, PER_HEAD_TABLE)
    q, k, v = (x.requires_grad_() for x in qkv(L=L, seed=5))
    y = m.attend(q, k, v)
    p = m.last_plans[0]
    decided = p.stats.decide.tolist()
    want = [tuple(e) if isinstance(e, list) else (e, e) for e in PER_HEAD_TABLE]
    assert [h for h, dec in zip(p.head_ranks, decided, strict=True) if dec] == [
        w for w, dec in zip(want, decided, strict=True) if dec
    ]
    assert p.ranks == [max(h) for h in p.head_ranks]
    ref = naive(m, q, k, v)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=D64)
    for a, b in zip(
        torch.autograd.grad((y * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # the executed score FLOPs are the planned ones, each group of G query heads at its head's rank
    from drrl import flops

    stats = m.pop_stats(with_flops=True)
    B = q.shape[0]
    ref_scores = sum(
        B * G * flops.attention_core(flops.causal_pairs(s * 8, min(8, L - s * 8), True, L), r, DH)["scores"]
        for s, h in enumerate(p.head_ranks)
        for r in h
    )
    assert stats["flops"]["scores"] == stats["planned_score_flops"] == ref_scores
    mean = sum(sum(h) / HKV * min(8, L - s * 8) for s, h in enumerate(p.head_ranks)) / L
    assert stats["mean_rank"] == pytest.approx(mean)


def test_per_head_ranks_change_only_their_groups_outputs():
    """Lowering KV head 1's rank moves query heads G..2G-1 only; equal per-head ranks equal the int entry."""
    q, k, v = qkv(L=40, seed=5)
    full = per_head("calibrated", [DH]).attend(q, k, v)
    y = per_head("calibrated", [[DH, 4]]).attend(q, k, v)
    torch.testing.assert_close(y[:, :G], full[:, :G], rtol=0, atol=1e-12)
    assert not torch.allclose(y[:, G:], full[:, G:], atol=1e-6)
    torch.testing.assert_close(
        per_head("calibrated", [[8, 8]]).attend(q, k, v), per_head("calibrated", [8]).attend(q, k, v), rtol=0, atol=0
    )


def test_per_head_ranks_have_no_causal_leakage():
    m = per_head("online", PER_HEAD_TABLE)
    q, k, v = qkv(L=40, seed=7)
    base = m.attend(q, k, v)
    g = torch.Generator().manual_seed(3)
    for t in (5, 16, 29):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t:] += torch.randn(x[:, :, t:].shape, generator=g, dtype=D64)
        out = m.attend(q2, k2, v2)
        torch.testing.assert_close(out[:, :, :t], base[:, :, :t], rtol=0, atol=1e-12, msg=f"leak at t={t}")
        assert not torch.allclose(out[:, :, t], base[:, :, t])


def test_per_head_ranks_are_clear_errors_with_the_guard_or_the_wrong_head_count():
    from drrl.controllers import TableController

    q, k, v = qkv(L=16)
    m = per_head("online", [[4, 8]])
    m.guard_eps = 0.05
    with pytest.raises(ValueError, match="per-head ranks do not run with the guardrail"):
        m.attend(q, k, v)
    m = per_head("online", [[4, 8, 8]])
    with pytest.raises(ValueError, match=r"one column per key/value head \(2\), got 3"):
        m.attend(q, k, v)
    with pytest.raises(ValueError, match="per-head entries of \\[2, 3\\] heads"):
        TableController([[[4, 8], [4, 8, 8]]])
    with pytest.raises(ValueError, match="one rank per key/value head, got \\[\\]"):
        TableController([[[]]])
