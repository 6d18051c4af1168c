"""The RaNA method (Garcia et al. 2025): rank adapters on up and gate (or fc) and weight-norm neuron masking on
down (or out); the split of the MLP's budget between them is searched (fractions j/(6n), j = 3..9, n matrices)
on the MLP output error of calibration tokens; q, k, v share one basis and mask (stacked). Until the next
release this module also answers for the names that moved out of it (sites, calibration, ``apply_rana``,
reports and FLOP counting; see the end of the file).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from drrl.adapters.fitting import FitContext, _adapt_qkv, _Fit, _fit, _like
from drrl.adapters.layers import NeuronMaskedLinear, RankAdapter
from drrl.adapters.sites import (  # noqa: F401  (all but the site classes and _input_key: old paths)
    MLPSite,
    QKVSite,
    _Collector,
    _forward,
    _input_key,
    _modules_to_collect,
    collect,
    find_sites,
)
from drrl.linalg.adaptive_lowrank import allocate_many, top_fraction_thresholds


def adapt_mlp(site: MLPSite, cols, keep: float, ctx: FitContext) -> dict:
    """RaNA on an MLP site (registered in :mod:`drrl.adapters.registry`)."""
    return _adapt_mlp_rana(site, cols, keep, ctx.score_tokens, ctx.fits)


def adapt_qkv(site: QKVSite, cols, keep: float, ctx: FitContext) -> dict:
    """RaNA on stacked q/k/v: one masked rank adapter whose basis q, k and v share."""
    return _adapt_qkv(site, cols, keep, _rana_adapter, ctx.fits)


def _rana_adapter(lin: nn.Linear, fit: _Fit, keep: float):
    """The RaNA adapter of ``lin`` at one kept FLOP fraction (None where the budget does not pay for B)."""
    return _rana_adapters(lin, fit, [keep])[0]


def _rana_adapters(lin: nn.Linear, fit: _Fit, keeps: list[float]) -> list:
    """RaNA adapters for ``lin`` at each kept FLOP fraction (None where the budget does not pay for B)."""
    d_out, d_in = lin.out_features, lin.in_features
    bias = None if lin.bias is None else lin.bias.detach()
    ok = [k for k in keeps if k * d_out * d_in >= d_in]  # n_B = 1 must fit
    als = dict(zip(ok, allocate_many(fit.coeff_sq, fit.total, d_in, d_out, ok), strict=True)) if ok else {}
    out = []
    for k in keeps:
        al = als.get(k)
        out.append(None if al is None else (RankAdapter(fit.a[:, : al.n_b], fit.b[: al.n_b], al.tau, bias), {
            "n_b": al.n_b, "k_mean": al.k_mean, "tau": al.tau, "coverage": al.coverage,
        }))  # fmt: skip
    return out


def _clone_linear(lin: nn.Linear) -> nn.Linear:
    """A float32 copy (candidates are scored in float32; :func:`_like` casts the chosen one back)."""
    new = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    new.load_state_dict({k: v.float() for k, v in lin.state_dict().items()})
    return new.to(lin.weight.device)


def _split_grid(n: int) -> list[tuple[int, ...]]:
    """Budget splits over n matrices: fractions j/(6n), j = 3..9, summing to one (37 triples for n = 3)."""
    import itertools

    return [c for c in itertools.product(range(3, 10), repeat=n) if sum(c) == 6 * n]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).square().sum() / ref.square().sum().clamp(min=1e-30))


def _adapt_mlp_rana(site: MLPSite, cols, keep: float, score_tokens: int, fits: dict | None = None) -> dict:
    roles = list(site.linears)
    first, last = roles[:-1], roles[-1]  # gated: gate, up | down;  plain: fc | out
    x_col = cols[_input_key(site, first[0])]
    h_col = cols[_input_key(site, last)]
    x, h = x_col.rows, h_col.rows
    xs = x[:score_tokens]
    dev = site.get(last).weight.device
    dtype = site.get(last).weight.dtype
    ref = site.dense(xs.to(dev, dtype)).float()
    n = len(roles)
    grid = _split_grid(n)
    keeps = {j: min(1.0, n * keep * j / (6 * n)) for j in range(3, 10)}
    cand: dict[tuple[str, int], tuple[nn.Module, dict]] = {}
    outs: dict[tuple[str, int], torch.Tensor] = {}
    for role in first:
        lin = site.get(role)
        fit = _fit(lin, x_col.gram, x, fits, (site.name, role))
        masked = [j for j, kj in keeps.items() if kj < 1.0]
        built = dict(zip(masked, _rana_adapters(lin, fit, [keeps[j] for j in masked]), strict=True))
        for j, kj in keeps.items():
            c = (_clone_linear(lin), {"dense": True}) if kj >= 1.0 else built[j]
            if c is None:
                continue  # the budget does not even pay for B
            cand[role, j] = c
            outs[role, j] = c[0].eval()(xs.to(dev)).float()  # candidates are float32
    down = site.get(last)
    col_norm = down.weight.detach().float().norm(dim=0)
    scores = h.to(dev).abs() * col_norm
    taus = dict(zip(keeps, top_fraction_thresholds(scores, list(keeps.values())), strict=True))
    best = None
    for split in grid:
        js = dict(zip(roles, split, strict=True))
        if any((r, js[r]) not in outs for r in first):
            continue
        with torch.no_grad():
            hh = site.act(outs[first[0], js[first[0]]])
            if site.kind == "gated":
                hh = hh * outs["up", js["up"]]
            m = (hh.abs() * col_norm) >= taus[js[last]]
            y = F.linear(hh * m, down.weight.float(), None if down.bias is None else down.bias.float())
        err = _rel_err(y, ref)
        if best is None or err < best[0]:
            best = (err, js)
    if best is None:
        raise ValueError(f"{site.name}: the FLOPs ratio {keep} is too small for any rank adapter; raise it")
    err, js = best
    info = {"split": {r: js[r] / (6 * n) for r in roles}, "calib_rel_error": err}
    for role in first:
        mod, meta = cand[role, js[role]]
        site.set(role, _like(mod, down))
        info[role] = meta
    site.set(last, _like(NeuronMaskedLinear(down.weight.float(), taus[js[last]], down.bias), down))
    info[last] = {"tau": taus[js[last]], "keep": keeps[js[last]]}
    return info


# ------------------------------------------------------------------------------------------ old paths
# Names that lived here before the adapters room was split (one file per job). They resolve on first use:
# the method table (drrl.adapters.registry) imports this module, so importing them eagerly would be a cycle.
_MOVED = {
    "METHODS": "drrl.adapters.registry",
    "TARGETS": "drrl.adapters.registry",
    "CompressionReport": "drrl.adapters.model",
    "apply_rana": "drrl.adapters.model",
    "adapter_modules": "drrl.adapters.model",
    "reset_counts": "drrl.adapters.model",
    "measured_flops": "drrl.adapters.model",
    "_set_submodule": "drrl.adapters.model",
    "_undone_on_error": "drrl.adapters.model",
    "_adapt_mlp_cats": "drrl.adapters.cats",
    "_adapt_mlp_svd": "drrl.adapters.svd",
    "_svd_adapter": "drrl.adapters.svd",
}


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
