"""Prune the query/key channels of a DeltaNet-family model: calibrate, select, slice.

    report = prune_qk(model, ratio=0.5, selector="drrqr", calibration=batches)

Every layer keeps the same d' = ⌊d_k (1 − ratio)⌋ channels in every head, the same ones for q and k, and
their short convolutions (``DeltaNet.slice_qk``); the state shrinks from d_k × d_v to d' × d_v per head.
The readout scale keeps its original value (``model.cfg.deltanet.qk_scale``), so a pruned model saved with
its config reloads into the same function. ``pca`` is the rotation baseline: q and k are projected on the
top-d' eigenvectors T of their normalised covariance (W ← T W per head) and each new channel gets the
depthwise kernel Σ_d T_rd² w_d, which only approximates the rotated convolution (a rotation commutes with
neither the convolution nor SiLU; channel selection commutes with both).

Calibration (one pass over the batches): post-convolution, pre-normalisation q and k of every layer
(what enters the delta rule; at most ``rows`` tokens kept, sampled uniformly), the RMS of each layer's
mixer input (Wanda), and the gradients of the LM loss with respect to q_proj and k_proj (Taylor).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from drrl.linear_attention.layers import DeltaNet
from drrl.pruning.selectors import SelectorInputs, available_selectors, check_keep, get_selector

log = logging.getLogger(__name__)


def __getattr__(name: str):
    if name == "NEEDS":  # {selector: the calibration it reads}, from the registry
        return {s: get_selector(s).needs for s in available_selectors()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class LayerCalibration:
    q: list[torch.Tensor] = field(default_factory=list)  # chunks (n, H, d_k) of post-conv queries
    k: list[torch.Tensor] = field(default_factory=list)
    sq_sum: torch.Tensor | None = None  # (D,) Σ x² over tokens of the mixer input
    tokens: int = 0
    gq: torch.Tensor | None = None  # accumulated ∂L/∂W_q (H·d_k, D)
    gk: torch.Tensor | None = None


def mixers(model: nn.Module) -> list[DeltaNet]:
    found = [m for m in model.modules() if isinstance(m, DeltaNet)]
    if not found:
        raise ValueError("the model has no DeltaNet layers to prune; train one with model.kind=deltanet")
    return found


def calibrate(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    needs: Sequence[str] = ("acts", "rms", "grads"),
    *,
    rows: int = 5000,
    seed: int = 0,
) -> list[LayerCalibration]:
    """One pass of ``batches`` (each (B, T + 1) token ids: inputs and their next-token targets) through a drrl
    DeltaNet LM, recording what ``needs`` asks for per layer: ``acts`` (q/k activations, ≤ ``rows`` tokens),
    ``rms`` (of the mixer input) and ``grads`` (of the summed per-batch mean LM losses w.r.t. q_proj/k_proj;
    no other parameter gets a gradient)."""
    layers = mixers(model)
    cal = [LayerCalibration() for _ in layers]
    n_tokens = sum(int(b[:, :-1].numel()) for b in batches)
    keep_p = min(1.0, rows / max(n_tokens, 1))
    g = torch.Generator().manual_seed(seed)
    hooks, picks = [], {}

    def act_hook(i: int, which: str):
        def hook(_mod, _inp, out):  # (B, T, H·d_k) -> sampled rows (n, H, d_k)
            m = layers[i]
            flat = out.detach().flatten(0, 1).unflatten(-1, (m.n_head, m.head_k_dim))
            getattr(cal[i], which).append(flat[picks[i]].float().cpu())

        return hook

    def pre_hook(i: int):
        def hook(_mod, args):
            x = args[0].detach().flatten(0, 1).float()
            n = x.shape[0]
            sel = torch.rand(n, generator=g) < keep_p if "acts" in needs else torch.ones(n, dtype=torch.bool)
            picks[i] = sel.to(x.device)
            if "rms" in needs:
                s = (x * x).sum(0).cpu()
                cal[i].sq_sum = s if cal[i].sq_sum is None else cal[i].sq_sum + s
                cal[i].tokens += n

        return hook

    for i, m in enumerate(layers):
        hooks.append(m.register_forward_pre_hook(pre_hook(i)))
        if "acts" in needs:
            hooks.append(m.q_conv1d.register_forward_hook(act_hook(i, "q")))
            hooks.append(m.k_conv1d.register_forward_hook(act_hook(i, "k")))
    want_grads = "grads" in needs
    was_training = model.training
    model.eval()
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    qk = {id(p) for m in layers for p in (m.q_proj.weight, m.k_proj.weight)}
    old_grads = {id(p): p.grad for p in params if id(p) in qk}  # the caller's, put back afterwards
    try:
        for p in params:
            p.requires_grad_(want_grads and id(p) in qk)
            if id(p) in qk:
                p.grad = None
        for b in batches:
            x, y = b[:, :-1], b[:, 1:]
            with torch.set_grad_enabled(want_grads):
                loss = model.loss(x, y)
            if want_grads:
                loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if want_grads:
        for c, m in zip(cal, layers, strict=True):
            c.gq, c.gk = m.q_proj.weight.grad.detach().clone(), m.k_proj.weight.grad.detach().clone()
    for p, flag in zip(params, flags, strict=True):
        if id(p) in qk:
            p.grad = old_grads[id(p)]
        p.requires_grad_(flag)
    return cal


def kept_width(head_k_dims: Sequence[int], ratio: float) -> tuple[int, int]:
    """(d_k, d') = (the layers' shared head_k_dim, ⌊d_k (1 − ratio)⌋); ValueError (one line) for a ratio outside
    [0, 1), layers of different widths, or a ratio that would leave a head no channel."""
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1) (the fraction of q/k channels removed), got {ratio}")
    d_k = head_k_dims[0]
    if any(d != d_k for d in head_k_dims):
        raise ValueError("layers have different head_k_dim; prune a model whose layers share one")
    d_keep = int(d_k * (1 - ratio) + 1e-9)
    if d_keep < 1:
        raise ValueError(f"ratio {ratio:g} would remove all {d_k} query/key channels of a head; use a ratio <= "
                         f"{(d_k - 1) / d_k:g}")  # fmt: skip
    check_keep(d_k, d_keep)
    return d_k, d_keep


def rotate_qk(layer: DeltaNet, t: torch.Tensor) -> None:
    """PCA baseline: W_q,h ← T_h W_q,h and W_k,h ← T_h W_k,h for T (H, d', d_k); conv kernels mixed by T²."""
    n_head, d_keep, d_k = t.shape
    with torch.no_grad():
        for name, conv in (("q_proj", layer.q_conv1d), ("k_proj", layer.k_conv1d)):
            lin = getattr(layer, name)
            t_ = t.to(lin.weight)
            w = lin.weight.unflatten(0, (n_head, d_k))  # (H, d_k, D)
            new = nn.Linear(lin.in_features, n_head * d_keep, bias=False, device=w.device, dtype=w.dtype)
            new.weight = nn.Parameter(torch.einsum("hrd,hdj->hrj", t_, w).flatten(0, 1).contiguous())
            setattr(layer, name, new)
            kern = conv.weight.squeeze(1).unflatten(0, (n_head, d_k))  # (H, d_k, K)
            conv.set_weight(torch.einsum("hrd,hdk->hrk", t_.square(), kern).flatten(0, 1).unsqueeze(1))
    layer.head_k_dim = d_keep


def select_channels(
    layer: DeltaNet, c: LayerCalibration, selector: str, d_keep: int, *, generator: torch.Generator, rows: int
) -> torch.Tensor:
    """Kept channels (H, d') of one layer by the registered ``selector`` (not a rotation such as ``pca``)."""
    spec = get_selector(selector)
    if spec.rotates:
        raise ValueError(f"selector {selector!r} rotates rather than selects; prune_qk applies it")
    return spec.fn(SelectorInputs(layer, c, rows=rows), d_keep, generator)


def prune_qk(
    model: nn.Module,
    ratio: float,
    selector: str,
    calibration: Sequence[torch.Tensor] | list[LayerCalibration],
    *,
    seed: int = 0,
    rows: int = 5000,
) -> dict:
    """Remove ``ratio`` of every head's query/key channels of every DeltaNet layer of ``model`` (in place).

    ``calibration``: token batches (B, T + 1) or the output of :func:`calibrate` (reused across selectors and
    ratios). Returns ``{"selector", "ratio", "d_k", "d_keep", "kept": [(H, d') lists per layer]}``; updates
    ``model.cfg.deltanet`` (head_k_dim, qk_scale) when the model has one."""
    spec = get_selector(selector)  # ValueError when it is not registered
    layers = mixers(model)
    d_k, d_keep = kept_width([m.head_k_dim for m in layers], ratio)
    cal = calibration
    if not cal or not isinstance(cal[0], LayerCalibration):
        cal = calibrate(model, calibration, spec.needs, rows=rows, seed=seed) if spec.needs else None
    g = torch.Generator().manual_seed(seed)
    scale = layers[0].scale
    kept = []
    for i, layer in enumerate(layers):
        c = cal[i] if cal is not None else LayerCalibration()
        missing = {"acts": not c.q, "rms": c.sq_sum is None, "grads": c.gq is None}
        if any(missing[n] for n in spec.needs):
            raise ValueError(f"selector {selector} needs calibration {spec.needs}; pass it to calibrate(needs=...)")
        out = spec.fn(SelectorInputs(layer, c, rows=rows), d_keep, g)
        if spec.rotates:
            rotate_qk(layer, out)
            kept.append(None)
        else:
            layer.slice_qk(out)
            kept.append(out.tolist())
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "deltanet"):  # a new config object: the teacher may share the old one
        model.cfg = replace(cfg, deltanet=replace(cfg.deltanet, head_k_dim=d_keep, qk_scale=scale))
    log.info("pruned %s: %d layers, d_k %d -> %d (%s)", selector, len(layers), d_k, d_keep, f"ratio {ratio}")
    return {"selector": selector, "ratio": ratio, "d_k": d_k, "d_keep": d_keep, "kept": kept}
