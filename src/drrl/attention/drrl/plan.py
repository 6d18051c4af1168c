"""Planning: what one forward pass of one sequence executes. From the sequence's prefix statistics (or the
calibration's), per segment: the basis version (calibrated, refreshed online, or none = full rank), the kept
energy and guardrail bound at every rank bucket, the controller's choice, and the guardrail's override."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from drrl import flops
from drrl.controllers import SegmentStats


def _runs(seg_maps: list, new_version: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [s, t) of segments executed with the same maps (a new basis version starts a run)."""
    runs, s = [], 0
    while s < len(seg_maps):
        t = s + 1
        while t < len(seg_maps) and seg_maps[t] is seg_maps[s] and not new_version[t]:
            t += 1
        runs.append((s, t))
        s = t
    return runs


@dataclass
class _Block:
    """A run of segments [s0, s1) sharing one basis version (``maps`` None = raw q, k: full rank)."""

    s0: int
    s1: int
    maps: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class Plan:
    """What one forward pass executes: per-segment ranks (d_head = full), blocks, and counters. A per-head
    controller also sets ``head_ranks``: per segment, the rank of each key/value head (and of its group's query
    heads); ``ranks`` is then their maximum, the width the segment's keys are projected at."""

    ranks: list[int]
    blocks: list[_Block]
    refreshes: int = 0
    fallbacks: int = 0
    stats: SegmentStats | None = None
    flops: Counter = field(default_factory=Counter)  # algorithmic FLOPs by category (drrl.flops)
    kernel_score_flops: int = 0  # QKᵀ FLOPs the kernel runs (padded to d_head on CPU; masked blocks in full)
    planned_score_flops: int = 0  # QKᵀ FLOPs the per-segment ranks count (flops["scores"]: what executed)
    path: str = ""
    qr_fallbacks: int = 0  # refreshes whose CholeskyQR2 fell back to Householder QR
    last_basis: torch.Tensor | None = None  # P_q of the last basis version (the next call's warm start)
    guard_rows: int = 0  # query rows (per head) the guard's certificate recomputed at full rank
    head_ranks: list[tuple[int, ...]] | None = None  # per segment, the rank of each key/value head

    def mean_ranks(self) -> list[float]:
        """Per segment, the rank averaged over the heads (the executed rank; ``ranks`` without head ranks)."""
        if self.head_ranks is None:
            return [float(r) for r in self.ranks]
        return [sum(h) / len(h) for h in self.head_ranks]


@dataclass
class Draft:
    """A plan being built for one sequence of ``n`` segments: statistics and maps filled in as planning goes."""

    energy: torch.Tensor  # (n, n_buckets)
    bound: torch.Tensor  # (n, n_buckets)
    decide: torch.Tensor  # (n,) bool
    seg_maps: list  # per segment: (P_q, P_k) of its basis version, or None (full rank)
    new_version: list[bool]  # a basis version starts at this segment
    stats_done: list[bool]  # energy and bound of the executed maps already measured
    fc: Counter = field(default_factory=Counter)  # algorithmic FLOPs by category
    fallbacks: int = 0
    refreshes: int = 0
    qr_fallbacks: int = 0

    @classmethod
    def empty(cls, n: int, n_buckets: int, dtype: torch.dtype, device) -> Draft:
        return cls(
            torch.ones(n, n_buckets, dtype=dtype, device=device),
            torch.zeros(n, n_buckets, dtype=dtype, device=device),
            torch.zeros(n, dtype=torch.bool, device=device),
            [None] * n,
            [False] * n,
            [False] * n,
        )


