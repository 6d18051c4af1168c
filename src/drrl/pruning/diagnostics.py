"""Measurements of a DeltaNet-family model before and after pruning: the rank of its recurrent states
(``state_ranks``) and the time of its recurrent decode step (``decode_times``).

    ranks = state_ranks(model, window)  # window (1, T) token ids
    t = decode_times({"dense": dense, "pruned": pruned}, batch=32, repeats=5)
    speedup = t["dense"]["mixers"] / t["pruned"]["mixers"]
"""

from __future__ import annotations

import numpy as np
import torch

from drrl.eval.timing import interleaved_medians
from drrl.linear_attention.ops import state_rank_utilisation
from drrl.pruning.prune import mixers


@torch.no_grad()
def decode_times(models: dict[str, torch.nn.Module], batch: int, repeats: int, seed: int = 0) -> dict[str, dict]:
    """Per-step seconds (medians of interleaved repeats) of every model's DeltaNet layers alone (``mixers``)
    and of a whole model step (``model``), for ``batch`` sequences decoding after a 16-token prompt."""
    g = torch.Generator().manual_seed(seed)
    any_model = next(iter(models.values()))
    prompt = torch.randint(0, any_model.cfg.vocab_size, (batch, 16), generator=g)
    fns = {}
    for name, m in models.items():
        _, caches = m.prefill(prompt)
        x = torch.randn(batch, m.cfg.d_model, generator=g)
        token = prompt[:, -1]
        layers = mixers(m)

        def mixer_step(layers=layers, caches=caches, x=x):
            for layer, c in zip(layers, caches, strict=True):
                layer.step(x, c)

        def model_step(m=m, caches=caches, token=token):
            m.step(token, caches)

        fns[(name, "mixers")], fns[(name, "model")] = mixer_step, model_step
    out: dict[str, dict] = {}
    for (name, what), t in interleaved_medians(fns, repeats, 0.2).items():
        out.setdefault(name, {})[what] = t
    return out


@torch.no_grad()
def state_ranks(model, window: torch.Tensor) -> dict:
    """Rank diagnostics of every layer's and head's state S_t over the tokens of ``window`` (1, T):
    ``utilisation`` (stable rank / min(d_k, d_v)) and ``effective_rank`` (Roy–Vetterli), each as arrays
    (L, H, T); ``mean`` is the mean utilisation over layers, heads and tokens."""
    layers, inputs = mixers(model), {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0])) for m in layers]
    try:
        model.hidden(window)
    finally:
        for h in hooks:
            h.remove()
    util, erank = [], []
    for layer in layers:
        u = state_rank_utilisation(*layer.delta_inputs(inputs[layer]))
        util.append(u["utilisation"][0].float().numpy())  # (H, T)
        erank.append(u["effective_rank"][0].float().numpy())
    util, erank = np.stack(util), np.stack(erank)
    return {"utilisation": util, "effective_rank": erank, "mean": float(util.mean())}
