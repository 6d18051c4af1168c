"""Compress a transformer's linear layers with RaNA adapters or a baseline at a FLOP budget.

>>> report = apply_rana(model, flops_ratio=0.56, calibration=batches)   # 44% fewer adapted-layer FLOPs
>>> model(ids)                                                          # adapted in place
>>> measured_flops(model)["ratio"]                                      # measured on what ran since

Sites found by structure: gated MLPs (``gate_proj``/``up_proj``/``down_proj``/``act_fn``: Llama, Mistral,
Qwen, SmolLM), plain MLPs (Hugging Face BERT ``intermediate``/``output``; drrl's encoder ``fc``/``out`` and
GPT ``fc``/``proj``), and q/k/v projections (``q_proj``/``k_proj``/``v_proj``, BERT ``query``/``key``/``value``,
or drrl's stacked ``qkv``). The budget ``flops_ratio`` is the kept fraction of the FLOPs of the adapted
layers (every targeted MLP and q/k/v linear; o_proj and the attention itself stay dense), the same for
every layer (uniform, as in RaNA's code).

Methods:
- ``rana``: rank adapters on up and gate (or fc) and weight-norm neuron masking on down (or out); the
  split of the MLP's budget between them is searched (fractions j/(6n), j = 3..9, n matrices) on the MLP
  output error of calibration tokens; q, k, v share one basis and mask (stacked).
- ``cats``: the neuron adapter (gated: threshold on |act(gate x)|; plain: on |act(fc x)|), dense gate/fc.
  It has no q/k/v form: with ``targets="mlp+qkv"`` q/k/v stay dense and the MLPs take the whole budget.
- ``svd``: static truncation in the same data-aware bases (no mask), each matrix (and stacked q/k/v) at the
  rank its share of the budget buys.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from drrl.adapters.layers import (
    NeuronAdapterMLP,
    NeuronMaskedLinear,
    RankAdapter,
    SharedBasis,
    SharedRankSlice,
)
from drrl.attention.base import Attention
from drrl.linalg.rana import allocate_many, data_aware_basis, top_fraction_threshold, top_fraction_thresholds

log = logging.getLogger(__name__)

METHODS = ("rana", "cats", "svd")
TARGETS = ("mlp", "mlp+qkv")


# ------------------------------------------------------------------------------------------ sites


@dataclass
class MLPSite:
    name: str
    kind: str  # "gated" | "plain"
    owner: nn.Module  # the module to replace wholesale (gated CATS) and that holds the linears
    linears: dict[str, tuple[nn.Module, str]]  # role (gate/up/down or fc/out) -> (parent, attribute)
    act: object

    def get(self, role: str) -> nn.Linear:
        parent, attr = self.linears[role]
        return getattr(parent, attr)

    def set(self, role: str, module: nn.Module) -> None:
        parent, attr = self.linears[role]
        setattr(parent, attr, module)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gated":
            return self.get("down")(self.act(self.get("gate")(x)) * self.get("up")(x))
        return self.get("out")(self.act(self.get("fc")(x)))

    def dense_flops(self) -> float:
        return sum(2.0 * self.get(r).in_features * self.get(r).out_features for r in self.linears)


@dataclass
class QKVSite:
    name: str
    parent: nn.Module
    attrs: tuple[str, ...]  # ("qkv",) stacked, or ("q_proj", "k_proj", "v_proj")

    def linears(self) -> list[nn.Linear]:
        return [getattr(self.parent, a) for a in self.attrs]

    def dense_flops(self) -> float:
        return sum(2.0 * m.in_features * m.out_features for m in self.linears())


def _gelu(x):
    return F.gelu(x)


def find_sites(model: nn.Module) -> tuple[list[MLPSite], list[QKVSite]]:
    """The MLPs and q/k/v projections of a supported model (see the module docstring)."""
    mlps, qkvs = [], []
    for name, m in model.named_modules():

        def lin(*attrs, m=m):
            return all(isinstance(getattr(m, a, None), nn.Linear) for a in attrs)

        if lin("gate_proj", "up_proj", "down_proj") and hasattr(m, "act_fn"):
            roles = {r: (m, f"{r}_proj") for r in ("gate", "up", "down")}
            mlps.append(MLPSite(name, "gated", m, roles, m.act_fn))
        elif hasattr(m, "intermediate") and hasattr(m, "output") and hasattr(m, "attention"):  # HF BertLayer
            inter, out = m.intermediate, m.output
            if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(
                getattr(out, "dense", None), nn.Linear
            ):
                mlps.append(MLPSite(name, "plain", m, {"fc": (inter, "dense"), "out": (out, "dense")},
                                    inter.intermediate_act_fn))  # fmt: skip
        elif lin("fc", "out") and hasattr(m, "attn") and hasattr(m, "ln2"):  # drrl.models.encoder.EncoderLayer
            mlps.append(MLPSite(name, "plain", m, {"fc": (m, "fc"), "out": (m, "out")}, _gelu))
        elif lin("fc", "proj") and type(m).__name__ == "MLP":  # drrl.models.gpt.MLP
            mlps.append(MLPSite(name, "plain", m, {"fc": (m, "fc"), "out": (m, "proj")}, _gelu))
        if lin("q_proj", "k_proj", "v_proj"):
            qkvs.append(QKVSite(name, m, ("q_proj", "k_proj", "v_proj")))
        elif lin("query", "key", "value"):
            qkvs.append(QKVSite(name, m, ("query", "key", "value")))
        elif lin("qkv") and isinstance(m, Attention):  # drrl's attentions own a stacked q/k/v projection
            qkvs.append(QKVSite(name, m, ("qkv",)))
    if not mlps:
        raise ValueError(
            f"no MLP found in {type(model).__name__}; adapters support Llama-family (gate/up/down_proj), BERT and "
            "drrl's own GPT and encoder models"
        )
    return mlps, qkvs


# ------------------------------------------------------------------------------------------ calibration


class _Collector:
    """Input Gram (float64, every token) and a seeded uniform sample of ``n`` input rows of one linear."""

    def __init__(self, n: int, seed: int):
        self.n, self.gram, self.rows, self.keys, self.tokens = n, None, None, None, 0
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        g = (x.T @ x).double()  # per batch in float32 (4x faster on CPU), summed in float64
        self.gram = g if self.gram is None else self.gram + g
        self.tokens += x.shape[0]
        keys = torch.rand(x.shape[0], generator=self.gen)
        rows = x if self.rows is None else torch.cat([self.rows, x])
        keys = keys if self.keys is None else torch.cat([self.keys, keys])
        if len(keys) > self.n:  # keep the n smallest random keys: a uniform sample without replacement
            keep = keys.topk(self.n, largest=False).indices.sort().values
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys


def _forward(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif hasattr(model, "config") and hasattr(model, "generation_config"):  # HF causal LM
        model(input_ids=batch, use_cache=False)
    elif hasattr(model, "config") and hasattr(model.config, "model_type"):
        model(input_ids=batch)
    else:
        model(batch)


@torch.no_grad()
def collect(model: nn.Module, modules: dict[str, nn.Module], calibration: Iterable, n: int, seed: int,
            progress: bool = False) -> dict[str, _Collector]:  # fmt: skip
    """Run ``calibration`` batches through ``model`` and collect every listed module's inputs."""
    cols = {k: _Collector(n, seed + i) for i, k in enumerate(modules)}
    hooks = [m.register_forward_hook(lambda mod, args, out, c=cols[k]: c.add(args[0])) for k, m in modules.items()]
    try:
        device = next(model.parameters()).device
        for batch in tqdm(list(calibration), desc="calibrate", unit="batch", disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)
            _forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    if not cols or next(iter(cols.values())).tokens == 0:
        raise ValueError("the calibration data is empty; pass at least one batch of token ids")
    return cols


