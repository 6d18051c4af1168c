"""Low-rank decode and export: a key cache kept in the calibrated basis, attention of new queries against keys kept in
that basis (what a Hugging Face cache of :mod:`drrl.integrations.cache` feeds the layer), and a fixed-rank copy of a
layer with physically smaller maps."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from drrl.attention.base import Attention
from drrl.attention.drrl.kernels import sdpa_lowrank
from drrl.controllers import SegmentStats

if TYPE_CHECKING:
    from drrl.attention.drrl.layer import DynamicLowRankAttention

log = logging.getLogger(__name__)


class LowRankKVCache:
    """Decode cache with keys in a rank-r_max basis, stored transposed (B, H, r_max, capacity) so that a
    rank-r step reads r contiguous rows; values (B, H, capacity, d) unchanged. Keys are pre-scaled."""

    def __init__(self, batch, heads, capacity, r_max, d_head, dtype, device):
        self.kt = torch.zeros(batch, heads, r_max, capacity, dtype=dtype, device=device)
        self.v = torch.zeros(batch, heads, capacity, d_head, dtype=dtype, device=device)
        self.n, self.capacity = 0, capacity

    def append(self, kt: torch.Tensor, v: torch.Tensor) -> None:
        t = kt.shape[2]
        if self.n + t > self.capacity:
            raise ValueError(f"cache full: {self.n} + {t} tokens exceed its capacity {self.capacity}")
        self.kt[:, :, :, self.n : self.n + t] = kt.transpose(-2, -1)
        self.v[:, :, self.n : self.n + t] = v
        self.n += t

    def attend(self, qt: torch.Tensor, rank: int) -> torch.Tensor:
        """``qt`` (B, H, 1, ≥rank) -> softmax(qt[:rank] · Kᵀ) V over the cached tokens, written out. With
        grouped-query attention (H a multiple of the cache's KV heads) a group's queries share its rows."""
        B, H, _, _ = qt.shape
        g = H // self.kt.shape[1]
        qg = qt[..., :rank].reshape(B, self.kt.shape[1], g, rank)  # query heads of a group stacked as rows
        s = torch.matmul(qg, self.kt[:, :, :rank, : self.n])
        return torch.matmul(s.softmax(-1), self.v[:, :, : self.n]).reshape(B, H, 1, -1)


def segment_ranks(layer: DynamicLowRankAttention, n_seg: int) -> list[tuple[int, ...]]:
    """The rank of each key/value head for segments 0..n_seg−1 of a sequence, for attention against cached keys.

    A controller that reads no statistics (fixed rank, a rank table) is asked directly, so a cached decode runs at
    exactly the ranks a full forward pass over the same positions would. A controller that needs a sequence's
    statistics keeps the ranks its last plan decided (the prefill's) and, past them, the last segment's: a decode
    step does not re-plan."""
    heads = layer.n_kv_head
    if not layer.needs_stats:
        nb = len(layer.buckets)
        stats = SegmentStats(
            layer.layer_idx, layer.buckets, torch.ones(n_seg, nb), torch.zeros(n_seg, nb),
            torch.ones(n_seg, nb, dtype=torch.bool), torch.ones(n_seg, dtype=torch.bool), layer.step_count,
        )  # fmt: skip
        ranks, head_ranks = layer._ranks_of(layer.controller(stats), [True] * n_seg)
        return head_ranks if head_ranks is not None else [(r,) * heads for r in ranks]
    plan = layer.last_plan
    if plan is None:
        return [(layer.r_max,) * heads] * n_seg
    planned = plan.head_ranks or [(r,) * heads for r in plan.ranks]
    return [planned[min(s, len(planned) - 1)] for s in range(n_seg)]


def attend_in_basis(layer: DynamicLowRankAttention, q, kt, v, start: int, mask=None, memo: dict | None = None):
    """Queries at positions [start, start + t) against keys kept in the layer's calibrated key basis.

    ``q`` (B, H, t, d) post-RoPE; ``kt`` (B, H_kv, W, N) the cached keys times P_k (unscaled), transposed so that a
    rank-r read is r contiguous rows (W ≥ r: the cache's width); ``v`` (B, H_kv, N, d); ``mask`` None (causal by
    position) or a boolean (B or 1, 1, t, N) mask, True where a query may attend. Each segment's queries run at
    their heads' ranks (:func:`segment_ranks`; a rank above W runs at W, counted as ``hf_cache_capped`` and warned
    about once per layer); the query heads of a group are stacked as rows, so the
    keys are read once per key/value head. ``memo`` (a dict the caller keeps for one generation, e.g. the cache
    layer's) remembers the ranks per segment count, so a decode step does not ask the controller again.
    Returns (B, H, t, d)."""
    B, H, t, d = q.shape
    hkv, width, n = kt.shape[1], kt.shape[2], kt.shape[3]
    g, T = H // hkv, layer.segment
    n_seg = (start + t - 1) // T + 1
    ranks = memo.get(n_seg) if memo is not None else None
    if ranks is None:
        ranks = segment_ranks(layer, n_seg)
        if memo is not None:
            memo[n_seg] = ranks
    pq = layer.pq.to(q.dtype)
    scale = 1.0 / math.sqrt(d)
    masked = mask is not None or t > 1  # one query without padding sees every cached key: no mask to apply
    allowed = mask
    if mask is None and masked:  # causal by position
        pos = torch.arange(start, start + t, device=q.device)
        allowed = (torch.arange(n, device=q.device)[None, :] <= pos[:, None])[None, None]
    outs = []
    for s in range(start // T, (start + t - 1) // T + 1):
        a, b = max(s * T, start) - start, min((s + 1) * T, start + t) - start
        qs = q[:, :, a:b].unflatten(1, (hkv, g))  # (B, H_kv, g, n, d)
        rows = None
        if masked:  # the mask's rows for this segment's queries, repeated for each query head of a group
            rows = allowed[..., a:b, :].repeat(1, 1, g, 1) if allowed.shape[-2] > 1 else allowed
        hr = ranks[s]
        groups = [(0, hkv, hr[0])] if len(set(hr)) == 1 else [(j, j + 1, r) for j, r in enumerate(hr)]
        ys = []
        for h0, h1, r in groups:
            if r > width:  # the controller asks for more than the cache keeps: counted, warned once per layer
                layer._totals["hf_cache_capped"] += 1
                if not getattr(layer, "_warned_capped", False):
                    layer._warned_capped = True
                    log.warning("layer %d: rank %d capped at the cache's key width %d", layer.layer_idx, r, width)
                r = width
            qr = (qs[:, h0:h1] @ pq[h0:h1, None, :, :r]).flatten(2, 3) * scale  # (B, k, g·n, r)
            scores = qr @ kt[:, h0:h1, :r]  # (B, k, g·n, N)
            if masked:
                scores = scores.masked_fill(~rows, float("-inf"))
            p = scores.softmax(-1)
            if mask is not None:
                p = p.nan_to_num(0.0)  # a fully masked (padding) row attends to nothing
            ys.append((p @ v[:, h0:h1]).unflatten(2, (g, b - a)))  # (B, k, g, n, d)
        outs.append(torch.cat(ys, 1).flatten(1, 2))
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0]


class ExportedLowRankAttention(Attention):
    """A fixed-rank low-rank attention exported from :class:`DynamicLowRankAttention` (not in the registry)."""

    def __init__(self, d_model: int, n_head: int, rank: int, *, causal: bool = True, bias: bool = False):
        super().__init__(d_model, n_head, causal=causal, bias=bias)
        self.rank = rank
        self.register_buffer("pq", torch.zeros(n_head, self.d_head, rank))
        self.register_buffer("pk", torch.zeros(n_head, self.d_head, rank))
        self.q_small: nn.Linear | None = None
        self.k_small: nn.Linear | None = None

    @classmethod
    def from_drrl(cls, src: DynamicLowRankAttention, rank: int, fold: bool = False) -> ExportedLowRankAttention:
        bias = src.qkv.bias is not None
        new = cls(src.d_model, src.n_head, rank, causal=src.causal, bias=bias).to(src.pq.device, src.qkv.weight.dtype)
        new.load_state_dict({**src.qkv.state_dict(prefix="qkv."), **src.proj.state_dict(prefix="proj.")}, strict=False)
        new.pq.copy_(src.pq[..., :rank])
        new.pk.copy_(src.pk[..., :rank])
        if fold:
            D, H, dh = src.d_model, src.n_head, src.d_head
            for name, part, maps in (("q_small", 0, new.pq), ("k_small", 1, new.pk)):
                w = src.qkv.weight[part * D : (part + 1) * D].view(H, dh, D)
                lin = nn.Linear(D, H * rank, bias=bias).to(w.device, w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(torch.einsum("hdr,hdD->hrD", maps.to(w.dtype), w).reshape(H * rank, D))
                    if bias:
                        b = src.qkv.bias[part * D : (part + 1) * D].view(H, dh)
                        lin.bias.copy_(torch.einsum("hdr,hd->hr", maps.to(w.dtype), b).reshape(-1))
                setattr(new, name, lin)
        return new

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        if self.q_small is None:
            return super().forward(x, rope)
        if rope is not None:
            raise ValueError("folded low-rank projections cannot take RoPE; export with fold=False")
        B, L, D = x.shape
        H, r, dh = self.n_head, self.rank, self.d_head
        qt = self.q_small(x).view(B, L, H, r).transpose(1, 2)
        kt = self.k_small(x).view(B, L, H, r).transpose(1, 2)
        v = F.linear(x, self.qkv.weight[2 * D :], None if self.qkv.bias is None else self.qkv.bias[2 * D :])
        v = v.view(B, L, H, dh).transpose(1, 2)
        y = sdpa_lowrank(qt, kt, v, 0, 1.0 / math.sqrt(dh), self.causal)[0]
        return self.proj(y.transpose(1, 2).reshape(B, L, D))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qt = torch.einsum("bhld,hdr->bhlr", q, self.pq.to(q.dtype))
        kt = torch.einsum("bhld,hdr->bhlr", k, self.pk.to(k.dtype))
        return sdpa_lowrank(qt, kt, v, 0, 1.0 / math.sqrt(self.d_head), self.causal)[0]
