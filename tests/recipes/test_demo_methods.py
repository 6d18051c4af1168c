"""The demo's budget tuning: the bisection every knob (cost shift, energy threshold) goes through."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.recipes.demo_methods import nearest_buckets, smallest_within


@settings(max_examples=80, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.05, 0.95), st.integers(1, 12))
def test_bisection_lands_on_the_feasible_side_within_its_resolution(threshold, target, steps):
    # a non-increasing fraction: above the target left of the threshold, at or below it from the threshold on
    calls = []

    def fraction(x):
        calls.append(x)
        return target + 0.1 if x < threshold else target - 0.1 * x

    x, f = smallest_within(fraction, 0.0, 1.0, fraction(1.0), target, steps)
    assert f == fraction(x) and f <= target  # feasible, and the fraction returned is x's
    assert threshold <= x <= threshold + 2.0**-steps + 1e-12  # within one halving of the smallest feasible knob
    assert len(calls) == 2 + steps


def test_nearest_buckets_rounds_each_cell_up_on_a_tie():
    assert nearest_buckets([[12.0, 11.9, 20.0], [8.0]], [8, 16, 32]) == [[16, 8, 16], [8]]
    with pytest.raises(ValueError):
        nearest_buckets([[1.0]], [])