# ------------------------------------------------------------------------------------------ building blocks


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


def _svd_adapter(lin: nn.Linear, fit: _Fit, keep: float):
    """Static truncation keeping a fraction ``keep`` of ``lin``'s FLOPs: rank keep·d_out·d_in/(d_in + d_out)."""
    d_out, d_in = lin.out_features, lin.in_features
    r = max(1, min(fit.a.shape[1], int(keep * d_out * d_in / (d_in + d_out))))
    bias = None if lin.bias is None else lin.bias.detach()
    return RankAdapter(fit.a[:, :r], fit.b[:r], 0.0, bias), {"n_b": r, "k_mean": float(r)}


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


def _adapt_mlp_cats(site: MLPSite, cols, keep: float, qkv_dense: bool = False) -> dict:
    roles = list(site.linears)
    x = cols[_input_key(site, roles[0])].rows
    gate = site.get(roles[0])
    with torch.no_grad():
        act = site.act(gate(x.to(gate.weight.device, gate.weight.dtype))).float()
    n_masked = 2 if site.kind == "gated" else 1
    frac = (len(roles) * keep - 1.0) / n_masked  # the dense gate/fc costs one matrix of the budget
    if frac <= 0:
        why = " (q/k/v stay dense, so the whole cut falls on the MLPs; or use --targets mlp)" if qkv_dense else ""
        raise ValueError(
            f"{site.name}: a neuron adapter's dense {roles[0]} alone costs {1 / len(roles):.2f} of the MLP, but the "
            f"MLP may keep only {keep:.2f} of its FLOPs{why}; raise the FLOPs ratio"
        )
    t = top_fraction_threshold(act.abs(), min(frac, 1.0))  # the module keeps |a| >= t
    if site.kind == "gated":
        new = NeuronAdapterMLP(site.get("gate"), site.get("up"), site.get("down"), site.act, t)
        return {"t": t, "keep_neurons": frac, "replace": new}
    out = site.get("out")
    site.set("out", _like(NeuronMaskedLinear(out.weight.float(), t, out.bias, weight_norm=False), out))
    return {"t": t, "keep_neurons": frac}


