"""Q/K channel pruning of the Gated DeltaNet layers inside Hugging Face models (Qwen3-Next, Qwen3.5), saved as
standard checkpoints.

    info = prune_hf(model, ratio=0.5, selector="drrqr", calibration=batches)   # in place
    model.save_pretrained(out)   # plain transformers loads it: config.linear_key_head_dim is d'

Structure. A layer's q, k and v come from one fused input projection, then a depthwise causal convolution over
``conv_dim = 2·key_dim + value_dim`` channels (q of every key head, k of every key head, v), then SiLU; the kernel
L2-normalises q and k per key head, scales q by ``1/√head_k_dim`` and runs the gated delta rule, whose state is
num_v_heads × head_k_dim × head_v_dim per sequence. Removing channels of q and k (the same ones in both, per key
head, :mod:`drrl.pruning.selectors`) shrinks that state and touches nothing else. The fused projections differ:

- ``in_proj_qkvz`` (Qwen3-Next) interleaves per key head: [q_h (d_k), k_h (d_k), v_h, z_h] for every head h;
- ``in_proj_qkv`` (Qwen3.5) is blocked: [q (H·d_k), k (H·d_k), v]; the convolution is blocked in both.

With num_v_heads > num_k_heads a key head serves several value heads; its channels are selected once, from what
it feeds all of them (its q/k activations and weights, and the loss gradient through every value head).

Calibration runs the model's own forward: the q and k the layer hands its delta-rule kernel (after convolution and
SiLU, before the L2 norm) are recorded by wrapping the kernel functions for the duration of the pass.

Score scale. The kernel scales q by ``1/√(query's last dim)``, so once d_k shrinks to d' every readout grows by
c = √(d_k/d'). The per-head gated RMSNorm that follows absorbs that factor only up to its ε: norm(c·o; ε) =
norm(o; ε/c²), and on a trained model ‖o‖ is small enough for ε to matter (BENCHMARKS.md: +0.4% perplexity at 50%,
+2.3% at 75% on the trained hybrid). No weight can fold 1/c back in (o is linear only in v, which passes SiLU), so
``scale="eps"`` (the default) multiplies ``config.rms_norm_eps`` and the ε of every RMSNorm built from it by c²: the
gated norms then compute the unpruned readout exactly, the other norms (of hidden states and attention heads, whose
mean squares are ≫ ε) move by ε·(c² − 1), and plain transformers loads the same function from the saved config.
``scale="kernel"`` leaves ε alone (transformers' scale for d').
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from drrl.pruning.prune import LayerCalibration, kept_width
from drrl.pruning.selectors import SelectorInputs, get_selector

log = logging.getLogger(__name__)

# class name of the layer -> how its fused projection orders q and k ("interleaved" per key head, or "blocked")
LAYOUTS = {
    "Qwen3NextGatedDeltaNet": ("in_proj_qkvz", "interleaved"),
    "Qwen3_5GatedDeltaNet": ("in_proj_qkv", "blocked"),
    "Qwen3_5MoeGatedDeltaNet": ("in_proj_qkv", "blocked"),
}
KERNELS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")  # module functions the layers call
INSTANCE_KERNELS = ("chunk_gated_delta_rule", "recurrent_gated_delta_rule")  # older releases bind them per layer


def delta_layers(model: nn.Module) -> list[nn.Module]:
    """The Gated DeltaNet layers of ``model`` drrl can prune; ValueError (one line) when there are none, naming any
    delta-rule layer of another structure it found."""
    found = [m for m in model.modules() if type(m).__name__ in LAYOUTS]
    if found:
        return found
    other = sorted({type(m).__name__ for m in model.modules() if "delta" in type(m).__name__.lower()})
    supported = ", ".join(sorted(LAYOUTS))
    if other:
        raise ValueError(f"drrl cannot prune {', '.join(other)} yet (its projections differ); supported: {supported}")
    raise ValueError(f"the model has no Gated DeltaNet layers to prune; supported layers: {supported}")


def _layout(layer: nn.Module) -> tuple[nn.Linear, bool]:
    name, order = LAYOUTS[type(layer).__name__]
    return getattr(layer, name), order == "interleaved"


def split_qk(t: torch.Tensor, n_head: int, d_k: int, interleaved: bool) -> tuple[torch.Tensor, ...]:
    """(q (H, d_k, ...), k (H, d_k, ...), rest) of a tensor whose first dim is a fused projection's rows (or a
    convolution's channels, always blocked); ``rest`` keeps the layout's own shape ((H, r, ...) or (r, ...))."""
    if interleaved:
        g = t.unflatten(0, (n_head, -1))
        return g[:, :d_k], g[:, d_k : 2 * d_k], g[:, 2 * d_k :]
    key_dim = n_head * d_k
    return (
        t[:key_dim].unflatten(0, (n_head, d_k)),
        t[key_dim : 2 * key_dim].unflatten(0, (n_head, d_k)),
        t[2 * key_dim :],
    )


def join_qk(q: torch.Tensor, k: torch.Tensor, rest: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The inverse of :func:`split_qk` for any number of channels per head in q and k."""
    if interleaved:
        return torch.cat([q, k, rest], 1).flatten(0, 1)
    return torch.cat([q.flatten(0, 1), k.flatten(0, 1), rest])


