"""Compress a whole model in place at a FLOP budget and account for it: :func:`apply_rana` finds the sites,
collects calibration inputs, and adapts every site with the chosen method from the table in
:mod:`drrl.adapters.registry` (undone if anything fails); the report says what each site got, and
:func:`measured_flops` compares what the adapters executed with the dense cost. The budget ``flops_ratio`` is
the kept fraction of the FLOPs of the adapted layers (every targeted MLP and q/k/v linear; o_proj and the
attention itself stay dense), the same for every layer (uniform, as in RaNA's code).

>>> report = apply_rana(model, flops_ratio=0.56, calibration=batches)   # 44% fewer adapted-layer FLOPs
>>> model(ids)                                                          # adapted in place
>>> measured_flops(model, report)["ratio"]                              # measured on what ran since
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from drrl.adapters.fitting import FitContext
from drrl.adapters.layers import NeuronAdapterMLP, NeuronMaskedLinear, RankAdapter, SharedBasis
from drrl.adapters.registry import ADAPTERS, TARGETS, Method
from drrl.adapters.sites import _modules_to_collect, collect, find_sites
from drrl.progress import progress as progress_bar

log = logging.getLogger(__name__)


@dataclass
class CompressionReport:
    method: str
    flops_ratio: float
    targets: str
    sites: dict[str, dict] = field(default_factory=dict)
    dense_flops_per_token: float = 0.0  # of the adapted set (every targeted MLP and q/k/v linear)


def _undone_on_error(fn):
    """Decorate ``fn(model, ...)``: if it raises, the model's submodules and training mode are put back."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args, **kwargs):
        saved = [(m, dict(m._modules)) for m in model.modules()]
        was_training = model.training
        try:
            return fn(model, *args, **kwargs)
        except BaseException:
            for m, children in saved:
                m._modules.clear()
                m._modules.update(children)
            model.train(was_training)
            raise

    return wrapper


@_undone_on_error
def apply_rana(
    model: nn.Module,
    flops_ratio: float,
    calibration: Iterable,
    *,
    method: str = "rana",
    targets: str = "mlp+qkv",
    sample_tokens: int = 2048,
    score_tokens: int = 512,
    seed: int = 0,
    progress: bool = False,
    cache: dict | None = None,
) -> CompressionReport:
    """Replace the model's MLPs (and q/k/v projections) in place by adapters keeping ``flops_ratio`` of their
    FLOPs, fitted on ``calibration`` (an iterable of token-id tensors (B, L) or keyword dicts for the model).

    ``sample_tokens`` input rows per linear (a uniform sample of the calibration tokens) set thresholds and
    allocations; ``score_tokens`` of them score the MLP budget splits. Input Grams use every token.
    ``cache`` (a dict, empty at first) keeps the calibration statistics and bases between calls on copies of
    the same model with the same calibration data (methods and ratios then refit in seconds); the caller
    owns that promise. On an error (e.g. a FLOPs ratio too small for some site) the model is left as it was.
    """
    _check_arguments(flops_ratio, method, targets, sample_tokens, score_tokens)
    mlps, qkvs = find_sites(model)
    names = {id(m): n for n, m in model.named_modules()}
    if targets == "mlp+qkv" and not qkvs:
        raise ValueError(f"no q/k/v projections found in {type(model).__name__}; use targets='mlp'")
    was_training = model.training
    model.eval()
    mods = _modules_to_collect(mlps, qkvs, targets)
    cols, fits = _calibration_stats(model, mods, calibration, sample_tokens, seed, progress, cache)
    adapter = ADAPTERS[method]
    mlp_flops = sum(s.dense_flops() for s in mlps)
    qkv_flops = sum(s.dense_flops() for s in qkvs) if targets == "mlp+qkv" else 0.0
    rep = CompressionReport(method, flops_ratio, targets, dense_flops_per_token=mlp_flops + qkv_flops)
    mlp_keep = flops_ratio
    if adapter.adapt_qkv is None and qkv_flops:  # no q/k/v adapter: the MLPs carry the whole budget
        mlp_keep = (flops_ratio * (mlp_flops + qkv_flops) - qkv_flops) / mlp_flops
        log.info("%s: q/k/v stay dense; MLPs keep %.3f of their FLOPs", method, mlp_keep)
    ctx = FitContext(score_tokens, fits, qkv_dense=adapter.adapt_qkv is None and qkv_flops > 0)
    with torch.no_grad():  # fitting only
        todo = [("mlp", s) for s in mlps] + ([("qkv", s) for s in qkvs] if targets == "mlp+qkv" else [])
        for kind, site in progress_bar(todo, desc=f"fit {method}", unit="site", disable=not progress, leave=False):
            keep = mlp_keep if kind == "mlp" else flops_ratio
            rep.sites[f"{kind}:{site.name}"] = _adapt_site(model, names, adapter, kind, site, cols, keep, ctx)
    model.train(was_training)
    reset_counts(model)
    return rep