def _adapt_qkv(site: QKVSite, cols, keep: float, masked: bool, fits: dict | None = None) -> dict:
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
    if masked:
        built = _rana_adapters(stacked, fit, [keep])[0]
        if built is None:
            raise ValueError(f"{site.name}: the FLOPs ratio {keep} does not pay for one basis row; raise it")
        adapter, meta = built
    else:
        adapter, meta = _svd_adapter(stacked, fit, keep)
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


# ------------------------------------------------------------------------------------------ entry points


@dataclass
class CompressionReport:
    method: str
    flops_ratio: float
    targets: str
    sites: dict[str, dict] = field(default_factory=dict)
    dense_flops_per_token: float = 0.0  # of the adapted set (every targeted MLP and q/k/v linear)


def _input_key(site: MLPSite, role: str) -> str:
    """The collector of a linear's input: gate and up read the same input, so they share one sample."""
    return f"{site.name}:gate" if site.kind == "gated" and role == "up" else f"{site.name}:{role}"


def _modules_to_collect(mlps: list[MLPSite], qkvs: list[QKVSite], targets: str) -> dict[str, nn.Module]:
    mods = {}
    for s in mlps:
        for role in s.linears:
            if _input_key(s, role) == f"{s.name}:{role}":
                mods[f"{s.name}:{role}"] = s.get(role)
    if targets == "mlp+qkv":
        for s in qkvs:
            mods[f"{s.name}:qkv"] = s.linears()[0]  # q, k, v read the same input
    return mods


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
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    if not 0 < flops_ratio <= 1:
        raise ValueError(
            f"flops_ratio (the kept fraction of the adapted layers' FLOPs) must be in (0, 1], got {flops_ratio}"
        )
    if sample_tokens < 1 or score_tokens < 1:
        raise ValueError("sample_tokens and score_tokens must be positive")
    mlps, qkvs = find_sites(model)
    names = {id(m): n for n, m in model.named_modules()}

    def path(parent: nn.Module, attr: str) -> str:
        return f"{names[id(parent)]}.{attr}".lstrip(".")

    if targets == "mlp+qkv" and not qkvs:
        raise ValueError(f"no q/k/v projections found in {type(model).__name__}; use targets='mlp'")
    was_training = model.training
    model.eval()
    mods = _modules_to_collect(mlps, qkvs, targets)
    sig = (tuple(mods), sample_tokens, seed)
    if cache is not None and cache.get("signature") == sig:
        cols = cache["cols"]
    else:
        cols = collect(model, mods, calibration, sample_tokens, seed, progress)
        if cache is not None:
            cache.clear()
            cache.update(signature=sig, cols=cols, fits={})
    fits = cache["fits"] if cache is not None else None
    mlp_flops = sum(s.dense_flops() for s in mlps)
    qkv_flops = sum(s.dense_flops() for s in qkvs) if targets == "mlp+qkv" else 0.0
    rep = CompressionReport(method, flops_ratio, targets, dense_flops_per_token=mlp_flops + qkv_flops)
    mlp_keep = flops_ratio
    if method == "cats" and qkv_flops:  # no q/k/v adapter: the MLPs carry the whole budget
        mlp_keep = (flops_ratio * (mlp_flops + qkv_flops) - qkv_flops) / mlp_flops
        log.info("cats: q/k/v stay dense; MLPs keep %.3f of their FLOPs", mlp_keep)
    with torch.no_grad():  # fitting only
        todo = [("mlp", s) for s in mlps] + ([("qkv", s) for s in qkvs] if targets == "mlp+qkv" else [])
        for kind, site in tqdm(todo, desc=f"fit {method}", unit="site", disable=not progress, leave=False):
            if kind == "mlp":
                if method == "rana":
                    info = _adapt_mlp_rana(site, cols, mlp_keep, score_tokens, fits)
                elif method == "svd":
                    info = _adapt_mlp_svd(site, cols, mlp_keep, fits)
                else:
                    info = _adapt_mlp_cats(site, cols, mlp_keep, qkv_dense=qkv_flops > 0)
                    new = info.pop("replace", None)
                    if new is not None:
                        _set_submodule(model, site.name, new)
                modules = [site.name] if method == "cats" and site.kind == "gated" else [
                    path(*site.linears[r]) for r in site.linears]  # fmt: skip
            else:
                if method == "cats":
                    info = {"dense": True}
                else:
                    info = _adapt_qkv(site, cols, flops_ratio, masked=method == "rana", fits=fits)
                modules = [path(site.parent, a) for a in site.attrs]
                if len(site.attrs) > 1 and not info.get("dense"):  # the shared basis carries the stacked FLOPs
                    modules = [modules[0] + ".basis"]
            info["modules"] = modules
            rep.sites[f"{kind}:{site.name}"] = info
    model.train(was_training)
    reset_counts(model)
    return rep


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