class PlanMixin:
    """The planning half of :class:`~drrl.attention.drrl.DynamicLowRankAttention` (its attributes and the
    statistics of :class:`~drrl.attention.drrl.basis.BasisMixin` are used here)."""

    @torch.no_grad()
    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int = 0, warm=None) -> Plan:
        """Decide bases and ranks for every segment of one sequence's post-RoPE q, k, v, each (1, H, L, d).

        ``warm`` is the basis the online refreshes warm-start from (default: the layer's running basis ``z``);
        :meth:`attend` passes every row of a batch the same one, so no row starts from a basis fitted on
        another row's tokens. Statistics run in float32 (float64 for float64 inputs) with autocast off, whatever
        the caller's precision. Returns a :class:`Plan`; no gradient flows through it.
        """
        if q.shape[0] != 1:
            raise ValueError(f"plan() takes one sequence (batch 1), got batch {q.shape[0]}; attend() plans per row")
        t0 = time.perf_counter()
        with torch.autocast(q.device.type, enabled=False), torch.autocast("cpu", enabled=False):
            plan = self._plan(q, k, v, row, self.z if warm is None else warm)
        self._totals["time:plan"] += time.perf_counter() - t0  # host wall time (CPU timing; async on CUDA)
        return plan

    def _plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int, warm: torch.Tensor) -> Plan:
        B, H, L, d = q.shape
        T = self.segment if self.causal else L
        n_seg = -(-L // T)
        sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        dr = Draft.empty(n_seg, len(self.buckets), sdt, q.device)
        calibrated = bool(self.calibrated)
        if self.basis == "calibrated" and not calibrated:
            if self.cal_tokens.item() == 0:
                raise RuntimeError(
                    "basis='calibrated' but the layer is not calibrated; run forward passes inside "
                    "drrl.attention.calibrating(model) first, or use basis='online'"
                )
            # calibration was attempted and failed (non-finite statistics): full rank everywhere
            return Plan([d] * n_seg, [_Block(0, n_seg, None)], fallbacks=n_seg)
        cal_maps = (self.pq.to(sdt), self.pk.to(sdt)) if calibrated else None
        if self.basis == "calibrated" and not self.needs_stats:  # e.g. a fixed rank: nothing to measure at run time
            dr.decide[:] = True
            stats = SegmentStats(
                self.layer_idx, self.buckets, dr.energy, dr.bound, dr.energy > 0, dr.decide, self.step_count
            )
            ranks, head_ranks = self._ranks_of(self.controller(stats), [True] * n_seg)
            return Plan(ranks, [_Block(0, n_seg, cal_maps)], stats=stats, head_ranks=head_ranks)
        gq, gk, gv = self._prefix_grams(q, k, v, n_seg, sdt, dr.fc, calibrated)
        finite = torch.isfinite(gq.sum((-3, -2, -1)) + gk.sum((-3, -2, -1))).cpu()  # NaN/inf reach the sums
        seq_feats = self._sequence_features(gq, gk, B, L, sdt)
        if self.basis == "calibrated":
            for s in range(n_seg):
                dr.seg_maps[s] = cal_maps
            dr.new_version[0] = True
            dr.decide[:] = True
        else:
            if calibrated:
                dr.seg_maps[0], dr.decide[0], dr.new_version[0] = cal_maps, True, True
            self._refresh_online(dr, gq, gk, gv, finite, q.device, sdt, warm)
        self._executed_stats(dr, gq, gk, gv, sdt, q.device, L)
        plan = self._decide(dr, row, seq_feats, d)
        plan.last_basis = next((m[0] for m in reversed(dr.seg_maps) if m is not None), None)
        return plan

    def _prefix_grams(self, q, k, v, n_seg: int, sdt, fc: Counter, calibrated: bool):
        """Exclusive prefix Grams (n_seg, H_kv, d, d) of queries (summed over each group), keys and (for the
        bound) values; a bidirectional layer uses the calibration Grams rescaled to the sequence length."""
        B, H, L, d = q.shape
        T = self.segment if self.causal else L
        if not self.causal:
            gq, gk, gv = (g.unsqueeze(0) for g in self._calibration_grams(self.pq.to(sdt), L))
            return gq, gk, gv if self.needs_bound else None
        gq = self._group_sum(self._segment_grams(q.detach().to(sdt), n_seg))
        gk = self._segment_grams(k.detach().to(sdt), n_seg)
        fc["grams"] += flops.gram(B * L, d) * (H + self.n_kv_head)
        if self.needs_bound:  # the value Gram only feeds the guardrail bound
            gv = self._segment_grams(v.detach().to(sdt), n_seg)
            fc["grams"] += flops.gram(B * L, d) * self.n_kv_head
        else:
            gv = None
        if calibrated:  # segment 0 has no prefix: judge the calibrated maps on calibration statistics
            g0 = self._calibration_grams(gq, B * min(T, L))
            gq[0], gk[0] = g0[:2]
            if gv is not None:
                gv[0] = g0[2]
        return gq, gk, gv

    def _sequence_features(self, gq, gk, B: int, L: int, sdt) -> torch.Tensor:
        """Cheap "sequence dynamics" for learned controllers: mean squared query/key norm of the prefix, and the
        segment's start position (absolute: a feature that knew the sequence length would leak the future)."""
        n_seg, device = gq.shape[0], gq.device
        T = self.segment if self.causal else L
        ntok = (torch.arange(n_seg, device=device) * T * B).clamp(min=B * min(T, L)).to(sdt)
        return torch.stack(
            [
                (gq.diagonal(dim1=-2, dim2=-1).sum(-1).mean(-1) / ntok).log1p(),
                (gk.diagonal(dim1=-2, dim2=-1).sum(-1).mean(-1) / ntok).log1p(),
                # a causal segment's start, never the sequence length; a bidirectional layer sees the whole
                # sequence, so its one decision may know the length (its only per-input statistic)
                (
                    torch.arange(n_seg, device=device, dtype=sdt) * T
                    if self.causal
                    else torch.full((1,), float(L), device=device, dtype=sdt)
                ).log1p()
                / 10,
            ],
            -1,
        ).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)

    def _executed_stats(self, dr: Draft, gq, gk, gv, sdt, device, L: int) -> None:
        """Kept energy and bound of the executed maps, batched per basis version (where not measured yet), then
        full rank for segments whose statistics are not finite."""
        for s, t in _runs(dr.seg_maps, dr.new_version):
            if dr.seg_maps[s] is not None and self.needs_stats and not dr.stats_done[s]:
                if self.causal:
                    e, b = self._bucket_stats(gq[s:t], gk[s:t], None if gv is None else gv[s:t], *dr.seg_maps[s])
                    dr.fc["stats"] += (t - s) * self.n_kv_head * self._stats_flops(b is not None)
                else:
                    e, b = self._calibration_stats(sdt, device, gv is not None, L)
                dr.energy[s:t] = e
                if b is not None:
                    dr.bound[s:t] = b
        bad = dr.decide & ~(torch.isfinite(dr.energy).all(1) & torch.isfinite(dr.bound).all(1))
        if bad.any():  # a failed factorisation or non-finite statistics: full rank for that segment
            dr.fallbacks += int(bad.sum())
            for j in bad.nonzero().flatten().tolist():
                dr.seg_maps[j], dr.decide[j] = None, False
            dr.energy[bad], dr.bound[bad] = 1.0, 0.0

    def _decide(self, dr: Draft, row: int, seq_feats: torch.Tensor, d: int) -> Plan:
        """The guardrail's mask, the controller's choice per segment, and the guardrail's override."""
        allowed = torch.ones_like(dr.energy, dtype=torch.bool)
        if self.guard_eps is not None:
            allowed = dr.bound <= self.guard_eps
            allowed[:, -1] |= ~allowed.any(1)  # nothing safe: r_max
        stats = SegmentStats(
            self.layer_idx, self.buckets, dr.energy, dr.bound, allowed, dr.decide, self.step_count, row, seq_feats
        )
        t0 = time.perf_counter()
        choice = self.controller(stats)
        self._totals["time:controller"] += time.perf_counter() - t0
        decided = dr.decide.tolist()
        ranks, head_ranks = self._ranks_of(choice, allowed.tolist())
        for j in range(len(dr.seg_maps)):
            if not decided[j]:
                ranks[j] = d if dr.seg_maps[j] is None else self.r_max
                if head_ranks is not None:
                    head_ranks[j] = (ranks[j],) * self.n_kv_head
        blocks = [_Block(s, t, dr.seg_maps[s]) for s, t in _runs(dr.seg_maps, dr.new_version)]
        return Plan(
            ranks, blocks, dr.refreshes, dr.fallbacks, stats, dr.fc, qr_fallbacks=dr.qr_fallbacks, head_ranks=head_ranks
        )

    def _ranks_of(self, choice: torch.Tensor, safe: list):
        """The controller's bucket indices -> per-segment ranks, and per-head ranks when the controller chose per
        key/value head ((n_seg, H_kv) indices; their maximum is the segment's rank). The guardrail overrides an
        unsafe choice with the nearest safe bucket above, else r_max (``safe``: per segment, per bucket, or True)."""
        buckets, n = self.buckets.tolist(), choice.shape[0]
        if choice.dim() == 2 and choice.shape[1] != self.n_kv_head:
            raise ValueError(
                f"a per-head rank choice needs one column per key/value head ({self.n_kv_head}), got {choice.shape[1]}"
            )
        if choice.dim() == 2 and self.guard_eps is not None:
            raise ValueError(
                "per-head ranks do not run with the guardrail (its certificate is per segment); "
                "set guard_eps=None or use one rank per segment"
            )
        rows = choice.view(n, -1).tolist()

        def pick(j: int, c: int) -> int:
            ok = safe[j]
            if ok is not True and not ok[c]:
                c = next((i for i in range(c, len(buckets)) if ok[i]), len(buckets) - 1)
            return buckets[c]

        per = [tuple(pick(j, int(c)) for c in row) for j, row in enumerate(rows)]
        if choice.dim() == 1:
            return [p[0] for p in per], None
        return [max(p) for p in per], per


