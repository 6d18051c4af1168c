"""The demo's budget tuning: the bisection every knob (cost shift, energy threshold) goes through."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.recipes import demo_methods
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


@pytest.mark.parametrize("f0", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("budget", [0.25, 0.4, 0.6])
def test_the_cost_shift_spends_the_budget_from_either_side(monkeypatch, f0, budget):
    # a policy whose executed fraction falls with the shift in steps of 1/240 (30 layers x 8 segments), from f0
    class Ctrl:
        cost_shift = 0.0

    ctrl = Ctrl()

    def executed(model, layers, windows):
        return min(max(round((f0 - 0.2 * ctrl.cost_shift) * 240) / 240, 0.125), 1.0)

    monkeypatch.setattr(demo_methods, "executed_fraction", executed)
    shift, frac = demo_methods.meet_budget(ctrl, None, None, None, budget, steps=12)
    assert ctrl.cost_shift == shift and frac == executed(None, None, None)
    # within the budget and less than two decisions' worth below it: a cheap policy is raised, not left below
    assert 1 - budget - 2 / 240 <= frac <= 1 - budget
    assert (shift < 0) == (f0 < 1 - budget)


def test_the_cost_shift_gives_up_at_its_limits(monkeypatch):
    class Ctrl:
        cost_shift = 0.0

    monkeypatch.setattr(demo_methods, "executed_fraction", lambda *a: 0.9)  # the guardrail forces high ranks
    assert demo_methods.meet_budget(Ctrl(), None, None, None, 0.4) == (2.0**12, 0.9)
    monkeypatch.setattr(demo_methods, "executed_fraction", lambda *a: 0.2)  # r_max everywhere still fits
    shift, frac = demo_methods.meet_budget(Ctrl(), None, None, None, 0.4)
    assert shift <= -(2.0**12) and frac == 0.2