def _view(layer: nn.Module) -> SimpleNamespace:
    """What a registered selector reads of a layer: q_proj/k_proj weights (H·d_k, D), n_head, head_k_dim."""
    fused, inter = _layout(layer)
    q, k, _ = split_qk(fused.weight.detach(), layer.num_k_heads, layer.head_k_dim, inter)
    return SimpleNamespace(q_proj=SimpleNamespace(weight=q.flatten(0, 1)), k_proj=SimpleNamespace(weight=k.flatten(0, 1)),
                           n_head=layer.num_k_heads, head_k_dim=layer.head_k_dim)  # fmt: skip


def _reshape_qk(layer: nn.Module, proj: Callable, conv: Callable, d_keep: int) -> None:
    """Replace the fused projection and the convolution by ones whose q and k (H, d_k, ...) became ``proj(q)``
    (H, d_keep, ...) (``conv`` for the convolution's kernels), and set the layer's sizes to d_keep."""
    fused, inter = _layout(layer)
    n_head, d_k = layer.num_k_heads, layer.head_k_dim
    with torch.no_grad():
        q, k, rest = split_qk(fused.weight, n_head, d_k, inter)
        w = join_qk(proj(q), proj(k), rest, inter)
        new = nn.Linear(w.shape[1], w.shape[0], bias=fused.bias is not None, device=w.device, dtype=w.dtype)
        new.weight.copy_(w)
        if fused.bias is not None:
            q, k, rest = split_qk(fused.bias, n_head, d_k, inter)
            new.bias.copy_(join_qk(proj(q), proj(k), rest, inter))
        setattr(layer, LAYOUTS[type(layer).__name__][0], new)
        old = layer.conv1d
        q, k, rest = split_qk(old.weight, n_head, d_k, False)
        cw = join_qk(conv(q), conv(k), rest, False)
        c = nn.Conv1d(cw.shape[0], cw.shape[0], old.kernel_size[0], groups=cw.shape[0], padding=old.padding[0],
                      bias=old.bias is not None, device=cw.device, dtype=cw.dtype)  # fmt: skip
        c.weight.copy_(cw)
        if old.bias is not None:
            q, k, rest = split_qk(old.bias, n_head, d_k, False)
            c.bias.copy_(join_qk(conv(q), conv(k), rest, False))
        layer.conv1d = c
    layer.head_k_dim = d_keep
    layer.key_dim = n_head * d_keep
    layer.conv_dim = 2 * layer.key_dim + layer.value_dim


def slice_layer(layer: nn.Module, idx: torch.Tensor) -> None:
    """Keep channels ``idx`` (H, d') of every key head's q and k (and their convolution channels)."""
    n_head = layer.num_k_heads
    if idx.ndim != 2 or idx.shape[0] != n_head:
        raise ValueError(f"idx must be (num_k_heads={n_head}, d'), got {tuple(idx.shape)}")
    heads = torch.arange(n_head)[:, None]
    pick = lambda t: t[heads, idx.to(torch.long)]  # noqa: E731 — (H, d_k, ...) -> (H, d', ...)
    _reshape_qk(layer, pick, pick, idx.shape[1])


def rotate_layer(layer: nn.Module, t: torch.Tensor) -> None:
    """PCA baseline: q_h, k_h ← T_h q_h, T_h k_h for T (H, d', d_k); convolution kernels mixed by T² (approximate)."""
    mix = lambda w: torch.einsum("hrd,hd...->hr...", t.to(w), w)  # noqa: E731
    mix2 = lambda w: torch.einsum("hrd,hd...->hr...", t.to(w).square(), w)  # noqa: E731
    _reshape_qk(layer, mix, mix2, t.shape[1])


def _text_config(config):
    """The config that holds the linear-attention sizes (Qwen3.5's composite config keeps them in text_config)."""
    return config if hasattr(config, "linear_key_head_dim") else config.get_text_config()


