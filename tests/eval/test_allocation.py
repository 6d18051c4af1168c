"""The static per-layer allocation: an exact knapsack against brute force, and the sensitivity search on a tiny
GPT whose layers differ."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.attention import calibrating
from drrl.controllers import TableController, attach_controller
from drrl.eval.allocation import (
    CellErrors,
    allocate,
    cell_allocation,
    fisher_errors,
    layer_sensitivity,
    output_fisher,
    static_allocation,
    table_fraction,
)
from drrl.models import GPT, GPTConfig


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(0, 4), st.floats(-1, 5)), min_size=1, max_size=3), min_size=1, max_size=4),
    st.integers(0, 12),
)
def test_allocate_is_the_exact_knapsack_optimum(items, capacity):
    costs = [[c for c, _ in it] for it in items]
    losses = [[v for _, v in it] for it in items]
    feasible = [
        combo
        for combo in itertools.product(*(range(len(c)) for c in costs))
        if sum(costs[i][j] for i, j in enumerate(combo)) <= capacity
    ]
    if not feasible:
        with pytest.raises(ValueError, match="no allocation fits"):
            allocate(costs, losses, capacity)
        return
    got = allocate(costs, losses, capacity)
    assert sum(costs[i][j] for i, j in enumerate(got)) <= capacity
    best = min(sum(losses[i][j] for i, j in enumerate(combo)) for combo in feasible)
    assert sum(losses[i][j] for i, j in enumerate(got)) == pytest.approx(best, abs=1e-9)


def test_sensitivity_finds_the_layer_that_needs_rank():
    """A GPT whose layer 0's attention output is switched off (any rank gives the same loss) and whose layer 1
    attends sharply with a large output: at a budget, the search cuts layer 0 to the smallest bucket and gives layer 1 the rank."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=32, context=64, vocab_size=64, attention="drrl",
                    attention_kwargs={"controller": "fixed", "rank": 16, "basis": "calibrated", "segment": 16,
                                      "bucket": 4})  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.blocks[0].attn.proj.weight.zero_()
        model.blocks[1].attn.qkv.weight[:64] *= 8  # sharp scores: their rank matters
        model.blocks[1].attn.proj.weight *= 10
    layers = [b.attn for b in model.blocks]
    windows = [torch.randint(0, 64, (65,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with calibrating(model):
        for w in windows:
            model(w[None, :-1])
    sens = layer_sensitivity(model, layers, windows[:2], ranks=[4, 8, 12, 16])
    assert sens.forwards == 1 + 2 * 3 and len(sens.loss) == 2 and sens.loss[0][-1] == sens.base
    cut0 = sens.loss[0][0] - sens.base
    cut1 = sens.loss[1][0] - sens.base
    assert cut0 == 0 and cut1 > 1e-3  # layer 1 pays for rank 4, layer 0 nothing
    table = static_allocation(sens, budget=0.375)  # 10 of 16 on average: (4, 16)
    assert table_fraction(table, 16) <= 0.625
    assert table[0] == [4] and table[1][0] >= 12  # (layer 1 happens to lose a little less at 12 than at 16)
    attach_controller(layers, TableController(table))
    model(windows[2][None, :-1])
    assert [m.last_plan.ranks[-1] for m in layers] == [table[0][0], table[1][0]]


def test_bad_budgets_and_ranks_are_clear_errors():
    from drrl.eval.allocation import Sensitivity

    with pytest.raises(ValueError, match="budget"):
        static_allocation(Sensitivity([8, 16], [[0.0, 0.0]], 0.0, 1), budget=1.0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=32, context=16, vocab_size=16, attention="drrl",
                          attention_kwargs={"controller": "fixed", "rank": 16, "bucket": 8}))  # fmt: skip
    with pytest.raises(ValueError, match="ending at r_max"):
        layer_sensitivity(model, [model.blocks[0].attn], [torch.arange(9)], ranks=[8])


def _cost_and_error(errs: CellErrors, table):
    cost = sum(p * r for row in table for p, r in zip(errs.pairs, row, strict=True))
    err = sum(cell[errs.ranks.index(r)] for erow, row in zip(errs.error, table, strict=True)
              for cell, r in zip(erow, row, strict=True))  # fmt: skip
    return cost, err


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.lists(st.floats(0, 3), min_size=2, max_size=2), min_size=2, max_size=2), min_size=1,
             max_size=3),
    st.lists(st.integers(1, 9), min_size=2, max_size=2),
    st.floats(0, 0.6),
)  # fmt: skip
def test_cell_allocation_meets_the_budget_and_no_table_as_cheap_has_less_error(errors, pairs, budget):
    """Everett's theorem for the Lagrangian pick: any table costing no more than the returned one has at least
    its summed error (checked by brute force over every table)."""
    ranks = [2, 4, 8]
    errs = CellErrors(ranks, [[[*cell, 0.0] for cell in row] for row in errors], pairs, 1)
    table = cell_allocation(errs, budget)
    total = sum(pairs) * 8 * len(errors)
    cost, err = _cost_and_error(errs, table)
    assert cost <= (1 - budget) * total + 1e-9
    cells = [(i, s) for i in range(len(errors)) for s in range(2)]
    for combo in itertools.product(ranks, repeat=len(cells)):
        t = [[0, 0] for _ in errors]
        for (i, s), r in zip(cells, combo, strict=True):
            t[i][s] = r
        c, e = _cost_and_error(errs, t)
        if c <= cost:
            assert e >= err - 1e-9


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.lists(st.floats(0, 3), min_size=2, max_size=2), min_size=2, max_size=2), min_size=2,
             max_size=2),
    st.lists(st.integers(1, 9), min_size=2, max_size=2),
    st.floats(0, 0.6),
)  # fmt: skip
def test_per_head_cell_allocation_meets_the_budget_and_no_table_as_cheap_has_less_error(heads, pairs, budget):
    """The same for cells (segment, key/value head) of one layer, each head weighing half of its segment."""
    ranks = [2, 4, 8]
    head_error = [[[[*h, 0.0] for h in seg] for seg in heads]]  # [layer][segment][head][rank]
    error = [[[sum(h[j] for h in seg) for j in range(3)] for seg in head_error[0]]]
    errs = CellErrors(ranks, error, pairs, 1, head_error)
    table = cell_allocation(errs, budget, per_head=True)

    def cost_err(t):
        cost = sum(p * r / 2 for p, e in zip(pairs, t[0], strict=True) for r in e)
        err = sum(head_error[0][s][h][ranks.index(r)] for s, e in enumerate(t[0]) for h, r in enumerate(e))
        return cost, err

    cost, err = cost_err(table)
    assert cost <= (1 - budget) * sum(pairs) * 8 + 1e-9
    for combo in itertools.product(ranks, repeat=4):
        c, e = cost_err([[list(combo[:2]), list(combo[2:])]])
        if c <= cost:
            assert e >= err - 1e-9
    with pytest.raises(ValueError, match="per-head errors"):
        cell_allocation(CellErrors(ranks, error, pairs, 1), budget, per_head=True)


