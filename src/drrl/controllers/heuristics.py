"""Rank controllers that learn nothing: a fixed rank, a random rank, and the energy-threshold rule."""

from __future__ import annotations

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
    """A uniformly random allowed bucket per segment, reproducible from (seed, layer, segment, step)."""

    needs_stats = False

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = int(seed)

    @classmethod
    def from_options(cls, options: dict, buckets: list[int]) -> RandomController:
        return cls(seed=options.get("seed", 0))

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        out, allowed = [], stats.allowed.cpu()
        for s in range(stats.energy.shape[0]):
            g = torch.Generator().manual_seed(hash((self.seed, stats.layer, s, stats.step)) & (2**62 - 1))
            choices = allowed[s].nonzero().flatten()
            if len(choices) == 0:
                choices = torch.tensor([len(stats.buckets) - 1])
            out.append(choices[torch.randint(len(choices), (1,), generator=g)].item())
        return torch.tensor(out, dtype=torch.long)


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
    mean ranks replayed as a table are its "frozen" ablation. One instance serves every layer of a model."""

    needs_stats = False

    def __init__(self, table):
        super().__init__()
        rows = [[int(r) for r in row] for row in table]
        if not rows or any(not row for row in rows):
            raise ValueError("controller 'table' needs a non-empty rank table: one row of ranks per layer")
        self.table = rows

    @classmethod
    def from_options(cls, options: dict, buckets: list[int]) -> TableController:
        table = options.get("table")
        if table is None:
            raise ValueError("controller 'table' needs table= a list of rank rows, one per layer")
        ctrl = cls(table)
        bad = sorted({r for row in ctrl.table for r in row} - set(buckets))
        if bad:
            raise ValueError(f"table ranks {bad} are not buckets; buckets are {buckets}")
        return ctrl

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        if not 0 <= stats.layer < len(self.table):
            raise ValueError(f"the rank table has {len(self.table)} rows, no row for layer {stats.layer}")
        row, buckets = self.table[stats.layer], stats.buckets.tolist()
        n = stats.energy.shape[0]
        ranks = [row[min(s, len(row) - 1)] for s in range(n)]
        missing = sorted(set(ranks) - set(buckets))
        if missing:
            raise ValueError(f"table ranks {missing} are not buckets; buckets are {buckets}")
        return torch.tensor([buckets.index(r) for r in ranks], dtype=torch.long)
