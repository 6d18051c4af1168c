"""Q/K channel selectors: index layout, planted channels, naive per-channel scores, DRRQR on exactly dependent
channels, and the PCA rotation on planted subspaces."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.pruning import (
    SELECTORS,
    available_selectors,
    check_keep,
    get_selector,
    pca_rotation,
    select_drrqr,
    select_l1,
    select_random,
    select_taylor,
    select_wanda,
)

F64 = torch.float64
H, DK, D = 3, 8, 20


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(seed=0):
    g = gen(seed)
    return [torch.randn(H * DK, D, generator=g) for _ in range(4)]  # wq, gq, wk, gk


def _acts(n=64, seed=0):
    g = gen(seed)
    return torch.randn(n, H, DK, generator=g), torch.randn(n, H, DK, generator=g)


def _all_selectors(d_keep, seed=0):
    wq, gq, wk, gk = _weights(seed)
    x_rms = torch.rand(D, generator=gen(seed + 1)) + 0.1
    q, k = _acts(seed=seed)
    return {
        "random": select_random(H, DK, d_keep, generator=gen(seed)),
        "l1": select_l1(wq, wk, H, d_keep),
        "wanda": select_wanda(wq, wk, x_rms, H, d_keep),
        "taylor": select_taylor(wq, gq, wk, gk, H, d_keep),
        "drrqr": select_drrqr(q, k, d_keep, generator=gen(seed)),
    }


def _naive_top(scores_per_channel, d_keep):
    """Per head: sort channels by (−score, index) in plain Python, keep d_keep, sort ascending."""
    out = []
    for h in range(H):
        chans = sorted(range(DK), key=lambda i, h=h: (-scores_per_channel[h * DK + i], i))
        out.append(sorted(chans[:d_keep]))
    return torch.tensor(out)


def test_selector_names():
    assert SELECTORS == ("random", "l1", "wanda", "taylor", "pca", "drrqr")
    assert available_selectors() == SELECTORS
    needs = {s: get_selector(s).needs for s in SELECTORS}
    assert needs == {
        "random": (),
        "l1": (),
        "wanda": ("rms",),
        "taylor": ("grads",),
        "pca": ("acts",),
        "drrqr": ("acts",),
    }
    assert [s for s in SELECTORS if get_selector(s).rotates] == ["pca"]
    from drrl.pruning.prune import NEEDS  # the old table, now read from the registry

    assert needs == NEEDS


@pytest.mark.parametrize("d_keep", [1, 5, DK])
def test_indices_are_sorted_unique_and_in_range(d_keep):
    for name, idx in _all_selectors(d_keep).items():
        assert idx.shape == (H, d_keep) and idx.dtype == torch.long, name
        assert bool((idx[:, 1:] > idx[:, :-1]).all()), name  # sorted, hence unique
        assert int(idx.min()) >= 0 and int(idx.max()) < DK, name
        if d_keep == DK:
            assert torch.equal(idx, torch.arange(DK).expand(H, -1)), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_scores_match_a_naive_per_channel_loop(seed):
    wq, gq, wk, gk = (w.double() for w in _weights(seed))
    x_rms = torch.rand(D, generator=gen(seed + 1), dtype=F64) + 0.1
    l1, wanda, taylor = [], [], []
    for i in range(H * DK):
        l1.append(sum(abs(float(wq[i, j])) + abs(float(wk[i, j])) for j in range(D)))
        wanda.append(sum((abs(float(wq[i, j])) + abs(float(wk[i, j]))) * float(x_rms[j]) for j in range(D)))
        taylor.append(
            sum(abs(float(wq[i, j] * gq[i, j])) for j in range(D))
            + sum(abs(float(wk[i, j] * gk[i, j])) for j in range(D))
        )
    for d_keep in (1, 3, 6):
        assert torch.equal(select_l1(wq, wk, H, d_keep), _naive_top(l1, d_keep))
        assert torch.equal(select_wanda(wq, wk, x_rms, H, d_keep), _naive_top(wanda, d_keep))
        assert torch.equal(select_taylor(wq, gq, wk, gk, H, d_keep), _naive_top(taylor, d_keep))


PLANTED = torch.tensor([[1, 4, 6], [0, 2, 7], [3, 5, 6]])


def _rows(idx):
    return (idx + DK * torch.arange(H).unsqueeze(1)).flatten()


def test_weight_selectors_pick_planted_channels():
    wq, gq, wk, gk = _weights(5)
    wq, wk = 0.1 * wq, 0.1 * wk
    x_rms = torch.ones(D)
    x_rms[:5] = 10.0
    planted = _rows(PLANTED)
    # L1: planted rows are larger everywhere (in q only: the score sums q and k)
    wq_big = wq.clone()
    wq_big[planted] *= 30
    assert torch.equal(select_l1(wq_big, wk, H, 3), PLANTED)
    # Wanda: planted rows load on the 5 high-RMS features; decoys carry more L1 mass on low-RMS features
    wq_w, wk_w = wq.clone(), wk.clone()
    wq_w[planted, :5] = 2.0
    decoys = _rows((PLANTED + 1) % DK)
    decoys = decoys[~torch.isin(decoys, planted)]
    wk_w[decoys, 5:] = 3.0
    assert torch.equal(select_wanda(wq_w, wk_w, x_rms, H, 3), PLANTED)
    assert not torch.equal(select_l1(wq_w, wk_w, H, 3), PLANTED)  # the decoys fool L1
    # Taylor: planted rows carry large gradients (in k only), the weights are unchanged
    gk_t = 0.01 * gk.clone()
    gk_t[planted] = 5.0
    assert torch.equal(select_taylor(wq, 0.01 * gq, wk, gk_t, H, 3), PLANTED)


def test_ties_go_to_the_lower_channel():
    w = torch.ones(H * DK, D)
    assert torch.equal(select_l1(w, w, H, 3), torch.arange(3).expand(H, -1))
    assert torch.equal(select_taylor(w, w, w, w, H, 2), torch.arange(2).expand(H, -1))


# ----------------------------------------------------------------------------- DRRQR


def _dependent_acts(n, seed, n_indep=6, n_dep=4, n_zero=2):
    """Per head: n_indep correlated, differently scaled independent channels; n_dep exact combinations of them
    with ‖coefficients‖₁ ≤ 0.9 (so neither pivoting nor a swap can prefer them); n_zero zero channels; the
    channels shuffled differently in each head. Returns q, k (n, H, d_k) and the independent channels (H, n_indep)."""
    g = gen(seed)
    d_k = n_indep + n_dep + n_zero
    qs, ks, indep = [], [], []
    for _ in range(H):
        mix = torch.eye(n_indep, dtype=F64) + 0.5 * torch.randn(n_indep, n_indep, generator=g, dtype=F64).triu(1)
        scale = torch.logspace(0, -1, n_indep, dtype=F64)
        base = torch.randn(2 * n, n_indep, generator=g, dtype=F64) @ mix * scale  # (2n, n_indep)
        w = torch.randn(n_indep, n_dep, generator=g, dtype=F64)
        w = 0.9 * torch.rand(1, n_dep, generator=g, dtype=F64) * w / w.abs().sum(0, keepdim=True)
        m = torch.cat([base, base @ w, torch.zeros(2 * n, n_zero, dtype=F64)], 1)
        order = torch.randperm(d_k, generator=g)  # column c of the head is column order[c] of m
        m = m[:, order]
        qs.append(m[:n])
        ks.append(m[n:])
        indep.append(torch.nonzero(order < n_indep).flatten())
    return torch.stack(qs, 1), torch.stack(ks, 1), torch.stack(indep)


@pytest.mark.parametrize("n", [50, 3000], ids=["all-rows", "sampled-rows"])
def test_drrqr_never_keeps_dependent_or_zero_channels(n):
    q, k, indep = _dependent_acts(n, seed=n)
    for d_keep in range(1, 7):
        idx = select_drrqr(q, k, d_keep, max_swaps=None, generator=gen(0))
        for h in range(H):
            assert set(idx[h].tolist()) <= set(indep[h].tolist()), (d_keep, h)
    # d_keep = the true rank: exactly the independent channels
    assert torch.equal(select_drrqr(q, k, 6, generator=gen(0)), indep)
    # float32 activations work the same
    assert torch.equal(select_drrqr(q.float(), k.float(), 6, generator=gen(0)), indep)


def test_drrqr_keeps_the_channels_that_span_the_activations():
    """Low rank plus small noise: the kept channels reconstruct every channel almost as well as the best
    rank-d_keep approximation (SVD), which a random subset does not."""
    g = gen(11)
    n, d_k, r = 400, 16, 5
    u = torch.randn(2 * n, r, generator=g, dtype=F64) @ torch.randn(r, d_k, generator=g, dtype=F64)
    m = u + 1e-3 * torch.randn(2 * n, d_k, generator=g, dtype=F64)
    m[:, :3] = 1e-3 * torch.randn(2 * n, 3, generator=g, dtype=F64)  # three pure-noise channels
    q, k = m[:n].unsqueeze(1), m[n:].unsqueeze(1)
    idx = select_drrqr(q, k, r)[0]

    def residual(cols):
        x = m[:, cols]
        return float((m - x @ torch.linalg.lstsq(x, m).solution).norm())

    best = float(torch.linalg.svdvals(m)[r:].norm())
    assert residual(idx) <= 10 * best
    assert residual(torch.arange(r)) > 100 * best  # a subset with the noise channels does not


def test_drrqr_is_deterministic_given_a_generator():
    q, k = _acts(n=3000, seed=3)  # 6000 rows > 5000: sampled
    a = select_drrqr(q, k, 4, generator=gen(7))
    assert torch.equal(a, select_drrqr(q, k, 4, generator=gen(7)))
    assert torch.equal(select_random(H, DK, 4, generator=gen(7)), select_random(H, DK, 4, generator=gen(7)))
    draws = {tuple(select_random(H, DK, 4, generator=gen(s)).flatten().tolist()) for s in range(5)}
    assert len(draws) > 1


# ----------------------------------------------------------------------------- PCA rotation


def _planted_subspace(n, d_k, r, seed):
    g = gen(seed)
    basis = torch.linalg.qr(torch.randn(H, d_k, r, generator=g, dtype=F64))[0]  # (H, d_k, r)
    z = torch.randn(2, n, H, r, generator=g, dtype=F64) + 0.3  # non-centred, as post-SiLU activations are
    acts = torch.einsum("snhr,hdr->snhd", z, basis)
    return acts[0], acts[1], basis


def test_pca_rotation_spans_the_planted_subspace():
    q, k, basis = _planted_subspace(500, 10, 3, seed=4)
    for use_q in (True, False):
        t = pca_rotation(q, k, 3, use_q=use_q)
        assert t.shape == (H, 3, 10) and t.dtype == F64
        torch.testing.assert_close(
            t @ t.transpose(-2, -1), torch.eye(3, dtype=F64).expand(H, -1, -1), atol=1e-12, rtol=0
        )
        proj = t.transpose(-2, -1) @ t
        torch.testing.assert_close(proj, basis @ basis.transpose(-2, -1), atol=1e-10, rtol=0)
    # use_q=False ignores q entirely
    noise = torch.randn(q.shape, generator=gen(5), dtype=F64)
    torch.testing.assert_close(pca_rotation(noise, k, 3, use_q=False), pca_rotation(q, k, 3, use_q=False))


def test_pca_rotation_matches_a_naive_covariance():
    q, k = (x.double() for x in _acts(n=300, seed=6))
    k = k + torch.linspace(0, 2, DK, dtype=F64)  # a mean to remove and an anisotropic spread
    t = pca_rotation(q, k, 4)
    for h in range(H):
        covs = []
        for x in (k[:, h], q[:, h]):
            rows = [x[i] / x[i].norm() for i in range(x.shape[0])]
            covs.append(torch.cov(torch.stack(rows).T))
        vals, vecs = torch.linalg.eigh(0.5 * (covs[0] + covs[1]))
        top = vecs[:, -4:].flip(-1).T  # (4, d_k), decreasing variance
        assert float((vals[-4] - vals[-5]) / vals[-1]) > 1e-3  # a gap, so the subspace is well defined
        torch.testing.assert_close(top.T @ top, t[h].T @ t[h], atol=1e-9, rtol=0)
        # each row is ± the naive eigenvector, sign fixed by the largest entry
        torch.testing.assert_close((t[h] * top).sum(-1).abs(), torch.ones(4, dtype=F64), atol=1e-9, rtol=0)
        assert bool((t[h].gather(-1, t[h].abs().argmax(-1, keepdim=True)) > 0).all())


@settings(max_examples=15, deadline=None)
@given(d_k=st.integers(2, 12), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_pca_rotation_rows_orthonormal(d_k, frac, seed):
    d_keep = max(1, round(frac * d_k))
    g = gen(seed)
    q, k = torch.randn(2, 40, H, d_k, generator=g, dtype=F64).relu()  # zero rows included: must not produce nan
    t = pca_rotation(q, k, d_keep)
    torch.testing.assert_close(
        t @ t.transpose(-2, -1), torch.eye(d_keep, dtype=F64).expand(H, -1, -1), atol=1e-10, rtol=0
    )


# ----------------------------------------------------------------------------- errors


def test_bad_d_keep_and_shapes_raise():
    wq, gq, wk, gk = _weights()
    q, k = _acts()
    for bad in (0, DK + 1):
        with pytest.raises(ValueError, match=rf"d_keep must be in 1..{DK}"):
            check_keep(DK, bad)
        for call in (
            lambda b=bad: select_random(H, DK, b),
            lambda b=bad: select_l1(wq, wk, H, b),
            lambda b=bad: select_wanda(wq, wk, torch.ones(D), H, b),
            lambda b=bad: select_taylor(wq, gq, wk, gk, H, b),
            lambda b=bad: select_drrqr(q, k, b),
            lambda b=bad: pca_rotation(q, k, b),
        ):
            with pytest.raises(ValueError, match="d_keep must be in"):
                call()
    with pytest.raises(ValueError, match="divisible by n_head"):
        select_l1(wq, wk, 5, 2)
    with pytest.raises(ValueError, match="wk must have the shape"):
        select_l1(wq, wk[:, :-1], H, 2)
    with pytest.raises(ValueError, match="x_rms must be"):
        select_wanda(wq, wk, torch.ones(D + 1), H, 2)
    with pytest.raises(ValueError, match="gk must have the shape"):
        select_taylor(wq, gq, wk, gk[:-1], H, 2)
    with pytest.raises(ValueError, match="rows must be"):
        select_drrqr(q, k, 4, rows=3)
    with pytest.raises(ValueError, match="q_act and k_act"):
        select_drrqr(q, k[:, :, :-1], 2)
