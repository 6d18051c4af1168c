"""Rank controllers that learn nothing: a fixed rank, a random rank, and the energy-threshold rule."""

from __future__ import annotations

import math

import torch

from drrl.controllers.base import RankController, SegmentStats, register_controller


@register_controller("fixed")
class FixedController(RankController):
    """The same rank for every segment (the "fixed low-rank" baseline)."""

    needs_stats = False

    def __init__(self, rank: int):
        super().__init__()
        self.rank = int(rank)

    @classmethod
    def from_options(cls, options: dict, buckets: list[int]) -> FixedController:
        rank = options.get("rank")
        if rank is None or rank not in buckets:
            raise ValueError(f"controller 'fixed' needs rank= one of the buckets {buckets}, got {rank}")
        return cls(rank=rank)

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        hit = (stats.buckets == self.rank).nonzero()
        if len(hit) == 0:
            raise ValueError(f"fixed rank {self.rank} is not a bucket; buckets are {stats.buckets.tolist()}")
        return hit[0, 0].expand(stats.energy.shape[0]).clone()


@register_controller("random")
class RandomController(RankController):
    """A random rank per segment, reproducible from (seed, layer, segment, step): a uniformly random allowed bucket,
    or, with ``mean_rank``, a rank whose expectation is ``mean_rank`` (a random baseline at a stated budget).

    With ``mean_rank`` = ρ, each segment draws u uniformly from the widest interval [ρ − w, ρ + w] inside the
    buckets' range, then rounds it to the bucket below or above with the probabilities that keep E[rank] = u
    (randomised rounding), so E[rank] = ρ whatever the spacing of the buckets. The guardrail may still raise a
    draw (the layer overrides unsafe buckets)."""

    needs_stats = False

    def __init__(self, seed: int = 0, mean_rank: float | None = None):
        super().__init__()
        self.seed = int(seed)
        if mean_rank is not None and not (math.isfinite(mean_rank) and mean_rank > 0):
            raise ValueError(f"random controller mean_rank must be a positive number, got {mean_rank}")
        self.mean_rank = None if mean_rank is None else float(mean_rank)

    @classmethod
    def from_options(cls, options: dict, buckets: list[int]) -> RandomController:
        mean_rank = options.get("mean_rank")
        if mean_rank is not None and not buckets[0] <= mean_rank <= buckets[-1]:
            raise ValueError(f"random controller mean_rank must lie within the buckets {buckets[0]}..{buckets[-1]}, "
                             f"got {mean_rank}")  # fmt: skip
        return cls(seed=options.get("seed", 0), mean_rank=mean_rank)

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        out, allowed = [], stats.allowed.cpu()
        buckets = stats.buckets.cpu().double()
        for s in range(stats.energy.shape[0]):
            g = torch.Generator().manual_seed(hash((self.seed, stats.layer, s, stats.step)) & (2**62 - 1))
            if self.mean_rank is not None:
                out.append(self._around_mean(buckets, g))
                continue
            choices = allowed[s].nonzero().flatten()
            if len(choices) == 0:
                choices = torch.tensor([len(stats.buckets) - 1])
            out.append(choices[torch.randint(len(choices), (1,), generator=g)].item())
        return torch.tensor(out, dtype=torch.long)

    def _around_mean(self, buckets: torch.Tensor, g: torch.Generator) -> int:
        lo, hi = buckets[0].item(), buckets[-1].item()
        rho = min(max(self.mean_rank, lo), hi)
        w = min(rho - lo, hi - rho)
        u = rho + w * (2 * torch.rand((), generator=g, dtype=torch.float64).item() - 1)
        j = int(torch.searchsorted(buckets, torch.tensor(u, dtype=torch.float64), right=True)) - 1  # bucket <= u
        j = min(max(j, 0), len(buckets) - 1)
        if j == len(buckets) - 1:
            return j
        p_up = (u - buckets[j].item()) / (buckets[j + 1] - buckets[j]).item()
        return j + int(torch.rand((), generator=g, dtype=torch.float64).item() < p_up)


@register_controller("energy")
class EnergyController(RankController):
    """The energy-threshold rule: the smallest bucket whose kept energy is at least ``tau``."""

    def __init__(self, tau: float = 0.95):
        super().__init__()
        if not 0 < tau <= 1:
            raise ValueError(f"energy threshold tau must be in (0, 1], got {tau}")
        self.tau = float(tau)

    @classmethod
    def from_options(cls, options: dict, buckets: list[int]) -> EnergyController:
        return cls(tau=options.get("tau", 0.95))

    def flops_per_decision(self, n_buckets: int) -> int:
        return 2 * n_buckets  # compare, then select the first qualifying bucket

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        ok = (stats.energy >= self.tau) & stats.allowed
        ok[:, -1] = True  # r_max always qualifies
        return ok.float().argmax(-1).cpu()  # first True


@register_controller("table")
class TableController(RankController):
    """A fixed rank per (layer, segment index): ``table[layer][segment]`` (a segment past the end of its row
    takes the row's last rank). One column per layer is a static per-layer allocation; a learned policy's
    mean ranks replayed as a table are its "frozen" ablation. An entry may also be a list of ranks, one per
    key/value head of the layer (a per-head allocation; an int entry in such a row means every head at that
    rank). One instance serves every layer of a model."""

    needs_stats = False

    def __init__(self, table):
        super().__init__()
        rows = [[_entry(r) for r in row] for row in table]
        if not rows or any(not row for row in rows):
            raise ValueError("controller 'table' needs a non-empty rank table: one row of ranks per layer")
        for i, row in enumerate(rows):
            widths = {len(r) for r in row if isinstance(r, tuple)}
            if len(widths) > 1:
                raise ValueError(f"row {i} of the rank table has per-head entries of {sorted(widths)} heads; use one")
        self.table = rows

    @classmethod
    def from_options(cls, options: dict, buckets: list[int]) -> TableController:
        table = options.get("table")
        if table is None:
            raise ValueError("controller 'table' needs table= a list of rank rows, one per layer")
        ctrl = cls(table)
        bad = sorted({r for row in ctrl.table for e in row for r in _flat(e)} - set(buckets))
        if bad:
            raise ValueError(f"table ranks {bad} are not buckets; buckets are {buckets}")
        return ctrl

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        if not 0 <= stats.layer < len(self.table):
            raise ValueError(f"the rank table has {len(self.table)} rows, no row for layer {stats.layer}")
        row, buckets = self.table[stats.layer], stats.buckets.tolist()
        n = stats.energy.shape[0]
        ranks = [row[min(s, len(row) - 1)] for s in range(n)]
        missing = sorted({r for e in ranks for r in _flat(e)} - set(buckets))
        if missing:
            raise ValueError(f"table ranks {missing} are not buckets; buckets are {buckets}")
        heads = next((len(e) for e in row if isinstance(e, tuple)), 0)
        if not heads:
            return torch.tensor([buckets.index(r) for r in ranks], dtype=torch.long)
        return torch.tensor(
            [[buckets.index(r) for r in (e if isinstance(e, tuple) else (e,) * heads)] for e in ranks], dtype=torch.long
        )


def _entry(r) -> int | tuple[int, ...]:
    """A table entry: a rank, or a tuple of per-head ranks."""
    if isinstance(r, (list, tuple)):
        if not r:
            raise ValueError("a per-head entry of the rank table needs one rank per key/value head, got []")
        return tuple(int(x) for x in r)
    return int(r)


def _flat(e) -> tuple[int, ...]:
    return e if isinstance(e, tuple) else (e,)