@contextlib.contextmanager
def _recording(layers: Sequence[nn.Module], sink: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, every call of a layer's delta-rule kernel hands (layer index, query, key) to ``sink``:
    (B, T, H, d_k) tensors after convolution and SiLU, before the kernel's L2 norm."""
    current: list[int] = [-1]
    patched: list[tuple[object, str, object]] = []

    def wrap(fn):
        def recorded(query, key, *args, **kwargs):
            sink(current[0], query, key)
            return fn(query, key, *args, **kwargs)

        return recorded

    hooks = [m.register_forward_pre_hook(lambda _m, _a, i=i: current.__setitem__(0, i)) for i, m in enumerate(layers)]
    try:
        for mod in {sys.modules[type(m).__module__] for m in layers}:
            for name in KERNELS:
                if hasattr(mod, name):
                    patched.append((mod, name, getattr(mod, name)))
                    setattr(mod, name, wrap(getattr(mod, name)))
        for m in layers:
            for name in INSTANCE_KERNELS:
                if callable(m.__dict__.get(name)):
                    patched.append((m, name, m.__dict__[name]))
                    setattr(m, name, wrap(m.__dict__[name]))
        yield
    finally:
        for h in hooks:
            h.remove()
        for owner, name, fn in reversed(patched):
            setattr(owner, name, fn)


def calibrate_hf(model: nn.Module, batches: Sequence[torch.Tensor], needs: Sequence[str] = ("acts", "rms", "grads"),
                 *, rows: int = 5000, seed: int = 0) -> list[LayerCalibration]:  # fmt: skip
    """One pass of ``batches`` (each (B, T + 1) ids: inputs and next-token targets) through a Hugging Face model,
    per Gated DeltaNet layer: ``acts`` (q, k per key head, ≤ ``rows`` tokens sampled uniformly), ``rms`` (of the
    layer's input, after its pre-norm) and ``grads`` (of the summed per-batch mean LM losses with respect to the
    q and k rows of the fused projection; no other parameter gets a gradient). Returns one
    :class:`drrl.pruning.LayerCalibration` per layer, what :func:`drrl.pruning.selectors` read."""
    layers = delta_layers(model)
    cal = [LayerCalibration() for _ in layers]
    n_tokens = sum(int(b[:, :-1].numel()) for b in batches)
    keep_p = min(1.0, rows / max(n_tokens, 1))
    g = torch.Generator().manual_seed(seed)
    picks: dict[int, torch.Tensor] = {}

    def pre_hook(i: int):
        def hook(_mod, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).detach().flatten(0, 1).float()
            picks[i] = (torch.rand(x.shape[0], generator=g) < keep_p).to(x.device)
            if "rms" in needs:
                s = (x * x).sum(0).cpu()
                cal[i].sq_sum = s if cal[i].sq_sum is None else cal[i].sq_sum + s
                cal[i].tokens += x.shape[0]

        return hook

    def sink(i: int, query: torch.Tensor, key: torch.Tensor) -> None:
        if "acts" in needs and i >= 0 and query.shape[1] > 1:  # a prefill, not a decode step
            sel = picks[i]
            cal[i].q.append(query.detach().flatten(0, 1)[sel].float().cpu())
            cal[i].k.append(key.detach().flatten(0, 1)[sel].float().cpu())

    fused = [_layout(m)[0].weight for m in layers]
    want = "grads" in needs
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    old_grads = [w.grad for w in fused]  # the caller's, put back afterwards
    was_training = model.training
    model.eval()
    hooks = [m.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, m in enumerate(layers)]
    try:
        for p in params:
            p.requires_grad_(False)
        for w in fused:
            w.requires_grad_(want)
            w.grad = None
        with _recording(layers, sink):
            for b in batches:
                with torch.set_grad_enabled(want):
                    logits = model(input_ids=b[:, :-1], use_cache=False).logits
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten())
                if want:
                    loss.backward()
        grads = [w.grad.detach().clone() for w in fused] if want else []
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        for w, old in zip(fused, old_grads, strict=True):
            w.grad = old
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    if want:
        for c, m, gr in zip(cal, layers, grads, strict=True):
            gq, gk, _ = split_qk(gr, m.num_k_heads, m.head_k_dim, _layout(m)[1])
            c.gq, c.gk = gq.flatten(0, 1), gk.flatten(0, 1)
    return cal


@dataclass
class HFPruneInfo:
    selector: str
    ratio: float
    d_k: int
    d_keep: int
    kept: list  # per layer: (H, d') index lists, or None for a rotation


