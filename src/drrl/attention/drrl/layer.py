"""The DR-RL attention layer: configuration, buffers, and each forward pass (plan per sequence, each segment at its
own rank with one SDPA call per run of equal ranks, feedback to a learning controller, counters); decode and export
entry points. Calibration and statistics live in :mod:`.basis`, planning in :mod:`.plan`, kernels in :mod:`.kernels`."""

from __future__ import annotations

import math
from collections import Counter
from functools import partial

import torch
import torch.nn.functional as F

from drrl import flops
from drrl.attention.base import Attention, check_int, check_real, register_attention
from drrl.attention.drrl.basis import BasisMixin
from drrl.attention.drrl.cache import ExportedLowRankAttention, LowRankKVCache
from drrl.attention.drrl.guard import certify_run
from drrl.attention.drrl.kernels import sdpa_lowrank
from drrl.attention.drrl.plan import Plan, PlanMixin
from drrl.attention.drrl.sensitivity import add_squared_grad, segment_error
from drrl.controllers import Feedback, PendingController, RankController, controller_class
from drrl.controllers.base import cost_ratio, segment_fidelity
from drrl.linalg import gram

BASIS_MODES = ("calibrated", "online")


@register_attention("drrl")
class DynamicLowRankAttention(BasisMixin, PlanMixin, Attention):
    """Dynamic low-rank multi-head self-attention (DR-RL).

    Args:
        d_model, n_head, causal, bias: as :class:`~drrl.attention.base.Attention`.
        r_max: width of the per-head bases (default d_head); ranks never exceed it.
        bucket: ranks are multiples of ``bucket`` up to r_max (r_max itself is always a bucket).
        segment: tokens per rank decision T (causal mode; a non-causal encoder makes one decision per batch:
            its statistics are the calibration's, the same for every sequence of a length).
        basis: ``"online"`` (prefix statistics, causal only) or ``"calibrated"``.
        controller: a registered rank controller (drrl.controllers): ``"energy"`` (smallest bucket keeping ≥
            ``tau`` of the score energy), ``"fixed"``
            (``rank``), ``"random"`` (``seed``), ``"rl"`` (a learned policy the model installs, shared by
            its layers); :meth:`set_controller` installs any
            :class:`~drrl.controllers.RankController` (e.g. a learned policy).
        guard_eps: the guardrail (None: off). Before the choice, ranks whose bound on the relative output error,
            measured on the prefix (a prediction for the segment), exceeds it are masked; after execution every
            query row of a causal layer is certified (drrl.attention.drrl.guard) and rows whose bound exceeds it
            are recomputed at full rank, so ‖o_i − õ_i‖₂ ≤ guard_eps · ‖V_{≤i}‖₂ holds for every row.
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
        ctrl_cls = controller_class(controller)
        if ctrl_cls.shared:  # one instance for all the model's layers, built by attach_controller
            ctrl = PendingController(controller)
        else:
            ctrl = ctrl_cls.from_options({"rank": rank, "tau": tau, "seed": seed}, buckets)
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
        # (H, d) diagonal Fisher of the model's next-token distribution with respect to this layer's attention output
        # (drrl.attention.drrl.sensitivity): when set, the feedback estimates each decision's KL cost from it
        self.register_buffer("output_fisher", None, persistent=False)
        self._fisher_acc: list | None = None  # [Σ g², tokens] while measuring_output_fisher() runs
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
            if self.controller.wants_feedback:
                self._feedback(plans[0], q, k, v, out, 0, scale)
        else:  # bases, statistics and ranks per sequence: row b never sees another row's tokens
            plans, outs = [], []
            warm = self.z.clone()  # every row warm-starts from the basis of the previous call, none from a row's
            for b in range(B):
                qb, kb, vb = q[b : b + 1], k[b : b + 1], v[b : b + 1]
                plans.append(self.plan(qb, kb, vb, row=b, warm=warm))
                outs.append(self._execute(qb, kb, vb, plans[-1], scale))
                if self.controller.wants_feedback:
                    self._feedback(plans[-1], qb, kb, vb, outs[-1], b, scale)
            out = torch.cat(outs)
            last = plans[-1].last_basis
            if self.training and last is not None:  # the next call starts where this batch's last row ended
                self.z.copy_(last.to(self.z.device, self.z.dtype))
        self.last_plans, self.last_plan = plans, plans[0]
        if self._fisher_acc is not None and out.requires_grad:
            out.register_hook(partial(add_squared_grad, self._fisher_acc))
        self._totals["calls"] += 1
        if self.training:
            self.steps += 1
        return out

    def _execute(self, q, k, v, plan: Plan, scale: float) -> torch.Tensor:
        """Run ``plan`` on (B, H, L, d) q, k, v: each segment at its own rank. Per run of segments sharing a basis,
        the keys are projected once at the run's largest rank (the basis columns are ordered by singular value, so
        a smaller rank is a slice); consecutive segments of equal rank share one SDPA call. With per-head ranks each
        key/value head's group of query heads runs at its own rank (one call per group where the ranks differ)."""
        B, H, L, d = q.shape
        T = self.segment if self.causal else L
        outs, paths = [], set()
        fc = plan.flops
        certify = self.guard_eps is not None and self.causal
        if certify:  # the running Gram of the keys before the run being certified (drrl.attention.drrl.guard)
            sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
            gk, gpos = q.new_zeros(B, self.n_kv_head, d, d, dtype=sdt), 0
        per_head = plan.head_ranks is not None
        for blk in plan.blocks:
            b = min(blk.s1 * T, L)
            if blk.maps is None:
                runs = [(blk.s0, blk.s1, d)]
                kb = self._expand(k[:, :, :b])
            else:
                pq, pk = (m.to(q.dtype) for m in blk.maps)
                w = max(plan.ranks[blk.s0 : blk.s1])
                kb = self._expand(torch.einsum("bhld,hdr->bhlr", k[:, :, :b], pk[..., :w]))
                fc["maps"] += B * self.n_kv_head * flops.matmul(b, d, w)
                pq = pq if self.group == 1 else pq.repeat_interleave(self.group, 0)
                runs = _equal_runs((plan.head_ranks if per_head else plan.ranks)[blk.s0 : blk.s1], blk.s0)
            vb = self._expand(v[:, :, :b])
            for s0, s1, r in runs:
                a, e = s0 * T, min(s1 * T, L)
                g = self.group
                groups = (
                    [(0, H, r if isinstance(r, int) else r[0])]
                    if isinstance(r, int) or len(set(r)) == 1
                    else [(j * g, (j + 1) * g, rj) for j, rj in enumerate(r)]
                )
                ys = []
                for h0, h1, rr in groups:
                    nh = B * (h1 - h0)
                    if blk.maps is None:
                        qr, kr = q[:, h0:h1, a:e], kb[:, h0:h1, :e]
                    else:
                        qr = torch.einsum("bhld,hdr->bhlr", q[:, h0:h1, a:e], pq[h0:h1, :, :rr])
                        kr = kb[:, h0:h1, :e, :rr]
                        fc["maps"] += nh * flops.matmul(e - a, d, rr)
                    y, path, entries = sdpa_lowrank(qr, kr, vb[:, h0:h1, :e], a, scale, self.causal)
                    ys.append(y)
                    paths.add(path)
                    width = d if path.startswith("sdpa-padded") else qr.shape[-1]
                    plan.kernel_score_flops += nh * 2 * width * entries
                    # executed: the width the q/k products really have (the CPU kernel's zero padding is in kernel_*)
                    core = flops.attention_core(flops.causal_pairs(a, e - a, self.causal, L), qr.shape[-1], d)
                    fc.update({key: val * nh for key, val in core.items()})
                y = ys[0] if len(ys) == 1 else torch.cat(ys, 1)
                if certify and blk.maps is not None:  # per-head ranks never reach here (_ranks_of refuses the guard)
                    kk = k[:, :, gpos:a].to(sdt)
                    gk = gk + kk.transpose(-2, -1) @ kk
                    y, gk, bad = certify_run(self, q, k, v, y, a, e, groups[0][2], pq, blk.maps[1], scale, gk, fc)
                    gpos, plan.guard_rows = e, plan.guard_rows + bad
                outs.append(y)
        for s, r in enumerate(plan.ranks):  # planned: what the counted ranks promise
            a, n = s * T, min(T, L - s * T)
            pairs = flops.causal_pairs(a, n, self.causal, L)
            heads = [(H, r)] if not per_head else [(self.group, rj) for rj in plan.head_ranks[s]]
            plan.planned_score_flops += sum(B * nh * flops.attention_core(pairs, rj, d)["scores"] for nh, rj in heads)
        fc["controller"] += len(plan.ranks) * self.controller.flops_per_decision(len(self.buckets))
        plan.path = "+".join(sorted(paths))
        self._record(plan, (B, H, L, d))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    @torch.no_grad()
    def _feedback(self, plan: Plan, q, k, v, y, row: int, scale: float) -> None:
        """Measure each executed decision against a full-rank teacher branch (a training cost, counted) and
        hand the controller its :class:`~drrl.controllers.Feedback`: fidelity, cost ratio and bound."""
        B, H, L, d = q.shape
        T = self.segment if self.causal else L
        err = None
        if getattr(self.controller, "needs_teacher", True):
            teacher = F.scaled_dot_product_attention(
                q, self._expand(k), self._expand(v), is_causal=self.causal, scale=scale
            )
            teacher_flops = sum(flops.full_attention(B, H, L, d, self.causal).values())
            plan.flops["teacher"] += teacher_flops
            self._totals["flops:teacher"] += teacher_flops
            fidelity = segment_fidelity(y, teacher, T)
            if self.output_fisher is not None:  # the estimated KL this layer's error costs, per segment and KV head
                err_h = segment_error(y, teacher, self.output_fisher, T)
                err_h = err_h if self.group == 1 else err_h.unflatten(1, (self.n_kv_head, self.group)).sum(2)
                err = err_h.sum(1)
                plan.flops["teacher"] += 4 * y.numel()  # difference, square, weight, sum: counted with the teacher
                self._totals["flops:teacher"] += 4 * y.numel()
        else:  # the controller measures fidelity elsewhere (the model's output distribution)
            fidelity = torch.full((len(plan.ranks),), float("nan"))
        buckets, mean = self.buckets.tolist(), plan.mean_ranks()
        fb = Feedback(row, [], [], [])
        for s, r in enumerate(plan.ranks):
            if not bool(plan.stats.decide[s]):
                continue
            bound = plan.stats.bound[s, buckets.index(r) if r in buckets else -1]
            # scale-free in [0, 1]: rows of A and Ã are distributions, so ‖A − Ã‖_F ≤ √(2·rows) on the prefix the
            # bound is measured on; raw bounds grow with the prefix and with the logits' scale and would swamp α, β
            # the bound is measured on one sequence's statistics (a GQA bound covers the group's stacked rows)
            rows = self.group * max(s * T, min(T, L))
            fb.fidelity.append(fidelity[s])
            if err is not None:
                fb.error.append(err[s].cpu())
                fb.head_error.append(err_h[s].cpu())
            fb.cost.append(cost_ratio(mean[s], d, s * T, min(T, L - s * T), self.causal))
            fb.rank_fraction.append(mean[s] / d)
            fb.pairs.append(flops.causal_pairs(s * T, min(T, L - s * T), self.causal, L))
            fb.bound.append((bound / math.sqrt(2 * rows)).clamp(max=1.0).cpu())
        self.controller.observe(fb)

    def _record(self, plan: Plan, shape: tuple[int, ...]) -> None:
        t = self._totals
        B, H, L, d = shape
        T = self.segment if self.causal else L
        t["segments"] += len(plan.ranks)
        t["tokens"] += B * L
        mean = plan.mean_ranks()  # per-head ranks: their mean (the executed rank of the segment)
        top = max(max(h) for h in plan.head_ranks) if plan.head_ranks is not None else max(plan.ranks)
        t["max_rank"] = max(t["max_rank"], top)  # the widest key any head read (a key cache's width)
        t["rank_tokens"] += B * sum(r * min(T, L - i * T) for i, r in enumerate(mean))
        t["refreshes"] += plan.refreshes
        t["fallbacks"] += plan.fallbacks
        t["qr_fallbacks"] += plan.qr_fallbacks
        t["guard_rows"] += plan.guard_rows
        t["planned_scores"] += plan.planned_score_flops
        for i, r in enumerate(mean):  # per segment index: the rank decisions of this layer, logged
            t[f"seg_rank:{i}"] += B * r
            t[f"seg_n:{i}"] += B
        t.update({"flops:" + k: v for k, v in plan.flops.items()})
        t.update({"flops:full_" + k: v for k, v in flops.full_attention(B, H, L, d, self.causal).items()})

    def pop_stats(self, with_flops: bool = False) -> dict:
        """Counters since the last call: mean executed rank, refreshes and fallbacks (and, with ``with_flops``,
        the algorithmic FLOPs by category beside those of full attention at the same shapes, ``full_*``)."""
        t, self._totals = self._totals, Counter()
        if not t["segments"]:
            return {k: t[k] for k in ("hf_exact_calls", "hf_cache_calls", "hf_cache_capped") if t[k]}
        out = {
            "mean_rank": t["rank_tokens"] / t["tokens"],  # token-weighted
            "max_rank": t["max_rank"],  # the largest rank any head of any segment ran at
            "segments": t["segments"],
            "tokens": t["tokens"],
            "refreshes": t["refreshes"],
            "fallbacks": t["fallbacks"],
            "qr_fallbacks": t["qr_fallbacks"],
            "guard_rows": t["guard_rows"],  # query rows (per head) the guard's certificate sent back to full rank
            "calls": t["calls"],
            # Q·Kᵀ FLOPs saved against full attention at the same shapes (counted pairs, causal weighting): as
            # executed (the widths the products run at), and as planned (the ranks decided; equal since every
            # segment runs at its own rank, kept so that a regression shows)
            "score_flops_reduction": 1 - t["flops:scores"] / max(t["flops:full_scores"], 1),
            "planned_score_flops_reduction": 1 - t["planned_scores"] / max(t["flops:full_scores"], 1),
            "planned_score_flops": t["planned_scores"],
            "hf_exact_calls": t["hf_exact_calls"],  # calls a Hugging Face wrapper ran exactly (padding, HF cache)
            "hf_cache_calls": t["hf_cache_calls"],  # calls against keys kept at rank (drrl.integrations.cache)
            "hf_cache_capped": t["hf_cache_capped"],  # of their (segment, head group) runs, those capped at its width
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


def _equal_runs(ranks: list, start: int) -> list[tuple]:
    """Maximal runs (s0, s1, rank) of consecutive segments with the same rank (an int, or a tuple of per-head
    ranks); segment indices from ``start``."""
    runs = []
    for i, r in enumerate(ranks):
        if runs and runs[-1][2] == r:
            runs[-1] = (runs[-1][0], start + i + 1, r)
        else:
            runs.append((start + i, start + i + 1, r))
    return runs


def _n_segments(t: Counter) -> int:
    n = 0
    while t[f"seg_n:{n}"]:
        n += 1
    return n
