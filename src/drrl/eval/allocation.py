"""A static rank per layer, searched against the loss at a stated budget: the baseline a learned rank policy has
to beat (in the spirit of RaNA's allocation and Palu's rank search).

1. :func:`layer_sensitivity` measures, on calibration windows, the language-model loss when one layer alone runs
   at a lower rank (every other layer at r_max): an exact, additive-in-layers model of what each rank costs.
2. :func:`allocate` picks one rank per layer minimising the summed loss increases under a score-FLOPs budget,
   exactly (a multiple-choice knapsack solved by dynamic programming over whole buckets).

>>> sens = layer_sensitivity(model, layers, calib_windows, ranks=[16, 32, 48, 64])
>>> table = static_allocation(sens, budget=0.4)      # one rank per layer; TableController(table) runs it
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from drrl.controllers import TableController, attach_controller
from drrl.eval.perplexity import evaluate_lm

log = logging.getLogger(__name__)


@dataclass
class Sensitivity:
    """Mean next-token loss of calibration windows with layer ``l`` alone at ``ranks[j]``: ``loss[l][j]``;
    ``base`` with every layer at r_max = ``ranks[-1]``."""

    ranks: list[int]
    loss: list[list[float]]
    base: float
    forwards: int  # model forward passes the search took (its cost)


def layer_sensitivity(model, layers, windows, ranks: list[int], *, device=None, on_step=None) -> Sensitivity:
    """Loss of ``windows`` (a list of 1-D id tensors) with each layer alone at each rank of ``ranks`` (buckets,
    ascending; the last is r_max, every other layer stays there). ``layers`` are the model's calibrated drrl
    layers in order; ``on_step()`` is called after each evaluation (progress). Leaves the layers at r_max."""
    ranks = sorted(int(r) for r in ranks)
    buckets = layers[0].buckets.tolist()
    bad = [r for r in ranks if r not in buckets]
    if bad or ranks[-1] != buckets[-1]:
        raise ValueError(f"sensitivity ranks must be buckets {buckets} ending at r_max, got {ranks}")
    device = device or next(model.parameters()).device
    n, top = len(layers), ranks[-1]

    def loss(table) -> float:
        attach_controller(layers, TableController(table))
        res = evaluate_lm(model, windows, batch_size=1, device=device, set_eval=False)
        if on_step is not None:
            on_step()
        return res["loss"]

    base = loss([[top]] * n)
    grid = []
    for i in range(n):
        row = []
        for r in ranks[:-1]:
            table = [[top]] * n
            table[i] = [r]
            row.append(loss(table))
        grid.append([*row, base])
    attach_controller(layers, TableController([[top]] * n))
    return Sensitivity(ranks, grid, base, 1 + n * (len(ranks) - 1))


def allocate(costs: list[list[int]], losses: list[list[float]], capacity: int) -> list[int]:
    """Exact multiple-choice knapsack: one option j per item i (cost ``costs[i][j]`` ≥ 0, integer) minimising
    Σ ``losses[i][j]`` with Σ costs ≤ ``capacity``; returns the option index per item. Raises ValueError when even
    the cheapest options do not fit."""
    if sum(min(c) for c in costs) > capacity:
        raise ValueError(f"no allocation fits: the cheapest options cost {sum(min(c) for c in costs)} > {capacity}")
    inf = math.inf
    best = [0.0] + [inf] * capacity  # best[c]: least loss of the items so far at total cost exactly c
    choice: list[list[int]] = []
    for cost, lss in zip(costs, losses, strict=True):
        nxt, pick = [inf] * (capacity + 1), [-1] * (capacity + 1)
        for c, b in enumerate(best):
            if b == inf:
                continue
            for j, (cj, lj) in enumerate(zip(cost, lss, strict=True)):
                if c + cj <= capacity and b + lj < nxt[c + cj]:
                    nxt[c + cj], pick[c + cj] = b + lj, j
        best = nxt
        choice.append(pick)
    c = min(range(capacity + 1), key=lambda k: best[k])
    out = []
    for i in range(len(costs) - 1, -1, -1):  # walk back
        j = choice[i][c]
        out.append(j)
        c -= costs[i][j]
    return out[::-1]


def static_allocation(sens: Sensitivity, budget: float, bucket: int | None = None) -> list[list[int]]:
    """One rank per layer (a :class:`~drrl.controllers.TableController` table) whose mean rank is at most
    (1 − ``budget``)·r_max, i.e. a score-FLOPs cut of at least ``budget`` (every layer has the same shape), with
    the least summed loss increase of :func:`layer_sensitivity`. Costs are counted in units of ``bucket`` (default:
    the greatest common divisor of the ranks)."""
    if not 0 <= budget < 1:
        raise ValueError(f"budget must be a score-FLOPs cut in [0, 1), got {budget}")
    unit = bucket or math.gcd(*sens.ranks)
    n, top = len(sens.loss), sens.ranks[-1]
    capacity = math.floor((1 - budget) * n * top / unit + 1e-9)
    costs = [[r // unit for r in sens.ranks]] * n
    picks = allocate(costs, sens.loss, capacity)
    table = [[sens.ranks[j]] for j in picks]
    log.info("static allocation at budget %.2f: ranks %s", budget, [t[0] for t in table])
    return table


def table_fraction(table: list[list[int]], r_max: int) -> float:
    """Score-FLOPs fraction of a per-layer table (layers of equal shape, one rank per layer)."""
    return sum(row[0] for row in table) / (len(table) * r_max)


__all__ = ["Sensitivity", "allocate", "layer_sensitivity", "static_allocation", "table_fraction"]
