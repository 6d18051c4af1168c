"""The paired bootstrap of a perplexity ratio over windows, against a plain-Python resampling reference."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.eval.bootstrap import ppl_ratio_ci


def naive_ci(a, b, n, level, resamples, seed):
    """The same resampling written as loops (the draws are numpy's, in the same order)."""
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    ratios = []
    for row in idx:
        da = sum(a[i] for i in row)
        db = sum(b[i] for i in row)
        nt = sum(n[i] for i in row)
        ratios.append(math.exp((da - db) / nt))
    return np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])


def test_matches_a_loop_reference_and_the_point_ratio_of_perplexities():
    rng = np.random.default_rng(3)
    n = rng.integers(50, 200, 7)
    b = n * rng.uniform(2.5, 4.0, 7)
    a = b + n * rng.normal(0.03, 0.02, 7)
    r = ppl_ratio_ci(a, b, n, level=0.9, resamples=300, seed=5)
    ppl_a, ppl_b = math.exp(a.sum() / n.sum()), math.exp(b.sum() / n.sum())
    assert r.ratio == pytest.approx(ppl_a / ppl_b, rel=1e-12)
    lo, hi = naive_ci(a, b, n, 0.9, 300, 5)
    assert (r.low, r.high) == pytest.approx((lo, hi), rel=1e-12)
    assert r.low <= r.ratio <= r.high and r.windows == 7 and r.resamples == 300


def test_identical_methods_give_a_degenerate_interval_at_one():
    a = [120.0, 80.0, 95.5]
    r = ppl_ratio_ci(a, a, [40, 30, 35])
    assert (r.ratio, r.low, r.high) == (1.0, 1.0, 1.0)


def test_a_constant_per_token_gap_gives_that_ratio_on_every_resample():
    n = np.array([10, 20, 30])
    b = n * 3.0
    r = ppl_ratio_ci(b + 0.1 * n, b, n)
    assert r.low == pytest.approx(math.exp(0.1)) and r.high == pytest.approx(math.exp(0.1))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 500), st.floats(0, 500), st.integers(1, 300)), min_size=1, max_size=12),
       st.floats(0.5, 0.99), st.integers(0, 2**31 - 1))  # fmt: skip
def test_the_interval_holds_the_ratio_and_is_deterministic(rows, level, seed):
    a, b, n = zip(*rows, strict=True)
    r = ppl_ratio_ci(a, b, n, level=level, resamples=200, seed=seed)
    tol = 1e-9 * r.ratio
    assert r.low <= r.high and math.isfinite(r.low)
    # every resample's ratio is a token-weighted mean of per-window gaps, so the interval lies within the
    # per-window extremes
    per_window = [math.exp((x - y) / t) for x, y, t in rows]
    assert min(per_window) - tol <= r.low and r.high <= max(per_window) + tol
    assert r == ppl_ratio_ci(a, b, n, level=level, resamples=200, seed=seed)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (([1.0], [1.0, 2.0], [1, 1]), {}, "one summed NLL per window"),
        (([], [], []), {}, "one summed NLL per window"),
        (([1.0], [1.0], [0]), {}, "at least one scored token"),
        (([1.0], [1.0], [1]), {"level": 1.0}, "level must be in"),
    ],
)
def test_bad_input_names_the_problem(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ppl_ratio_ci(*args, **kwargs)
