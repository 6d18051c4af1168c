"""What every low-rank adapter method shares: fitting a linear's data-aware basis on its calibration inputs
(cached per model and calibration), putting a fitted module back on the layer's device and dtype, the stacked
q/k/v adaptation (one basis shared by q, k and v; the method supplies the adapter), and the context that
:func:`~drrl.adapters.model.apply_rana` hands each method besides the site, its inputs and the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from drrl.adapters.layers import SharedBasis, SharedRankSlice
from drrl.adapters.sites import QKVSite
from drrl.linalg.adaptive_lowrank import data_aware_basis


@dataclass
class FitContext:
    """What a method's ``adapt_mlp``/``adapt_qkv`` get besides the site, the collectors and the kept fraction."""

    score_tokens: int  # sampled tokens that score candidate adapters (RaNA's MLP budget splits)
    fits: dict | None  # the basis cache (``cache["fits"]`` of apply_rana), or None
    qkv_dense: bool  # q/k/v stay dense (the method has no q/k/v form), so the MLPs carry the whole cut


@dataclass
class _Fit:
    """A linear's data-aware basis and the squared coordinates of its sampled inputs."""

    a: torch.Tensor
    b: torch.Tensor
    coeff_sq: torch.Tensor  # (N, r)
    total: float  # Σ‖W x‖² over the sample


def _fit(lin: nn.Linear, gram: torch.Tensor, x: torch.Tensor, fits: dict | None = None, key=None) -> _Fit:
    """The basis of ``lin`` (cached in ``fits`` under ``key`` when given: it depends on weights and data only)."""
    if fits is not None and key in fits:
        return fits[key]
    fit = _fit_uncached(lin, gram, x)
    if fits is not None:
        fits[key] = fit
    return fit


def _like(module: nn.Module, lin: nn.Module) -> nn.Module:
    """``module`` (fitted in float32) on ``lin``'s device and in its dtype."""
    module = module.to(lin.weight.device)
    return module if lin.weight.dtype == torch.float32 else module.to(lin.weight.dtype)


def _fit_uncached(lin: nn.Linear, gram: torch.Tensor, x: torch.Tensor) -> _Fit:
    w = lin.weight.detach().float()
    g = gram.to(w.device)
    # a tiny relative ridge: with fewer calibration tokens than inputs, the Gram's null space would give
    # arbitrary (useless) trailing components; the ridge orders them by W's own energy instead
    g = g + 1e-6 * g.diagonal().sum() / g.shape[0] * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    a, b, _ = data_aware_basis(w, g)
    x = x.to(w.device, w.dtype)
    return _Fit(a, b, (x @ b.T).square(), float((x @ w.T).square().sum()))


def _adapt_qkv(site: QKVSite, cols, keep: float, build: Callable, fits: dict | None = None) -> dict:
    """Adapt q, k and v stacked as one linear: ``build(stacked, fit, keep)`` gives the method's rank adapter
    and its report (or None where the budget does not pay for one basis row); q, k and v then share its basis."""
    lins = site.linears()
    if keep >= 1.0:  # the whole budget: dense
        return {"dense": True}
    col = cols[f"{site.name}:qkv"]
    w = torch.cat([m.weight.detach().float() for m in lins])
    biases = [m.bias for m in lins]
    stacked = nn.Linear(w.shape[1], w.shape[0], bias=biases[0] is not None).to(w.device)
    with torch.no_grad():
        stacked.weight.copy_(w)
        if biases[0] is not None:
            stacked.bias.copy_(torch.cat([b.detach().float() for b in biases]))
    fit = _fit(stacked, col.gram, col.rows, fits, (site.name, "qkv"))
    built = build(stacked, fit, keep)
    if built is None:
        raise ValueError(f"{site.name}: the FLOPs ratio {keep} does not pay for one basis row; raise it")
    adapter, meta = built
    if len(lins) == 1:
        setattr(site.parent, site.attrs[0], _like(adapter, lins[0]))
        return meta
    basis = _like(SharedBasis(adapter.b, float(adapter.tau), adapter.out_features), lins[0])
    lo = 0
    for attr, lin in zip(site.attrs, lins, strict=True):
        hi = lo + lin.out_features
        bias = None if adapter.bias is None else adapter.bias[lo:hi]
        setattr(site.parent, attr, _like(SharedRankSlice(basis, adapter.a[lo:hi], bias), lin))
        lo = hi
    return meta
