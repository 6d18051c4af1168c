"""A static rank per layer, searched against the loss at a stated budget: the baseline a learned rank policy has
to beat (in the spirit of RaNA's allocation and Palu's rank search).

1. :func:`layer_sensitivity` measures, on calibration windows, the language-model loss when one layer alone runs
   at a lower rank (every other layer at r_max): an exact, additive-in-layers model of what each rank costs.
2. :func:`allocate` picks one rank per layer minimising the summed loss increases under a score-FLOPs budget,
   exactly (a multiple-choice knapsack solved by dynamic programming over whole buckets).

>>> sens = layer_sensitivity(model, layers, calib_windows, ranks=[16, 32, 48, 64])
>>> table = static_allocation(sens, budget=0.4)      # one rank per layer; TableController(table) runs it

3. :func:`output_fisher` and :func:`fisher_errors` estimate instead, from one forward pass per rank, the KL that
   each (layer, segment) cell's output error costs (a second-order estimate from each layer's output Fisher), and
   :func:`cell_allocation` picks one rank per cell under the budget: a static table from the same signal that the
   "fisher" reward gives a learned policy, so that the policy has to beat it with what it reads from the input.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drrl.attention.drrl.sensitivity import measuring_output_fisher
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


def output_fisher(model, layers, windows, *, seed: int = 0, device=None, on_step=None) -> int:
    """Set each drrl layer's ``output_fisher`` (:mod:`drrl.attention.drrl.sensitivity`) from one backward pass per
    window of ``windows`` (1-D id tensors; a window of n ids gives n − 1 positions): every layer at r_max, labels
    drawn once per position from the model's own next-token distribution (a seeded Monte-Carlo Fisher), the summed
    loss differentiated with respect to the attention outputs (the model's weights get no gradient). Returns the
    number of forward-backward passes (each costs about three forwards). Leaves the layers at r_max."""
    device = device or next(model.parameters()).device
    attach_controller(layers, TableController([[layers[0].buckets[-1].item()]] * len(layers)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    embed = model.get_input_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # gradients for the attention outputs only: no weight gradient is computed or kept
        p.requires_grad_(False)
    try:
        _fisher_passes(model, layers, windows, embed, gen, device, on_step)
    finally:
        for p in params:
            p.requires_grad_(True)
    return len(windows)


def _fisher_passes(model, layers, windows, embed, gen, device, on_step) -> None:
    with measuring_output_fisher(layers), torch.enable_grad():
        for w in windows:
            ids = w[None, :-1].to(device)
            x = embed(ids).detach().requires_grad_(True)  # the graph starts here: no weight needs a gradient
            logits = model(inputs_embeds=x, use_cache=False).logits.float()[0]
            with torch.no_grad():
                labels = torch.multinomial(F.softmax(logits, -1).cpu(), 1, generator=gen).squeeze(-1).to(device)
            F.cross_entropy(logits, labels, reduction="sum").backward()
            if on_step is not None:
                on_step()


class ErrorProbe(TableController):
    """A rank table (:class:`~drrl.controllers.TableController`) that keeps the Fisher KL estimate of each decided
    (layer, segment) cell from the layers' feedback (the layers need an ``output_fisher``, :func:`output_fisher`).

    >>> probe = ErrorProbe([[32]] * n_layers); attach_controller(layers, probe); model(ids)
    >>> probe.estimate()      # the model's estimated KL per token: Σ over layers of the mean over segments
    """

    def __init__(self, table):
        super().__init__(table)
        self.errors: dict = defaultdict(list)  # (layer, segment) -> estimates, one per forward pass
        self.head_errors: dict = defaultdict(list)  # (layer, segment) -> (H_kv,) estimates per key/value head
        self.pairs: dict = {}  # segment -> its query-key pairs
        self._decided: tuple = (-1, [])

    @property
    def wants_feedback(self) -> bool:
        return True

    def forward(self, stats):
        self._decided = (stats.layer, stats.decide.nonzero().flatten().tolist())
        return super().forward(stats)

    def observe(self, feedback) -> None:  # called right after this layer's forward (same decision order)
        layer, segs = self._decided
        if len(feedback.error) != len(segs):
            raise ValueError("the error probe needs each layer's output Fisher: run output_fisher(model, layers, ...)")
        for s, e, h, p in zip(segs, feedback.error, feedback.head_error, feedback.pairs, strict=True):
            self.errors[(layer, s)].append(float(e))
            self.head_errors[(layer, s)].append(h.tolist())
            self.pairs[s] = p

    def estimate(self) -> float:
        """Estimated KL per token of the model (nats): each layer's error averaged over its segments (equal lengths)
        and forward passes, summed over layers; undecided segments count as 0."""
        n_seg = max((s for _, s in self.errors), default=-1) + 1
        layers = {i for i, _ in self.errors}
        return sum(sum(sum(e) / len(e) for s in range(n_seg) if (e := self.errors.get((i, s)))) / n_seg
                   for i in layers)  # fmt: skip


@dataclass
class CellErrors:
    """Estimated KL per token (nats) of cell (layer ``l``, segment ``s``) at ``ranks[j]``: ``error[l][s][j]``
    (0 at r_max, the last rank); ``pairs[s]`` is segment s's query-key pairs (its weight in the score FLOPs);
    ``head_error[l][s][h][j]`` is the part of it that key/value head h's group contributes (every head of the
    probe at ``ranks[j]``; the estimate is additive over heads, so the cell's error is their sum)."""

    ranks: list[int]
    error: list[list[list[float]]]
    pairs: list[int]
    forwards: int
    head_error: list[list[list[list[float]]]] | None = None  # [l][s][kv head][j]: the same split per KV head


def fisher_errors(model, layers, windows, ranks: list[int], *, device=None, on_step=None) -> CellErrors:
    """Per (layer, segment) cell, the KL its output error costs at each rank of ``ranks`` (buckets; r_max is
    added), averaged over ``windows`` (1-D id tensors of one length): one forward pass per window and rank below
    r_max with every layer at that rank, each layer measured against its own full-rank branch on its (perturbed)
    input. The layers need an ``output_fisher`` (:func:`output_fisher`). Leaves the layers at r_max."""
    buckets = layers[0].buckets.tolist()
    top = buckets[-1]
    ranks = sorted({int(r) for r in ranks} | {top})
    if any(r not in buckets for r in ranks):
        raise ValueError(f"ranks must be buckets {buckets}, got {ranks}")
    if any(m.output_fisher is None for m in layers):
        raise ValueError("fisher_errors needs each layer's output Fisher: run output_fisher(model, layers, windows)")
    device = device or next(model.parameters()).device
    per_rank = {}
    for r in ranks[:-1]:
        probe = ErrorProbe([[r]] * len(layers))
        attach_controller(layers, probe)
        with torch.no_grad():
            for w in windows:
                model(input_ids=w[None, :-1].to(device), use_cache=False)
                if on_step is not None:
                    on_step()
        per_rank[r] = probe
    for m in layers:
        m.pop_stats()
    attach_controller(layers, TableController([[top]] * len(layers)))
    n_seg = max((s for p in per_rank.values() for _, s in p.errors), default=-1) + 1
    pairs = next(iter(per_rank.values())).pairs if per_rank else {}
    # a cell no probe decided (no prefix to plan from) always runs at r_max: its other ranks are not options
    error = [
        [[sum(e) / len(e) if (e := p.errors.get((i, s))) else math.inf for p in per_rank.values()] + [0.0]
         for s in range(n_seg)]
        for i in range(len(layers))
    ]  # fmt: skip
    n_kv = layers[0].n_kv_head

    def head_mean(p, i, s, h):
        e = p.head_errors.get((i, s))
        return sum(x[h] for x in e) / len(e) if e else math.inf

    head = [
        [[[head_mean(p, i, s, h) for p in per_rank.values()] + [0.0] for h in range(n_kv)] for s in range(n_seg)]
        for i in range(len(layers))
    ]
    return CellErrors(ranks, error, [pairs.get(s, 0) for s in range(n_seg)], len(windows) * (len(ranks) - 1), head)


def cell_allocation(errors: CellErrors, budget: float, steps: int = 60, *, per_head: bool = False) -> list[list]:
    """One rank per (layer, segment) cell (a :class:`~drrl.controllers.TableController` table) with a score-FLOPs
    cut of at least ``budget`` and the least summed estimated KL: each cell takes the rank minimising
    error + λ·pairs·rank, with the smallest λ (bisection on log λ) whose table meets the budget (the Lagrangian
    relaxation of the multiple-choice knapsack: exact on the lower convex hull of each cell's options). With
    ``per_head`` the cells are (layer, segment, key/value head), each weighing 1/H_kv of its segment, and every
    table entry is a list of per-head ranks."""
    if not 0 <= budget < 1:
        raise ValueError(f"budget must be a score-FLOPs cut in [0, 1), got {budget}")
    if per_head and errors.head_error is None:
        raise ValueError("per-head allocation needs per-head errors: CellErrors.head_error (from fisher_errors)")
    ranks, top = errors.ranks, errors.ranks[-1]
    # flat cells in table order: (layer, segment, errors at each rank, weight in the score FLOPs)
    if per_head:
        cells = [(i, s, e, p / len(hs)) for i, row in enumerate(errors.head_error)
                 for s, (hs, p) in enumerate(zip(row, errors.pairs, strict=True)) for e in hs]  # fmt: skip
    else:
        cells = [(i, s, e, p) for i, row in enumerate(errors.error)
                 for s, (e, p) in enumerate(zip(row, errors.pairs, strict=True))]  # fmt: skip
    total = sum(errors.pairs) * top * len(errors.error)

    def picks(lam: float) -> list[int]:
        return [min(ranks, key=lambda r, e=e, w=w: (e[ranks.index(r)] + lam * w * r / total, r)) for *_, e, w in cells]

    def fraction(rs: list[int]) -> float:
        return sum(c[3] * r for c, r in zip(cells, rs, strict=True)) / total

    lo, hi = 1e-9, 1e9
    if fraction(picks(hi)) > 1 - budget + 1e-12:
        raise ValueError(f"no table meets a {budget:.0%} cut with ranks {ranks}")
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if fraction(picks(mid)) <= 1 - budget + 1e-12:
            hi = mid
        else:
            lo = mid
    rs = picks(hi)
    log.info("cell allocation at budget %.2f%s: executed fraction %.4f", budget, " per head" * per_head, fraction(rs))
    out = [[[] if per_head else 0 for _ in row] for row in errors.error]
    for (i, s, _, _), r in zip(cells, rs, strict=True):
        if per_head:
            out[i][s].append(r)
        else:
            out[i][s] = r
    return out


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


__all__ = [
    "CellErrors",
    "ErrorProbe",
    "Sensitivity",
    "allocate",
    "cell_allocation",
    "fisher_errors",
    "layer_sensitivity",
    "output_fisher",
    "static_allocation",
    "table_fraction",
]
