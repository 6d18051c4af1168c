"""Bases of the rank-r score maps: calibration (Grams accumulated over calibration passes, then the exact
Eckart–Young maps), the kept energy and guardrail bound of a basis at every bucket, and the online basis that
is refreshed from a sequence's prefix Grams when the one in use has gone stale."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from drrl import flops
from drrl.linalg import lowrank_score_maps, spectral_norm_bounds, subspace_iteration, truncation_errors

if TYPE_CHECKING:
    from drrl.attention.drrl.plan import Draft

log = logging.getLogger(__name__)


class BasisMixin:
    """The basis half of :class:`~drrl.attention.drrl.DynamicLowRankAttention`: calibration and statistics."""

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

    def _refresh_online(self, dr: Draft, gq, gk, gv, finite: torch.Tensor, device, sdt, warm: torch.Tensor) -> None:
        """Online bases for segments 1.. of ``dr``: segment s gets a basis refreshed on the prefix Grams < s when
        the version in use is stale, kept while the exact kept energy at every bucket stays within
        ``refresh_tol`` of its value at the refresh (drrl.linalg.truncation_errors: the exact error of a stale
        basis). Each refresh is two warm-started subspace steps; the last version warm-starts the next call.

        Refreshes factorise a few (H, d, d) matrices: latency-bound on a GPU (cuSOLVER calls cost ~1 ms each),
        so they run on the CPU; statistics and attention stay on the device."""
        n_seg, d = len(dr.seg_maps), self.d_head
        cpu = torch.device("cpu")
        s, z = 1, warm.to(cpu, sdt)
        eye = torch.eye(d, dtype=sdt)
        while s < n_seg:
            if not bool(finite[s]):
                dr.fallbacks, s = dr.fallbacks + 1, s + 1
                continue
            # refresh on the prefix < s: warm-started subspace steps in whitened coordinates
            # (drrl.linalg.subspace_iteration); a small ridge on G_q keeps its Cholesky defined for
            # prefixes shorter than d and ill-conditioned real queries
            gqr = gq[s].to(cpu)
            gqr = gqr + self.ONLINE_RIDGE * gqr.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] / d * eye
            try:
                z_new, fb = subspace_iteration(gqr, gk[s].to(cpu), z, self.refresh_steps)
            except torch.linalg.LinAlgError:
                dr.fallbacks, s = dr.fallbacks + 1, s + 1
                continue
            dr.qr_fallbacks += int(fb)
            dr.fc["basis"] += self.n_kv_head * flops.whitened_refresh(d, self.r_max, self.refresh_steps)
            if not bool(torch.isfinite(z_new).all()):
                dr.fallbacks, s = dr.fallbacks + 1, s + 1
                continue
            z, dr.refreshes = z_new, dr.refreshes + 1
            version = (z.to(device), (gqr @ z).to(device))  # P_q = Z, P_k = G_q Z, frozen for the run
            dr.new_version[s] = True
            s = self._keep_version(dr, s, version, gq, gk, gv, finite, device)

    def _keep_version(self, dr: Draft, s: int, version, gq, gk, gv, finite, device) -> int:
        """Assign ``version`` (refreshed at segment s) to segments s, s+1, ... while it stays fresh, measuring
        their statistics in chunks; returns the first segment that needs a new refresh."""
        n_seg = len(dr.seg_maps)
        t, ref = s, None
        while t < n_seg:
            c = min(t + (self.STATS_CHUNK if device.type == "cpu" else 4 * self.STATS_CHUNK), n_seg)
            e, b = self._bucket_stats(gq[t:c], gk[t:c], None if gv is None else gv[t:c], *version)
            dr.fc["stats"] += (c - t) * self.n_kv_head * self._stats_flops(b is not None)
            ref = e[0] if ref is None else ref
            stop = ((ref - e).amax(-1) > self.refresh_tol).cpu() | ~finite[t:c]
            stop[0] &= t != s
            n_ok = int(stop.float().argmax()) if bool(stop.any()) else c - t
            for j in range(t, t + n_ok):
                dr.seg_maps[j], dr.decide[j], dr.stats_done[j] = version, True, True
            dr.energy[t : t + n_ok] = e[:n_ok]
            if b is not None:
                dr.bound[t : t + n_ok] = b[:n_ok]
            t, stopped = t + n_ok, n_ok < c - t
            if stopped:
                break
        return t


def lowrank_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BasisMixin)]


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