def _check_arguments(flops_ratio: float, method: str, targets: str, sample_tokens: int, score_tokens: int) -> None:
    methods = tuple(ADAPTERS)
    if method not in methods:
        raise ValueError(f"method must be one of {', '.join(methods)}, got {method!r}")
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    if not 0 < flops_ratio <= 1:
        raise ValueError(
            f"flops_ratio (the kept fraction of the adapted layers' FLOPs) must be in (0, 1], got {flops_ratio}"
        )
    if sample_tokens < 1 or score_tokens < 1:
        raise ValueError("sample_tokens and score_tokens must be positive")


def _calibration_stats(model: nn.Module, mods: dict[str, nn.Module], calibration: Iterable, sample_tokens: int,
                       seed: int, progress: bool, cache: dict | None):  # fmt: skip
    """The collectors of ``mods``' inputs and the basis cache: from ``cache`` when it was filled for the same
    modules and sample, else collected (and put in ``cache`` when given)."""
    sig = (tuple(mods), sample_tokens, seed)
    if cache is not None and cache.get("signature") == sig:
        cols = cache["cols"]
    else:
        cols = collect(model, mods, calibration, sample_tokens, seed, progress)
        if cache is not None:
            cache.clear()
            cache.update(signature=sig, cols=cols, fits={})
    fits = cache["fits"] if cache is not None else None
    return cols, fits


def _adapt_site(model: nn.Module, names: dict[int, str], adapter: Method, kind: str, site, cols, keep: float,
                ctx: FitContext) -> dict:  # fmt: skip
    """Adapt one site (``kind`` "mlp" or "qkv") in place; its report entry, with the paths of the modules whose
    FLOPs count for it (``names``: module id -> path in the model before any replacement)."""

    def path(parent: nn.Module, attr: str) -> str:
        return f"{names[id(parent)]}.{attr}".lstrip(".")

    if kind == "mlp":
        info = adapter.adapt_mlp(site, cols, keep, ctx)
        new = info.pop("replace", None)
        if new is not None:
            _set_submodule(model, site.name, new)
        modules = [site.name] if new is not None else [path(*site.linears[r]) for r in site.linears]
    else:
        info = {"dense": True} if adapter.adapt_qkv is None else adapter.adapt_qkv(site, cols, keep, ctx)
        modules = [path(site.parent, a) for a in site.attrs]
        if len(site.attrs) > 1 and not info.get("dense"):  # the shared basis carries the stacked FLOPs
            modules = [modules[0] + ".basis"]
    info["modules"] = modules
    return info


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def adapter_modules(model: nn.Module) -> list[nn.Module]:
    """Every counting adapter in the model (rank adapters, shared bases, neuron masks, neuron adapters)."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, RankAdapter | SharedBasis | NeuronMaskedLinear | NeuronAdapterMLP) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def prepare_decode(model: nn.Module) -> nn.Module:
    """Turn on every adapter's decode path (in eval mode, steps of a few tokens run through :mod:`drrl.kernels`).
    Returns ``model``."""
    for m in model.modules():
        if hasattr(m, "prepare_decode"):
            m.prepare_decode()
    return model


def reset_counts(model: nn.Module) -> None:
    for m in adapter_modules(model):
        m.reset_counts()


def measured_flops(model: nn.Module, report: CompressionReport) -> dict:
    """FLOPs per token of the adapted set as executed since the last :func:`reset_counts` (adapters' counters;
    dense members at their full cost), against the dense model's."""
    total = 0.0
    for info in report.sites.values():
        for p in info["modules"]:
            m = model.get_submodule(p)
            total += m.flops_per_token() if hasattr(m, "flops_per_token") else 2.0 * m.in_features * m.out_features
    dense = report.dense_flops_per_token
    return {"flops_per_token": total, "dense_flops_per_token": dense, "ratio": total / dense if dense else math.nan}
