"""The static SVD baseline: truncation in the same data-aware bases as RaNA but with no mask, each MLP matrix
(and the stacked q/k/v) at the rank its share of the budget buys; at the whole budget a matrix stays dense
(a truncation at the dense cost is not full rank).
"""

from __future__ import annotations

from torch import nn

from drrl.adapters.fitting import FitContext, _adapt_qkv, _Fit, _fit, _like
from drrl.adapters.layers import RankAdapter
from drrl.adapters.sites import MLPSite, QKVSite, _input_key


def adapt_mlp(site: MLPSite, cols, keep: float, ctx: FitContext) -> dict:
    """Static SVD on an MLP site (registered in :mod:`drrl.adapters.registry`)."""
    return _adapt_mlp_svd(site, cols, keep, ctx.fits)


def adapt_qkv(site: QKVSite, cols, keep: float, ctx: FitContext) -> dict:
    """Static SVD on stacked q/k/v: one truncation whose basis q, k and v share."""
    return _adapt_qkv(site, cols, keep, _svd_adapter, ctx.fits)


def _svd_adapter(lin: nn.Linear, fit: _Fit, keep: float):
    """Static truncation keeping a fraction ``keep`` of ``lin``'s FLOPs: rank keep·d_out·d_in/(d_in + d_out)."""
    d_out, d_in = lin.out_features, lin.in_features
    r = max(1, min(fit.a.shape[1], int(keep * d_out * d_in / (d_in + d_out))))
    bias = None if lin.bias is None else lin.bias.detach()
    return RankAdapter(fit.a[:, :r], fit.b[:r], 0.0, bias), {"n_b": r, "k_mean": float(r)}


def _adapt_mlp_svd(site: MLPSite, cols, keep: float, fits: dict | None = None) -> dict:
    info = {}
    for role in site.linears:
        lin = site.get(role)
        if keep >= 1.0:  # the whole budget: dense (a truncation at the dense cost is not full rank)
            info[role] = {"dense": True}
            continue
        col = cols[_input_key(site, role)]
        mod, meta = _svd_adapter(lin, _fit(lin, col.gram, col.rows, fits, (site.name, role)), keep)
        site.set(role, _like(mod, lin))
        info[role] = meta
    return info