def prune_hf(model: nn.Module, ratio: float, selector: str, calibration: Sequence[torch.Tensor] | list[LayerCalibration],
             *, seed: int = 0, rows: int = 5000, scale: str = "eps") -> HFPruneInfo:  # fmt: skip
    """Remove ``ratio`` of every key head's query/key channels in every Gated DeltaNet layer of a Hugging Face
    ``model`` (in place) and set ``config.linear_key_head_dim`` to d' = ⌊d_k (1 − ratio)⌋.

    ``calibration``: token batches (B, T + 1) or the output of :func:`calibrate_hf` (reused across selectors and
    ratios). ``scale``: ``"eps"`` keeps the unpruned readout scale through the norms' ε (saved in the config),
    ``"kernel"`` takes transformers' 1/√d' (module doc)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    spec = get_selector(selector)
    layers = delta_layers(model)
    d_k, d_keep = kept_width([m.head_k_dim for m in layers], ratio)
    cal = calibration
    if spec.needs and (not cal or not isinstance(cal[0], LayerCalibration)):
        cal = calibrate_hf(model, calibration, spec.needs, rows=rows, seed=seed)
    g = torch.Generator().manual_seed(seed)
    kept = []
    for i, layer in enumerate(layers):
        c = cal[i] if spec.needs else LayerCalibration()
        missing = {"acts": not c.q, "rms": c.sq_sum is None, "grads": c.gq is None}
        if any(missing[n] for n in spec.needs):
            raise ValueError(f"selector {selector} needs calibration {spec.needs}; pass it to calibrate_hf(needs=...)")
        out = spec.fn(SelectorInputs(_view(layer), c, rows=rows), d_keep, g)
        if spec.rotates:
            rotate_layer(layer, out)
            kept.append(None)
        else:
            slice_layer(layer, out)
            kept.append(out.tolist())
    config = _text_config(model.config)
    config.linear_key_head_dim = d_keep
    if scale == "eps" and d_keep != d_k:
        _scale_eps(model, d_k / d_keep)
        config.rms_norm_eps = config.rms_norm_eps * d_k / d_keep
    log.info("pruned %s: %d Gated DeltaNet layers, d_k %d -> %d (ratio %g)", selector, len(layers), d_k, d_keep, ratio)
    return HFPruneInfo(selector, ratio, d_k, d_keep, kept)


SCALES = ("eps", "kernel")


def _norm_eps(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every RMSNorm ε in the model: the gated norms' ``variance_epsilon`` and the others'
    ``eps`` or ``variance_epsilon``."""
    found = []
    for m in model.modules():
        if "rmsnorm" in type(m).__name__.lower():
            for attr in ("variance_epsilon", "eps"):
                if isinstance(getattr(m, attr, None), float):
                    found.append((m, attr))
                    break
    return found


def _scale_eps(model: nn.Module, factor: float) -> None:
    for m, attr in _norm_eps(model):
        setattr(m, attr, getattr(m, attr) * factor)


@contextlib.contextmanager
def scaled_eps(model: nn.Module, factor: float) -> Iterator[None]:
    """Within the block every RMSNorm's ε is multiplied by ``factor`` (restored afterwards): ``d_k/d'`` turns a model
    pruned with ``scale="kernel"`` into its ``"eps"`` twin, ``d'/d_k`` the reverse (what each scale costs)."""
    saved = [(m, attr, getattr(m, attr)) for m, attr in _norm_eps(model)]
    try:
        _scale_eps(model, factor)
        yield
    finally:
        for m, attr, eps in saved:
            setattr(m, attr, eps)


def recurrent_state_bytes(cache) -> int:
    """Bytes of the recurrent states a Hugging Face cache holds (read from its tensors), e.g. after a prefill."""
    layers = getattr(cache, "layers", None)
    tensors: list = []
    if layers is not None:
        for layer in layers:
            states = getattr(layer, "recurrent_states", None)
            if isinstance(states, dict):
                tensors += list(states.values())
            elif states is not None:
                tensors += [states]
    else:  # older releases keep one list on the cache
        tensors = list(getattr(cache, "recurrent_states", []) or [])
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def state_bytes_formula(config, batch: int, bytes_per_value: int = 4) -> int:
    """num_v_heads × head_k_dim × head_v_dim × bytes per Gated DeltaNet layer and sequence (the config's sizes)."""
    c = _text_config(config)
    n_linear = sum(t == "linear_attention" for t in c.layer_types)
    return (
        batch * n_linear * c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * bytes_per_value
    )
