"""The CATS baseline, a neuron adapter on each MLP: gated MLPs threshold |act(gate x)| (the whole MLP module is
replaced by a :class:`~drrl.adapters.layers.NeuronAdapterMLP`), plain MLPs threshold |act(fc x)| before out; the
gate (or fc) stays dense. It has no q/k/v form: with ``targets="mlp+qkv"`` q/k/v stay dense and the MLPs take
the whole budget (``adapt_qkv`` is None in the method table).
"""

from __future__ import annotations

import torch

from drrl.adapters.fitting import FitContext, _like
from drrl.adapters.layers import NeuronAdapterMLP, NeuronMaskedLinear
from drrl.adapters.sites import MLPSite, _input_key
from drrl.linalg.adaptive_lowrank import top_fraction_threshold


def adapt_mlp(site: MLPSite, cols, keep: float, ctx: FitContext) -> dict:
    """CATS on an MLP site (registered in :mod:`drrl.adapters.registry`); a gated site's report carries the
    module that replaces the whole MLP under ``"replace"``."""
    return _adapt_mlp_cats(site, cols, keep, qkv_dense=ctx.qkv_dense)


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