def test_fisher_errors_of_a_tiny_model_and_the_table_they_give():
    from drrl.integrations.hf import apply_dynamic_rank
    from tests.integrations.test_hf import tiny_llama

    model = tiny_llama().float()
    ids = torch.randint(0, 100, (3, 49), generator=torch.Generator().manual_seed(1))
    layers = apply_dynamic_rank(model, controller="fixed", rank=16, segment=16, bucket=4)
    with calibrating(model):
        model(input_ids=ids[:, :-1])
    with pytest.raises(ValueError, match="output_fisher"):
        fisher_errors(model, layers, list(ids[:1]), [4, 8])
    output_fisher(model, layers, list(ids[:2]))
    errs = fisher_errors(model, layers, list(ids[1:]), [4, 8])
    assert errs.ranks == [4, 8, 16] and errs.forwards == 2 * 2 and len(errs.pairs) == 3
    assert errs.pairs == [16 * 17 // 2, 16 * 16 + 16 * 17 // 2, 32 * 16 + 16 * 17 // 2]
    assert len(errs.error) == 2 and all(len(row) == 3 and all(len(c) == 3 for c in row) for row in errs.error)
    assert all(c[-1] == 0 and min(c) >= 0 and c[0] > 0 for row in errs.error for c in row)
    assert all(m.controller.table == [[16]] * 2 for m in layers)  # left at r_max
    table = cell_allocation(errs, 0.4)
    attach_controller(layers, TableController(table))
    for m in layers:
        m.pop_stats()
    with torch.no_grad():
        model(input_ids=ids[:1, :-1])
    fl = [m.pop_stats(with_flops=True)["flops"] for m in layers]
    assert sum(f["scores"] for f in fl) / sum(f["full_scores"] for f in fl) <= 0.6 + 1e-9  # it runs at its cut
    # per key/value head: the split sums to the cell's error, and a per-head table runs at its cut too
    assert len(errs.head_error) == 2 and all(len(c) == 2 for row in errs.head_error for c in row)  # 2 KV heads
    for erow, hrow in zip(errs.error, errs.head_error, strict=True):
        for cell, heads in zip(erow, hrow, strict=True):
            assert cell == pytest.approx([sum(h[j] for h in heads) for j in range(3)], rel=1e-5)
    table = cell_allocation(errs, 0.4, per_head=True)
    assert all(len(e) == 2 for row in table for e in row)
    attach_controller(layers, TableController(table))
    with torch.no_grad():
        model(input_ids=ids[:1, :-1])
    fl = [m.pop_stats(with_flops=True)["flops"] for m in layers]
    assert sum(f["scores"] for f in fl) / sum(f["full_scores"] for f in fl) <= 0.6 + 1e-9
    assert any(len(set(h)) > 1 for m in layers for h in m.last_plan.head_ranks)  # the heads differ somewhere