def naive_lowrank_attention(q, k, v, plan: Plan, segment: int, causal: bool = True) -> torch.Tensor:
    """Reference for tests: forms each segment's (T, L) score rows from the plan's maps and ranks. q is
    (B, H, L, d); k and v may have fewer (KV) heads, each shared by H / H_kv consecutive query heads."""
    B, H, L, d = q.shape
    g = H // k.shape[1]
    T = segment if causal else L
    out = q.new_empty(B, H, L, v.shape[-1])
    vv = v.repeat_interleave(g, 1)
    for blk in plan.blocks:
        for s in range(blk.s0, blk.s1):
            a, b = s * T, min((s + 1) * T, L)
            if blk.maps is None:
                qs, ks = q[:, :, a:b], k.repeat_interleave(g, 1)
            else:  # each key/value head (and its group's query heads) at its own rank: zero the columns past it
                hr = plan.head_ranks[s] if plan.head_ranks is not None else (plan.ranks[s],) * k.shape[1]
                cols = torch.arange(blk.maps[0].shape[-1], device=blk.maps[0].device)
                keep = (cols < torch.tensor(hr, device=cols.device)[:, None]).to(q.dtype)  # (H_kv, r_max)
                pq, pk = (m.to(q.dtype) * keep[:, None, :] for m in blk.maps)
                qs = torch.einsum("bhld,hdr->bhlr", q[:, :, a:b], pq.repeat_interleave(g, 0))
                ks = torch.einsum("bhld,hdr->bhlr", k, pk).repeat_interleave(g, 1)
            scores = qs @ ks.transpose(-2, -1) / math.sqrt(d)  # (B, H, b - a, L)
            if causal:
                future = torch.arange(L, device=q.device)[None, :] > torch.arange(a, b, device=q.device)[:, None]
                scores = scores.masked_fill(future, float("-inf"))
            out[:, :, a:b] = scores.softmax(-1) @ vv
    return out
