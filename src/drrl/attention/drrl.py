"""DR-RL dynamic low-rank attention: the rank of each layer's score matrix is chosen per segment of T tokens.

Per head, scores S = Q Kᵀ are replaced by (Q P_q[:, :r])(K P_k[:, :r])ᵀ with d × r_max maps from
:mod:`drrl.linalg` and a rank r from a small bucket set, chosen by a rank controller from prefix
statistics. The rank-r queries and keys go straight to SDPA with the scale 1/√d_head of the original
logits; the (L, L) score matrix is never formed.

Bases (``basis=``):
  * ``calibrated`` — fixed maps per layer and head from calibration data (``with calibrating(model): ...``),
    the exact Eckart–Young maps of the calibration Grams. No decomposition at run time.
  * ``online`` — segment s uses a basis refreshed from the prefix Grams of segments < s by warm-started
    subspace iteration (two steps from the previous basis, in whitened coordinates), and only when the basis
    is stale: when the exact kept score energy of the basis in use (drrl.linalg.truncation_errors, exact for
    any stale basis, so no bound is needed) has dropped by more than ``refresh_tol`` at some bucket since its
    refresh. Segment 0 uses the calibrated maps when there are some, else full rank.

Causality: the basis and the rank used at positions of segment s depend only on tokens of the same
sequence before segment s (or on calibration data): bases, statistics and ranks are planned per
sequence, so no row of a batch sees another row's tokens. Keys of all earlier positions are projected with the basis of the queries'
segment, so one attention call covers each run of segments that share a basis version.

Kernel paths (``kernel_path``): on CPU, SDPA runs its fused kernel only when q, k and v share a width,
so rank-r queries and keys are zero-padded back to d_head (identical result, full cost: CPU prefill
cannot gain from rank, it must only not lose); on CUDA the narrow q/k go to the efficient or cuDNN
backend. A run of segments that starts at an offset is computed as a causal diagonal block merged with
an unmasked off-diagonal block through their log-sum-exps (CPU, inference), or with an explicit mask.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from drrl import flops
from drrl.attention.base import Attention, check_int, check_real, register_attention
from drrl.linalg import (
    gram,
    lowrank_score_maps,
    spectral_norm_bounds,
    subspace_iteration,
    truncation_errors,
)
from drrl.rl.controllers import PendingRLController, RankController, SegmentStats, build_controller
from drrl.rl.reward import cost_ratio, reward, segment_fidelity

log = logging.getLogger(__name__)

BASIS_MODES = ("calibrated", "online")


def kernel_path(device_type: str, width: int, d_head: int) -> str:
    """The fastest exact SDPA call for rank-``width`` queries/keys and values of width ``d_head``:
    ``sdpa`` (equal widths), ``sdpa-padded`` (CPU: pad q/k with zeros to d_head, keeps the fused kernel)
    or ``sdpa-narrow`` (CUDA: efficient/cuDNN backends take q/k narrower than v)."""
    if width == d_head:
        return "sdpa"
    return "sdpa-narrow" if device_type == "cuda" else "sdpa-padded"


def _flash_cpu_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _merge_applies(q, k, v) -> bool:
    """The log-sum-exp merge runs the fused CPU kernel, which has no autograd formula for its log-sum-exp:
    CPU, equal widths and dtypes, and no gradient needed."""
    return (
        q.device.type == "cpu"
        and q.shape[-1] == v.shape[-1]
        and q.dtype == k.dtype == v.dtype
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        and _flash_cpu_available()
    )


def attend_offset(q, k, v, offset: int, scale: float, *, merge: bool | None = None) -> torch.Tensor:
    """Causal attention of queries at positions [offset, offset + Tq) against keys/values [0, offset + Tq).

    ``q`` (B, H, Tq, w), ``k`` (B, H, offset + Tq, w), ``v`` (B, H, offset + Tq, d). With ``merge`` (default:
    CPU, no gradient needed, equal widths) the diagonal block runs causally and the off-diagonal block
    unmasked through the fused CPU kernel, merged by their log-sum-exps; otherwise one SDPA call with a
    boolean mask (differentiable, any device).
    """
    if offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if merge is None:
        merge = _merge_applies(q, k, v)
    tq = q.shape[-2]
    if merge:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        o1, l1 = op(q, k[..., offset:, :], v[..., offset:, :], is_causal=True, scale=scale)[:2]
        o2, l2 = op(q, k[..., :offset, :], v[..., :offset, :], is_causal=False, scale=scale)[:2]
        m = torch.maximum(l1, l2)
        w1, w2 = (l1 - m).exp().unsqueeze(-1), (l2 - m).exp().unsqueeze(-1)
        return ((o1 * w1 + o2 * w2) / (w1 + w2)).to(q.dtype)
    mask = torch.ones(tq, offset + tq, dtype=torch.bool, device=q.device).tril(offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _sdpa_lowrank(q, k, v, offset: int, scale: float, causal: bool) -> tuple[torch.Tensor, str, int]:
    """SDPA on rank-r q, k (any width ≤ d) and full-width v, by the fastest exact path for the device.
    Returns the output, the path taken and the number of (query, key) score entries the kernel computes."""
    d = v.shape[-1]
    q, k, v = (x.to(q.dtype) for x in (q, k, v))  # one dtype (autocast can leave v in another)
    path = kernel_path(q.device.type, q.shape[-1], d)
    if path == "sdpa-padded":
        q, k = F.pad(q, (0, d - q.shape[-1])), F.pad(k, (0, d - k.shape[-1]))
    tq, tk = q.shape[-2], k.shape[-2]
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale), path, tq * tk
    merge = offset > 0 and _merge_applies(q, k, v)
    entries = tq * offset + tq * (tq + 1) // 2 if offset == 0 or merge else tq * tk  # a masked call computes all
    out = attend_offset(q, k, v, offset, scale, merge=merge if offset else None)
    return out, path + ("+merge" if merge else "+mask" if offset else ""), entries


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
    """What one forward pass executes: per-segment ranks (d_head = full), blocks, and counters."""

    ranks: list[int]
    blocks: list[_Block]
    refreshes: int = 0
    fallbacks: int = 0
    stats: SegmentStats | None = None
    flops: Counter = field(default_factory=Counter)  # algorithmic FLOPs by category (drrl.flops)
    kernel_score_flops: int = 0  # QKᵀ FLOPs the kernel runs (padded to d_head on CPU; masked blocks in full)
    path: str = ""
    qr_fallbacks: int = 0  # refreshes whose CholeskyQR2 fell back to Householder QR


@register_attention("drrl")
class DynamicLowRankAttention(Attention):
    """Dynamic low-rank multi-head self-attention (DR-RL).

    Args:
        d_model, n_head, causal, bias: as :class:`~drrl.attention.base.Attention`.
        r_max: width of the per-head bases (default d_head); ranks never exceed it.
        bucket: ranks are multiples of ``bucket`` up to r_max (r_max itself is always a bucket).
        segment: tokens per rank decision T (causal mode; a non-causal encoder makes one decision per batch:
            its statistics are the calibration's, the same for every sequence of a length).
        basis: ``"online"`` (prefix statistics, causal only) or ``"calibrated"``.
        controller: ``"energy"`` (smallest bucket keeping ≥ ``tau`` of the score energy), ``"fixed"``
            (``rank``), ``"random"`` (``seed``), ``"rl"`` (a learned policy the model installs, shared by
            its layers); :meth:`set_controller` installs any
            :class:`~drrl.rl.controllers.RankController` (e.g. a learned policy).
        guard_eps: mask ranks whose bound on the relative output error exceeds this (None: no mask).
        refresh_tol: online mode refreshes the basis when its kept energy at a bucket drops by more than this.
        refresh_steps: subspace-iteration steps per refresh (1–2 from a warm start).
        ridge: relative Cholesky ridge for calibration maps.
        n_kv_head: key/value heads (grouped-query attention; default ``n_head``). Query head h reads KV head
            h // (n_head / n_kv_head). Each group shares one pair of maps: the exact factorisation of the
            group's stacked score matrices [Q_h Kᵀ]_h (query Grams summed over the group), so keys are kept
            at width r once per KV head (the decode cache) and every query head of the group uses the same
            query map (optimal for the stacked matrix). GQA layers are driven through :meth:`attend` by a
            wrapper that owns the projections (drrl.integrations.hf); this module's own ``qkv`` is MHA.
    """

    ONLINE_RIDGE = 1e-3  # relative ridge of the Grams online bases are fitted on
    STATS_CHUNK = 8  # segments whose statistics are computed in one batch on CPU (4x that on GPU: fewer launches)

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        causal: bool = True,
        bias: bool = False,
        r_max: int | None = None,
        bucket: int = 8,
        segment: int = 128,
        basis: str = "online",
        controller: str = "energy",
        rank: int | None = None,
        tau: float = 0.95,
        seed: int = 0,
        guard_eps: float | None = None,
        refresh_tol: float = 0.01,
        refresh_steps: int = 2,
        ridge: float = 1e-6,
        n_kv_head: int | None = None,
    ):
        super().__init__(d_model, n_head, causal=causal, bias=bias)
        d, n_head = self.d_head, self.n_head
        n_kv_head = n_head if n_kv_head is None else check_int(n_kv_head, "n_kv_head", minimum=0)
        if n_kv_head < 1 or n_head % n_kv_head:
            raise ValueError(f"n_kv_head must divide n_head={n_head}, got {n_kv_head}")
        self.n_kv_head, self.group = n_kv_head, n_head // n_kv_head
        r_max = d if r_max is None else check_int(r_max, "r_max", minimum=0)
        if not 0 < r_max <= d:
            raise ValueError(f"r_max must be in 1..d_head={d}, got {r_max}")
        bucket = check_int(bucket, "bucket")
        segment = check_int(segment, "segment (tokens per rank decision)")
        refresh_steps = check_int(refresh_steps, "refresh_steps")
        seed = check_int(seed, "seed", minimum=None)
        ridge = check_real(ridge, "ridge")
        if not 0 <= ridge < math.inf:
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
        for name, value in (("tau", tau), ("refresh_tol", refresh_tol), ("guard_eps", guard_eps)):
            check_real(value, name, optional=name == "guard_eps")
        if basis not in BASIS_MODES:
            raise ValueError(f"basis must be one of {', '.join(BASIS_MODES)}, got {basis!r}")
        if basis == "online" and not causal:
            raise ValueError("basis='online' needs causal attention (prefix statistics); use basis='calibrated'")
        if guard_eps is not None and not guard_eps > 0:
            raise ValueError(f"guard_eps must be > 0 or None, got {guard_eps}")
        if refresh_steps < 1 or not refresh_tol >= 0:
            raise ValueError("refresh_steps must be >= 1 and refresh_tol >= 0")
        buckets = sorted({b for b in range(bucket, r_max + 1, bucket)} | {r_max})
        if controller == "fixed":
            if rank is None or rank not in buckets:
                raise ValueError(f"controller 'fixed' needs rank= one of the buckets {buckets}, got {rank}")
            ctrl = build_controller("fixed", rank=rank)
        elif controller == "random":
            ctrl = build_controller("random", seed=seed)
        elif controller == "energy":
            ctrl = build_controller("energy", tau=tau)
        elif controller == "rl":  # the model installs one shared RLController (drrl.models.GPT does)
            ctrl = PendingRLController()
        else:
            raise ValueError(f"controller must be one of energy, fixed, random, rl, got {controller!r}")
        self.r_max, self.segment, self.basis, self.guard_eps = r_max, int(segment), basis, guard_eps
        self.refresh_tol, self.refresh_steps, self.ridge = float(refresh_tol), int(refresh_steps), float(ridge)
        self.layer_idx = -1
        self.controller: RankController = ctrl
        self.register_buffer("buckets", torch.tensor(buckets, dtype=torch.long), persistent=False)
        eye = torch.eye(d, r_max).expand(n_kv_head, d, r_max)
        self.register_buffer("pq", eye.clone())  # calibrated maps (H_kv, d, r_max), one pair per KV group
        self.register_buffer("pk", eye.clone())
        self.register_buffer("cal_gq", torch.zeros(n_kv_head, d, d, dtype=torch.float64))
        self.register_buffer("cal_gk", torch.zeros(n_kv_head, d, d, dtype=torch.float64))
        self.register_buffer("cal_gv", torch.zeros(n_kv_head, d, d, dtype=torch.float64))
        self.register_buffer("cal_tokens", torch.zeros((), dtype=torch.float64))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.register_buffer("z", eye.clone())  # running online basis, the warm start of the next call
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training forwards (random streams)
        self._calibrating = False
        self._static_stats: dict = {}  # bidirectional: statistics of the calibration Grams (_calibration_stats)
        self.last_plan: Plan | None = None
        self._totals: Counter = Counter()

    def _expand(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, ...) -> (B, H, ...): each KV head repeated for the query heads of its group."""
        return x if self.group == 1 else x.repeat_interleave(self.group, dim=1)

    def _group_sum(self, g: torch.Tensor) -> torch.Tensor:
        """(..., H, d, d) query Grams -> (..., H_kv, d, d) summed over each group (the stacked queries' Gram)."""
        if self.group == 1:
            return g
        return g.unflatten(-3, (self.n_kv_head, self.group)).sum(-3)

    def extra_repr(self) -> str:
        return (
            f"n_kv_head={self.n_kv_head}, d_head={self.d_head}, r_max={self.r_max}, buckets={self.buckets.tolist()}, segment={self.segment}, "
            f"basis={self.basis}, guard_eps={self.guard_eps}"
        )

    def _apply(self, fn, recurse=True):
        """``.to(bfloat16)`` and friends move statistics and bases but never lower their precision: the
        calibration Grams stay float64 and the bases at least float32 (they are cast per call instead)."""
        before = {n: self._buffers[n] for n in ("cal_gq", "cal_gk", "cal_gv", "cal_tokens", "pq", "pk", "z")}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            keep_dtype = name.startswith("cal_") or new.dtype.itemsize < 4
            if keep_dtype and new.dtype != old.dtype:
                self._buffers[name] = old.to(
                    device=new.device, dtype=old.dtype if name.startswith("cal_") else torch.float32
                )
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self._static_stats.clear()  # new maps: cached statistics are stale
        return super()._load_from_state_dict(*args, **kwargs)

    def set_controller(self, controller: RankController) -> None:
        self.controller = controller

    @property
    def step_count(self) -> int:
        return int(self.steps)

    @property
    def needs_stats(self) -> bool:
        """Whether planning measures per-segment statistics (the controller reads them, or the guardrail)."""
        return getattr(self.controller, "needs_stats", True) or self.needs_bound

    @property
    def needs_bound(self) -> bool:
        """Whether the guardrail bound is computed (a guard is set, or the controller asks for it)."""
        return self.guard_eps is not None or getattr(self.controller, "needs_bound", False)

    # ----------------------------------------------------------------------------------- calibration

    def finish_calibration(self) -> bool:
        """Fit the calibrated maps from the accumulated Grams; returns False (and keeps full rank) on failure."""
        if self.cal_tokens.item() == 0:
            raise RuntimeError(
                "no calibration data was seen; run forward passes inside calibrating(model) (without padding masks: "
                "padded batches run exact attention and are not calibrated)"
            )
        try:
            pq, pk, _ = lowrank_score_maps(self.cal_gq, self.cal_gk, self.r_max, ridge=self.ridge)
            ok = bool(torch.isfinite(pq).all() and torch.isfinite(pk).all())
        except torch.linalg.LinAlgError:
            ok = False
        if not ok:
            log.warning("layer %d: calibration factorisation failed (non-finite statistics); full rank", self.layer_idx)
            self._totals["fallbacks"] += 1
            self.calibrated.fill_(False)
            return False
        self.pq.copy_(pq)
        self.pk.copy_(pk)
        self.z.copy_(pq)
        self._static_stats.clear()
        self.calibrated.fill_(True)
        return True

    def _calibration_grams(self, like: torch.Tensor, tokens: int):
        """Calibration Grams rescaled to ``tokens`` tokens (the stand-in prefix of a first segment)."""
        c = tokens / self.cal_tokens.item()
        return tuple((g * c).to(like.dtype) for g in (self.cal_gq, self.cal_gk, self.cal_gv))

    # ----------------------------------------------------------------------------------- planning

    def _segment_grams(self, x: torch.Tensor, n_seg: int) -> torch.Tensor:
        """(B, H, L, d) -> exclusive prefix Gram sums over batch, (n_seg, H, d, d): entry s covers tokens < s·T."""
        B, H, L, d = x.shape
        if L % self.segment:
            x = F.pad(x, (0, 0, 0, n_seg * self.segment - L))  # zero rows do not change a Gram
        xp = x.view(B, H, n_seg, self.segment, d)
        per_seg = (xp.transpose(-2, -1) @ xp).sum(0)  # (H, n_seg, d, d): batched Grams, no permuted copy
        out = torch.zeros(n_seg, H, d, d, dtype=x.dtype, device=x.device)
        for s in range(1, n_seg):  # exclusive prefix sums (a NaN stays in the segments after it)
            torch.add(out[s - 1], per_seg[:, s - 1], out=out[s])
        return out

    def _stats_flops(self, with_bound: bool) -> int:
        n = flops.truncation_errors(self.d_head, self.r_max, len(self.buckets))
        return n + (flops.spectral_upper(self.d_head) if with_bound else 0)

    def _bucket_stats(self, gq, gk, gv, pq, pk):
        """Kept energy and guardrail bound per bucket for maps (pq, pk) on prefixes (n, H, d, d)."""
        err = truncation_errors(gq, gk, pq, pk, self.buckets)  # (n, H, nb)
        total = (gq * gk).sum((-2, -1)).unsqueeze(-1)  # tr(G_q G_k) (symmetric)
        energy = (1 - err.sum(1) / total.sum(1).clamp(min=torch.finfo(gq.dtype).tiny)).clamp(0, 1)
        if gv is None:
            return energy, None
        # ‖O − Õ‖_F / ‖V‖_F ≤ sqrt(err)/(2√d) · ‖V‖_2/‖V‖_F on the prefix (drrl.linalg.bounds)
        _, lam = spectral_norm_bounds(gv)
        trv = gv.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=torch.finfo(gq.dtype).tiny)
        ratio = (lam / trv).clamp(max=1).sqrt().unsqueeze(-1)
        bound = (err.sqrt() / (2 * math.sqrt(self.d_head)) * ratio).amax(1)
        return energy, bound

    def _calibration_stats(self, sdt, device, with_bound: bool, length: int):
        """Kept energy and bound of the calibrated maps on the calibration Grams rescaled to ``length`` tokens
        (what a bidirectional layer decides on). The Grams scale with the token count c: the kept energy is
        invariant and the bound (√err · √(λ/tr)) grows as c, so they are computed once per calibration (a
        calibration cost, like the Grams; counted in ``flops:calibration`` when computed) and rescaled."""
        key = (sdt, device, with_bound)
        if key not in self._static_stats:
            grams = [g.to(device, sdt).unsqueeze(0) for g in (self.cal_gq, self.cal_gk, self.cal_gv)]
            e, b = self._bucket_stats(grams[0], grams[1], grams[2] if with_bound else None,
                                      self.pq.to(sdt), self.pk.to(sdt))  # fmt: skip
            self._totals["flops:calibration"] += self.n_kv_head * self._stats_flops(with_bound)
            self._static_stats[key] = (e, b)
        e, b = self._static_stats[key]
        return e, None if b is None else b * (length / self.cal_tokens.item())

    @torch.no_grad()
    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int = 0) -> Plan:
        """Decide bases and ranks for every segment of one sequence's post-RoPE q, k, v, each (1, H, L, d).

        Statistics run in float32 (float64 for float64 inputs) with autocast off, whatever the caller's
        precision. Returns a :class:`Plan`; no gradient flows through it.
        """
        if q.shape[0] != 1:
            raise ValueError(f"plan() takes one sequence (batch 1), got batch {q.shape[0]}; attend() plans per row")
        t0 = time.perf_counter()
        with torch.autocast(q.device.type, enabled=False), torch.autocast("cpu", enabled=False):
            plan = self._plan(q, k, v, row)
        self._totals["time:plan"] += time.perf_counter() - t0  # host wall time (CPU timing; async on CUDA)
        return plan

    def _plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int) -> Plan:
        B, H, L, d = q.shape
        T = self.segment if self.causal else L
        n_seg = -(-L // T)
        sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        nb = len(self.buckets)
        energy = torch.ones(n_seg, nb, dtype=sdt, device=q.device)
        bound = torch.zeros(n_seg, nb, dtype=sdt, device=q.device)
        decide = torch.zeros(n_seg, dtype=torch.bool, device=q.device)
        seg_maps: list[tuple | None] = [None] * n_seg
        new_version = [False] * n_seg
        stats_done = [False] * n_seg
        fc = Counter()
        calibrated = bool(self.calibrated)
        fallbacks = refreshes = qr_fallbacks = 0
        if self.basis == "calibrated" and not calibrated:
            if self.cal_tokens.item() == 0:
                raise RuntimeError(
                    "basis='calibrated' but the layer is not calibrated; run forward passes inside "
                    "drrl.attention.calibrating(model) first, or use basis='online'"
                )
            # calibration was attempted and failed (non-finite statistics): full rank everywhere
            return Plan([d] * n_seg, [_Block(0, n_seg, None)], fallbacks=n_seg)
        cal_maps = (self.pq.to(sdt), self.pk.to(sdt)) if calibrated else None
        need_stats = self.needs_stats
        if self.basis == "calibrated" and not need_stats:  # e.g. a fixed rank: nothing to measure at run time
            decide[:] = True
            stats = SegmentStats(self.layer_idx, self.buckets, energy, bound, energy > 0, decide, self.step_count)
            buckets = self.buckets.tolist()
            ranks = [buckets[c] for c in self.controller(stats).tolist()]
            return Plan(ranks, [_Block(0, n_seg, cal_maps)], stats=stats)
        if not self.causal:
            gq, gk, gv = (g.unsqueeze(0) for g in self._calibration_grams(self.pq.to(sdt), L))
            gv = gv if self.needs_bound else None
        else:
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
        finite = torch.isfinite(gq.sum((-3, -2, -1)) + gk.sum((-3, -2, -1))).cpu()  # NaN/inf reach the sums
        # cheap "sequence dynamics" for learned controllers: mean squared query/key norm of the prefix, and the
        # segment's start position (absolute: a feature that knew the sequence length would leak the future)
        ntok = (torch.arange(n_seg, device=q.device) * T * B).clamp(min=B * min(T, L)).to(sdt)
        seq_feats = torch.stack(
            [
                (gq.diagonal(dim1=-2, dim2=-1).sum(-1).mean(-1) / ntok).log1p(),
                (gk.diagonal(dim1=-2, dim2=-1).sum(-1).mean(-1) / ntok).log1p(),
                # a causal segment's start, never the sequence length; a bidirectional layer sees the whole
                # sequence, so its one decision may know the length (its only per-input statistic)
                (
                    torch.arange(n_seg, device=q.device, dtype=sdt) * T
                    if self.causal
                    else torch.full((1,), float(L), device=q.device, dtype=sdt)
                ).log1p()
                / 10,
            ],
            -1,
        ).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)

        if self.basis == "calibrated":
            for s in range(n_seg):
                seg_maps[s] = cal_maps
            new_version[0] = True
            decide[:] = True
        else:
            if calibrated:
                seg_maps[0], decide[0], new_version[0] = cal_maps, True, True
            # Refreshes factorise a few (H, d, d) matrices: latency-bound on a GPU (cuSOLVER calls cost ~1 ms
            # each), so they run on the CPU; statistics and attention stay on the device.
            cpu = torch.device("cpu")
            s, z = 1, self.z.to(cpu, sdt)
            eye = torch.eye(d, dtype=sdt)
            while s < n_seg:
                if not bool(finite[s]):
                    fallbacks, s = fallbacks + 1, s + 1
                    continue
                # refresh on the prefix < s: warm-started subspace steps in whitened coordinates
                # (drrl.linalg.subspace_iteration); a small ridge on G_q keeps its Cholesky defined for
                # prefixes shorter than d and ill-conditioned real queries
                gqr = gq[s].to(cpu)
                gqr = gqr + self.ONLINE_RIDGE * gqr.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] / d * eye
                try:
                    z_new, fb = subspace_iteration(gqr, gk[s].to(cpu), z, self.refresh_steps)
                except torch.linalg.LinAlgError:
                    fallbacks, s = fallbacks + 1, s + 1
                    continue
                qr_fallbacks += int(fb)
                fc["basis"] += self.n_kv_head * flops.whitened_refresh(d, self.r_max, self.refresh_steps)
                if not bool(torch.isfinite(z_new).all()):
                    fallbacks, s = fallbacks + 1, s + 1
                    continue
                z, refreshes = z_new, refreshes + 1
                version = (z.to(q.device), (gqr @ z).to(q.device))  # P_q = Z, P_k = G_q Z, frozen for the run
                new_version[s] = True
                # keep the version while the exact kept energy at every bucket stays within refresh_tol of its
                # value at the refresh (drrl.linalg.truncation_errors: the exact error of a stale basis)
                t, ref = s, None
                while t < n_seg:
                    c = min(t + (self.STATS_CHUNK if q.device.type == "cpu" else 4 * self.STATS_CHUNK), n_seg)
                    e, b = self._bucket_stats(gq[t:c], gk[t:c], None if gv is None else gv[t:c], *version)
                    fc["stats"] += (c - t) * self.n_kv_head * self._stats_flops(b is not None)
                    ref = e[0] if ref is None else ref
                    stop = ((ref - e).amax(-1) > self.refresh_tol).cpu() | ~finite[t:c]
                    stop[0] &= t != s
                    n_ok = int(stop.float().argmax()) if bool(stop.any()) else c - t
                    for j in range(t, t + n_ok):
                        seg_maps[j], decide[j], stats_done[j] = version, True, True
                    energy[t : t + n_ok] = e[:n_ok]
                    if b is not None:
                        bound[t : t + n_ok] = b[:n_ok]
                    t, stopped = t + n_ok, n_ok < c - t
                    if stopped:
                        break
                s = t
            if self.training:
                last = next((m for m in reversed(seg_maps) if m is not None), None)
                if last is not None:
                    self.z.copy_(last[0].to(self.z.dtype))

        # statistics of the executed maps, batched per basis version
        for s, t in _runs(seg_maps, new_version):
            if seg_maps[s] is not None and need_stats and not stats_done[s]:
                if self.causal:
                    e, b = self._bucket_stats(gq[s:t], gk[s:t], None if gv is None else gv[s:t], *seg_maps[s])
                    fc["stats"] += (t - s) * self.n_kv_head * self._stats_flops(b is not None)
                else:
                    e, b = self._calibration_stats(sdt, q.device, gv is not None, L)
                energy[s:t] = e
                if b is not None:
                    bound[s:t] = b
        bad = decide & ~(torch.isfinite(energy).all(1) & torch.isfinite(bound).all(1))
        if bad.any():  # a failed factorisation or non-finite statistics: full rank for that segment
            fallbacks += int(bad.sum())
            for j in bad.nonzero().flatten().tolist():
                seg_maps[j], decide[j] = None, False
            energy[bad], bound[bad] = 1.0, 0.0
        allowed = torch.ones_like(energy, dtype=torch.bool)
        if self.guard_eps is not None:
            allowed = bound <= self.guard_eps
            allowed[:, -1] |= ~allowed.any(1)  # nothing safe: r_max
        stats = SegmentStats(
            self.layer_idx, self.buckets, energy, bound, allowed, decide, self.step_count, row, seq_feats
        )
        t0 = time.perf_counter()
        choice = self.controller(stats).tolist()
        self._totals["time:controller"] += time.perf_counter() - t0
        buckets, decided, safe = self.buckets.tolist(), decide.tolist(), allowed.tolist()  # one transfer each
        ranks = []
        for j in range(n_seg):
            if not decided[j]:
                ranks.append(d if seg_maps[j] is None else self.r_max)
                continue
            c = int(choice[j])
            if not safe[j][c]:  # the guardrail overrides: nearest safe bucket above, else r_max
                c = next((i for i in range(c, len(buckets)) if safe[j][i]), len(buckets) - 1)
            ranks.append(buckets[c])
        blocks = [_Block(s, t, seg_maps[s]) for s, t in _runs(seg_maps, new_version)]
        return Plan(ranks, blocks, refreshes, fallbacks, stats, fc, qr_fallbacks=qr_fallbacks)

    # ----------------------------------------------------------------------------------- forward

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / math.sqrt(self.d_head)
        if q.shape[1] != self.n_head or k.shape[1] != self.n_kv_head or v.shape[1] != self.n_kv_head:
            raise ValueError(
                f"expected {self.n_head} query heads and {self.n_kv_head} key/value heads, got q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}, v {tuple(v.shape)}; set n_kv_head to the model's key/value heads"
            )
        if self._calibrating:
            with torch.no_grad():
                self.cal_gq += self._group_sum(gram(q.detach().double()).sum(0))
                self.cal_gk += gram(k.detach().double()).sum(0)
                self.cal_gv += gram(v.detach().double()).sum(0)
                self.cal_tokens += q.shape[0] * q.shape[2]
            return F.scaled_dot_product_attention(
                q, self._expand(k), self._expand(v), is_causal=self.causal, scale=scale
            )
        B, H, L, d = q.shape
        if B == 0 or L == 0:  # nothing to attend to: an empty output, as SDPA gives (no plan, no statistics)
            return v.new_zeros(B, H, L, v.shape[-1])
        if self.basis == "calibrated" and (not self.needs_stats or not self.causal):
            # the plan reads no token of the batch (a fixed rank, or a bidirectional layer, whose statistics are
            # those of the calibration Grams at this length): one plan, one decision per segment, for every row;
            # a learning controller gets one episode per batch, rewarded on the whole batch's fidelity
            plans = [self.plan(q[:1], k[:1], v[:1])]
            out = self._execute(q, k, v, plans[0], scale)
            if getattr(self.controller, "wants_reward", False):
                self._reward(plans[0], q, k, v, out, 0, scale)
        else:  # bases, statistics and ranks per sequence: row b never sees another row's tokens
            plans, outs = [], []
            for b in range(B):
                qb, kb, vb = q[b : b + 1], k[b : b + 1], v[b : b + 1]
                plans.append(self.plan(qb, kb, vb, row=b))
                outs.append(self._execute(qb, kb, vb, plans[-1], scale))
                if getattr(self.controller, "wants_reward", False):
                    self._reward(plans[-1], qb, kb, vb, outs[-1], b, scale)
            out = torch.cat(outs)
        self.last_plans, self.last_plan = plans, plans[0]
        self._totals["calls"] += 1
        if self.training:
            self.steps += 1
        return out

    def _execute(self, q, k, v, plan: Plan, scale: float) -> torch.Tensor:
        """Run ``plan`` on (B, H, L, d) q, k, v: one SDPA call per run of segments sharing a basis."""
        B, H, L, d = q.shape
        T = self.segment if self.causal else L
        outs, paths = [], set()
        fc = plan.flops
        for blk in plan.blocks:
            a, b = blk.s0 * T, min(blk.s1 * T, L)
            if blk.maps is None:
                qb, kb = q[:, :, a:b], self._expand(k[:, :, :b])
            else:
                pq, pk = (m.to(q.dtype) for m in blk.maps)
                ranks = plan.ranks[blk.s0 : blk.s1]
                w = max(ranks)
                pq = pq[..., :w] if self.group == 1 else pq[..., :w].repeat_interleave(self.group, 0)
                qb = torch.einsum("bhld,hdr->bhlr", q[:, :, a:b], pq)
                kb = self._expand(torch.einsum("bhld,hdr->bhlr", k[:, :, :b], pk[..., :w]))
                fc["maps"] += B * (H * flops.matmul(b - a, d, w) + self.n_kv_head * flops.matmul(b, d, w))
                if min(ranks) < w:  # zero the trailing columns of segments with a smaller rank
                    seg_r = torch.tensor(ranks, device=q.device).repeat_interleave(T)[: b - a]
                    qb = qb * (torch.arange(w, device=q.device) < seg_r[:, None]).to(qb.dtype)
            y, path, entries = _sdpa_lowrank(qb, kb, self._expand(v[:, :, :b]), a, scale, self.causal)
            outs.append(y)
            paths.add(path)
            width = d if path.startswith("sdpa-padded") else qb.shape[-1]
            plan.kernel_score_flops += B * H * 2 * width * entries
        for s, r in enumerate(plan.ranks):
            a, n = s * T, min(T, L - s * T)
            core = flops.attention_core(flops.causal_pairs(a, n, self.causal, L), r, d)
            fc.update({key: val * B * H for key, val in core.items()})
        fc["controller"] += len(plan.ranks) * self.controller.flops_per_decision(len(self.buckets))
        plan.path = "+".join(sorted(paths))
        self._record(plan, (B, H, L, d))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    @torch.no_grad()
    def _reward(self, plan: Plan, q, k, v, y, row: int, scale: float) -> None:
        """Score each executed decision against a full-rank teacher branch (training cost, counted) and
        report the rewards to the controller (drrl.rl.reward)."""
        B, H, L, d = q.shape
        T = self.segment if self.causal else L
        teacher = F.scaled_dot_product_attention(
            q, self._expand(k), self._expand(v), is_causal=self.causal, scale=scale
        )
        teacher_flops = sum(flops.full_attention(B, H, L, d, self.causal).values())
        plan.flops["teacher"] += teacher_flops
        self._totals["flops:teacher"] += teacher_flops
        fidelity = segment_fidelity(y, teacher, T)
        buckets, cfg = self.buckets.tolist(), self.controller.reward_cfg
        rewards = []
        for s, r in enumerate(plan.ranks):
            if not bool(plan.stats.decide[s]):
                continue
            bound = plan.stats.bound[s, buckets.index(r) if r in buckets else -1]
            # scale-free in [0, 1]: rows of A and Ã are distributions, so ‖A − Ã‖_F ≤ √(2·rows) on the prefix the
            # bound is measured on; raw bounds grow with the prefix and with the logits' scale and would swamp α, β
            # the bound is measured on one sequence's statistics (a GQA bound covers the group's stacked rows)
            rows = self.group * max(s * T, min(T, L))
            bound = (bound / math.sqrt(2 * rows)).clamp(max=1.0)
            cost = cost_ratio(r, d, s * T, min(T, L - s * T), self.causal)
            rewards.append(float(reward(fidelity[s], torch.tensor(cost), bound.cpu(), cfg)))
        self.controller.observe(row, rewards)

    def _record(self, plan: Plan, shape: tuple[int, ...]) -> None:
        t = self._totals
        B, H, L, d = shape
        T = self.segment if self.causal else L
        t["segments"] += len(plan.ranks)
        t["tokens"] += B * L
        t["rank_tokens"] += B * sum(r * min(T, L - i * T) for i, r in enumerate(plan.ranks))
        t["refreshes"] += plan.refreshes
        t["fallbacks"] += plan.fallbacks
        t["qr_fallbacks"] += plan.qr_fallbacks
        for i, r in enumerate(plan.ranks):  # per segment index: the rank decisions of this layer, logged
            t[f"seg_rank:{i}"] += B * r
            t[f"seg_n:{i}"] += B
        t.update({"flops:" + k: v for k, v in plan.flops.items()})
        t.update({"flops:full_" + k: v for k, v in flops.full_attention(B, H, L, d, self.causal).items()})

    def pop_stats(self, with_flops: bool = False) -> dict:
        """Counters since the last call: mean executed rank, refreshes and fallbacks (and, with ``with_flops``,
        the algorithmic FLOPs by category beside those of full attention at the same shapes, ``full_*``)."""
        t, self._totals = self._totals, Counter()
        if not t["segments"]:
            return {"hf_exact_calls": t["hf_exact_calls"]} if t["hf_exact_calls"] else {}
        out = {
            "mean_rank": t["rank_tokens"] / t["tokens"],  # token-weighted
            "segments": t["segments"],
            "tokens": t["tokens"],
            "refreshes": t["refreshes"],
            "fallbacks": t["fallbacks"],
            "qr_fallbacks": t["qr_fallbacks"],
            "calls": t["calls"],
            # Q·Kᵀ FLOPs saved against full attention at the same shapes (counted pairs, causal weighting)
            "score_flops_reduction": 1 - t["flops:scores"] / max(t["flops:full_scores"], 1),
            "hf_exact_calls": t["hf_exact_calls"],  # calls a Hugging Face wrapper ran exactly (padding, HF cache)
            # mean executed rank of each segment index (0, 1, ...) over the sequences since the last call
            "segment_ranks": [t[f"seg_rank:{i}"] / t[f"seg_n:{i}"] for i in range(_n_segments(t))],
        }
        if with_flops:  # host seconds in planning and in the controller (not in metrics: they are not reproducible)
            out["time"] = {k.removeprefix("time:"): v for k, v in t.items() if k.startswith("time:")}
            out["flops"] = {k.removeprefix("flops:"): v for k, v in t.items() if k.startswith("flops:")}
        return out

    # ----------------------------------------------------------------------------------- decode and export

    def _require_calibrated(self, what: str) -> None:
        if not bool(self.calibrated):
            raise RuntimeError(f"{what} needs calibrated maps; run forward passes inside calibrating(model) first")

    def new_cache(self, batch: int, capacity: int, *, dtype=None, device=None) -> LowRankKVCache:
        """An empty key/value cache whose keys live in this layer's calibrated basis (width r_max)."""
        self._require_calibrated("the low-rank decode cache")
        dtype = dtype or self.pq.dtype
        dev = device or self.pq.device
        return LowRankKVCache(batch, self.n_kv_head, capacity, self.r_max, self.d_head, dtype, dev)

    def append_to_cache(self, cache: LowRankKVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        """Project post-RoPE keys (B, H_kv, t, d) into the basis (pre-scaled by 1/√d) and append them with v."""
        kt = torch.einsum("bhld,hdr->bhlr", k, self.pk.to(k.dtype)) / math.sqrt(self.d_head)
        cache.append(kt, v)

    def decode_step(self, q: torch.Tensor, cache: LowRankKVCache, rank: int) -> torch.Tensor:
        """One query per sequence (B, H, 1, d) post-RoPE against the cache at ``rank`` -> (B, H, 1, d)."""
        if not 0 < rank <= self.r_max:
            raise ValueError(f"decode rank must be in 1..r_max={self.r_max}, got {rank}")
        if q.shape[-2] != 1:
            raise ValueError(f"decode_step takes one query per sequence, got {q.shape[-2]}; prefill with attend()")
        pq = self.pq[..., :rank].to(q.dtype)
        qt = torch.einsum("bhld,hdr->bhlr", q, pq if self.group == 1 else pq.repeat_interleave(self.group, 0))
        return cache.attend(qt, rank)

    def export(self, rank: int, *, fold: bool = False) -> ExportedLowRankAttention:
        """A fixed-rank copy with physically smaller maps (H, d, rank). ``fold=True`` folds the maps into
        q/k projections of width H·rank (only valid when the attention is used without RoPE)."""
        self._require_calibrated("export()")
        if self.group > 1:
            raise ValueError("export() supports multi-head attention only; a GQA layer keeps its drrl wrapper")
        if rank not in self.buckets.tolist():
            raise ValueError(f"rank must be one of the buckets {self.buckets.tolist()}, got {rank}")
        return ExportedLowRankAttention.from_drrl(self, rank, fold=fold)


def _n_segments(t: Counter) -> int:
    n = 0
    while t[f"seg_n:{n}"]:
        n += 1
    return n


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
        y = _sdpa_lowrank(qt, kt, v, 0, 1.0 / math.sqrt(dh), self.causal)[0]
        return self.proj(y.transpose(1, 2).reshape(B, L, D))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qt = torch.einsum("bhld,hdr->bhlr", q, self.pq.to(q.dtype))
        kt = torch.einsum("bhld,hdr->bhlr", k, self.pk.to(k.dtype))
        return _sdpa_lowrank(qt, kt, v, 0, 1.0 / math.sqrt(self.d_head), self.causal)[0]


def lowrank_modules(model: nn.Module) -> list[DynamicLowRankAttention]:
    return [m for m in model.modules() if isinstance(m, DynamicLowRankAttention)]


@contextmanager
def calibrating(model: nn.Module):
    """Accumulate post-RoPE query/key/value Grams of every drrl layer during the forward passes run
    inside the block (outputs are exact full attention), then fit the calibrated maps.

    >>> with calibrating(model):
    ...     for batch in batches:
    ...         model(batch)
    """
    mods = lowrank_modules(model)
    if not mods:
        raise ValueError("the model has no drrl attention layers to calibrate")
    for m in mods:
        for g in (m.cal_gq, m.cal_gk, m.cal_gv, m.cal_tokens):
            g.zero_()
        m._calibrating = True
    try:
        with torch.no_grad():
            yield mods
    finally:
        for m in mods:
            m._calibrating = False
    for m in mods:
        m.finish_calibration()


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
            r = plan.ranks[s]
            if blk.maps is None:
                qs, ks = q[:, :, a:b], k.repeat_interleave(g, 1)
            else:
                pq, pk = (m.to(q.dtype) for m in blk.maps)
                qs = torch.einsum("bhld,hdr->bhlr", q[:, :, a:b], pq[..., :r].repeat_interleave(g, 0))
                ks = torch.einsum("bhld,hdr->bhlr", k, pk[..., :r]).repeat_interleave(g, 1)
            scores = qs @ ks.transpose(-2, -1) / math.sqrt(d)  # (B, H, b - a, L)
            if causal:
                future = torch.arange(L, device=q.device)[None, :] > torch.arange(a, b, device=q.device)[:, None]
                scores = scores.masked_fill(future, float("-inf"))
            out[:, :, a:b] = scores.softmax(-1) @ vv
    return out
