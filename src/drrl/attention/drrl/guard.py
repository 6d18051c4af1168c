"""The guardrail's certificate: after a run of segments executed at rank r, a bound on each query row's output
error, computed causally and exactly enough to be a guarantee; rows above the guard are recomputed at full rank.

Row i (position p_i) of a head, executed with maps P_q, P_k at rank r, has the logit error
Δs_i = scale · u_i K_{≤p_i}ᵀ with u_i = q_i (I − P_q P_kᵀ) (the part of the query the rank-r product loses). Row
softmax is ½-Lipschitz in ℓ2 (its Jacobian diag(p) − ppᵀ has spectral norm ≤ ½; a causal mask removes entries on
both sides), so

    ‖o_i − õ_i‖₂ = ‖(p_i − p̃_i) V_{≤p_i}‖₂ ≤ ½ · ‖Δs_i‖₂ · ‖V_{≤p_i}‖₂,

and the relative certificate c_i = ½ · scale · ‖u_i K_{≤p_i}ᵀ‖₂ gives ‖o_i − õ_i‖₂ ≤ c_i · ‖V_{≤p_i}‖₂. It is exact from
the keys before the segment (their Gram G, so u_i G u_iᵀ) and the segment's own keys up to p_i ((u_i · k_j)²):
O(d²) + O(T·d) per row, never an (L, L) product, and causal (row i reads keys and values ≤ p_i only). Rows with
c_i > ε are recomputed at full rank, so every row of the output satisfies ‖o_i − õ_i‖₂ ≤ ε · ‖V_{≤p_i}‖₂.
"""

from __future__ import annotations

from collections import Counter

import torch

from drrl import flops
from drrl.attention.drrl.kernels import attend_offset


@torch.no_grad()
def row_certificates(u: torch.Tensor, k: torch.Tensor, gk: torch.Tensor, scale: float) -> torch.Tensor:
    """c_i = ½·scale·‖u_i K_{≤p_i}ᵀ‖₂ for the rows of one segment: ``u`` (B, H, n, d) lost query parts, ``k``
    (B, H, n, d) the segment's keys (position of row i = position of key i), ``gk`` (B, H, d, d) the Gram of the keys
    before the segment. Returns (B, H, n), in ``u``'s dtype."""
    quad = torch.einsum("bhid,bhde,bhie->bhi", u, gk, u)
    inner = (u @ k.transpose(-2, -1)).tril()  # (u_i · k_j) for j ≤ i
    return 0.5 * scale * (quad + inner.square().sum(-1)).clamp(min=0).sqrt()


def certify_run(layer, q, k, v, y, a: int, e: int, r: int, pq_h, pk, scale: float, gk, fc: Counter):
    """Certify rows [a, e) of ``y`` (B, H, e − a, d_v), executed at rank ``r`` with maps ``pq_h`` (H, d, ≥r, one per
    query head) and ``pk`` (H_kv, d, ≥r): segment by segment, certificates from the running key Gram ``gk``
    (B, H_kv, d, d, keys before ``a``; advanced to ``e``), rows above ``layer.guard_eps`` recomputed at full rank.
    Returns (y, gk, rows recomputed); FLOPs go to ``fc`` ("guard" for the certificates, the recomputed segments'
    attention at full width to the usual categories)."""
    B, H, L, d = q.shape
    T, eps, dt = layer.segment, layer.guard_eps, gk.dtype
    pk_h = pk[..., :r] if layer.group == 1 else pk[..., :r].repeat_interleave(layer.group, 0)
    y, n_bad = y.clone(), 0
    for t in range(a, e, T):
        t2 = min(t + T, e)
        qs, ks = q[:, :, t:t2].to(dt), k[:, :, t:t2].to(dt)
        u = qs - torch.einsum("bhlr,hdr->bhld", torch.einsum("bhld,hdr->bhlr", qs, pq_h[..., :r].to(dt)), pk_h.to(dt))
        cert = row_certificates(u, layer._expand(ks), layer._expand(gk), scale)
        n = t2 - t
        fc["guard"] += B * H * (2 * flops.matmul(n, d, r) + flops.matmul(n, d, d) + 2 * n * d + 2 * n * n * d)
        bad = cert > eps
        if bool(bad.any()):
            exact = attend_offset(q[:, :, t:t2], layer._expand(k[:, :, :t2]), layer._expand(v[:, :, :t2]), t, scale)
            y[:, :, t - a : t2 - a] = torch.where(bad[..., None], exact.to(y.dtype), y[:, :, t - a : t2 - a])
            core = flops.attention_core(flops.causal_pairs(t, n, True, L), d, d)
            fc.update({key: val * B * H for key, val in core.items()})
            n_bad += int(bad.sum())
        gk = gk + ks.transpose(-2, -1) @ ks
    return y, gk, n_bad
