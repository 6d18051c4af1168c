"""Spectrum summaries against their direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings

from drrl.linalg import (
    core_singular_values,
    effective_rank,
    energy_ratio,
    gram,
    stable_rank,
    tail_energy,
)
from tests.linalg.helpers import F64, gen, qk_with_spectrum, random_qk, spectra

CASES = {
    "generic": [5.0, 3.0, 2.0, 0.5],
    "flat": [2.0, 2.0, 2.0, 2.0],
    "single": [3.0, 0.0, 0.0, 0.0],
    "with-zeros": [4.0, 1.0, 0.0, 0.0],
    "tiny": [1.0, 1e-8, 1e-12, 0.0],
    "zero": [0.0, 0.0, 0.0, 0.0],
}
case_params = pytest.mark.parametrize("sigma", [torch.tensor(v, dtype=F64) for v in CASES.values()], ids=list(CASES))


def _tail_ref(sigma):
    return torch.stack([sigma[r:].square().sum() for r in range(len(sigma) + 1)])


def _entropy_rank_ref(sigma):
    total = float(sigma.sum())
    if total == 0:
        return 0.0
    h = -sum(p * math.log(p) for p in (float(x) / total for x in sigma) if p > 0)
    return math.exp(h)


# ----------------------------------------------------------------------------- tail energy, energy ratio


@case_params
def test_tail_energy_direct(sigma):
    got = tail_energy(sigma)
    assert got.shape == (5,)
    torch.testing.assert_close(got, _tail_ref(sigma), rtol=1e-12, atol=0)
    assert float(got[-1]) == 0.0


@case_params
def test_energy_ratio_direct(sigma):
    got = energy_ratio(sigma)
    total = sigma.square().sum()
    ref = (total - _tail_ref(sigma)) / total if total > 0 else torch.ones(5, dtype=F64)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(vals=spectra(min_d=1, max_d=16))
def test_energy_ratio_monotone_from_zero_to_one(vals):
    sigma = torch.tensor(vals, dtype=F64)
    ratio = energy_ratio(sigma)
    assert ratio.shape == (len(vals) + 1,)
    if float(sigma.sum()) == 0:
        assert bool((ratio == 1).all())
        return
    assert float(ratio[0]) == 0.0
    assert float(ratio[-1]) == pytest.approx(1.0, abs=1e-12)
    assert bool((ratio.diff() >= 0).all())
    tail = tail_energy(sigma)
    assert bool((tail.diff() <= 0).all())
    torch.testing.assert_close(tail, _tail_ref(sigma), rtol=1e-12, atol=1e-300)


def test_energy_ratio_all_ones_for_zero_spectrum_batched():
    sigma = torch.stack([torch.zeros(4, dtype=F64), torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=F64)])
    got = energy_ratio(sigma)
    torch.testing.assert_close(got[0], torch.ones(5, dtype=F64))
    torch.testing.assert_close(got[1], torch.tensor([0.0, 0.8, 1.0, 1.0, 1.0], dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_summaries_batched_over_heads_keep_dtype(dtype):
    sigma = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=dtype)
    assert tail_energy(sigma).shape == energy_ratio(sigma).shape == (2, 4)
    assert stable_rank(sigma).shape == effective_rank(sigma).shape == (2,)
    for out in (tail_energy(sigma), energy_ratio(sigma), stable_rank(sigma), effective_rank(sigma)):
        assert out.dtype == dtype
    torch.testing.assert_close(stable_rank(sigma), torch.tensor([10 / 9, 3.0], dtype=dtype))
    er0 = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))  # p = (3/4, 1/4, 0)
    torch.testing.assert_close(effective_rank(sigma), torch.tensor([er0, 3.0], dtype=dtype))


# ----------------------------------------------------------------------------- stable and effective rank


@case_params
def test_stable_rank_direct(sigma):
    top = float(sigma[0]) ** 2
    ref = float(sigma.square().sum()) / top if top > 0 else 0.0
    assert float(stable_rank(sigma)) == pytest.approx(ref, rel=1e-12)


@case_params
def test_effective_rank_direct(sigma):
    assert float(effective_rank(sigma)) == pytest.approx(_entropy_rank_ref(sigma), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("d", [1, 2, 7, 16], ids=lambda d: f"d{d}")
def test_flat_spectrum_ranks_equal_d(d):
    sigma = torch.full((d,), 0.7, dtype=F64)
    assert float(stable_rank(sigma)) == pytest.approx(d, rel=1e-12)
    assert float(effective_rank(sigma)) == pytest.approx(d, rel=1e-12)


@pytest.mark.parametrize("d", [1, 2, 7, 16], ids=lambda d: f"d{d}")
def test_single_nonzero_value_ranks_equal_one(d):
    sigma = torch.zeros(d, dtype=F64)
    sigma[0] = 4.2
    assert float(stable_rank(sigma)) == pytest.approx(1.0, rel=1e-12)
    assert float(effective_rank(sigma)) == pytest.approx(1.0, rel=1e-12)


def test_zero_spectrum_ranks_are_zero():
    sigma = torch.zeros(2, 5, dtype=F64)
    assert bool((stable_rank(sigma) == 0).all())
    assert bool((effective_rank(sigma) == 0).all())


@settings(max_examples=40, deadline=None)
@given(vals=spectra(min_d=1, max_d=16))
def test_ranks_between_one_and_d(vals):
    sigma = torch.tensor(vals, dtype=F64)
    d = len(vals)
    sr, er = float(stable_rank(sigma)), float(effective_rank(sigma))
    if vals[0] == 0:
        assert sr == er == 0.0
        return
    assert 1.0 - 1e-12 <= sr <= d + 1e-12
    assert 1.0 - 1e-12 <= er <= d + 1e-12
    assert sr == pytest.approx(sum(v * v for v in vals) / vals[0] ** 2, rel=1e-12)
    assert er == pytest.approx(_entropy_rank_ref(sigma), rel=1e-10)


# ----------------------------------------------------------------------------- singular values from Grams


@pytest.mark.parametrize("shape", [(3, 40, 8), (2, 2, 16, 4), (64, 16)], ids=str)
def test_core_singular_values_match_scores(shape):
    q, k = random_qk(*shape[:-2], length=shape[-2], d=shape[-1], seed=len(shape))
    got = core_singular_values(gram(q), gram(k))
    ref = torch.linalg.svdvals(q @ k.transpose(-2, -1))[..., : shape[-1]]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_core_singular_values_prescribed_spectrum():
    s = [6.0, 4.0, 4.0, 1.0, 0.25]
    q, k = qk_with_spectrum(s, 24, gen(3))  # no zero in s: both Grams are nonsingular
    torch.testing.assert_close(core_singular_values(gram(q), gram(k)), torch.tensor(s, dtype=F64))


def test_core_singular_values_ridge_moves_values_up_boundedly():
    q, k = random_qk(2, length=30, d=6, seed=4)
    s0 = core_singular_values(gram(q), gram(k))
    s1 = core_singular_values(gram(q), gram(k), ridge=1e-2)
    assert bool((s1 >= s0 - 1e-12).all()) and not torch.allclose(s0, s1)


def test_core_singular_values_float32():
    q, k = random_qk(3, length=40, d=8, seed=5, dtype=torch.float32)
    got = core_singular_values(gram(q), gram(k))
    assert got.dtype == torch.float32
    ref = torch.linalg.svdvals(q.double() @ k.double().transpose(-2, -1))[..., :8]
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-3)
