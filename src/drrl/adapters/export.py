"""Save an adapted model and rebuild it on a fresh copy of its base model; merge adapters into dense layers.

``save_adapted(model, report, DIR)`` writes ``DIR/model.safetensors`` (every weight, shared tensors once)
and ``DIR/adapters.json`` (the module structure: type and shape of each replaced module, plus the fitting
report). ``load_adapted(base_model, DIR)`` replaces the same modules in a freshly loaded base model and
loads the weights strictly: outputs are identical to the saved model's. Nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from drrl.adapters.layers import NeuronAdapterMLP, NeuronMaskedLinear, RankAdapter, SharedBasis, SharedRankSlice
from drrl.adapters.model import CompressionReport, _set_submodule, prepare_decode
from drrl.errors import DrrlError
from drrl.utils import atomic_dir, pickle_kind

FORMAT = "drrl-adapters-v1"


def adapter_spec(model: nn.Module) -> dict[str, dict]:
    """Module path -> type and shapes of every adapter module (shared bases once, under their first path)."""
    names = {id(m): n for n, m in model.named_modules()}
    spec: dict[str, dict] = {}
    for name, m in model.named_modules():
        if isinstance(m, RankAdapter):
            spec[name] = {"type": "rank", "d_in": m.in_features, "d_out": m.out_features, "n_b": m.n_b,
                          "bias": m.bias is not None}  # fmt: skip
        elif isinstance(m, SharedRankSlice):
            spec[name] = {"type": "slice", "basis": names[id(m.basis)], "d_out": m.out_features,
                          "bias": m.bias is not None}  # fmt: skip
        elif isinstance(m, SharedBasis):
            spec[name] = {"type": "basis", "d_in": m.b.shape[1], "n_b": m.n_b, "d_out": m.d_out}
        elif isinstance(m, NeuronMaskedLinear):
            spec[name] = {"type": "neuron", "d_in": m.in_features, "d_out": m.out_features,
                          "bias": m.bias is not None}  # fmt: skip
        elif isinstance(m, NeuronAdapterMLP):
            spec[name] = {"type": "neuron_mlp"}
    return spec


def save_adapted(model: nn.Module, report: CompressionReport | None, out: str | Path) -> Path:
    """Write the adapted model to the folder ``out`` (replaced atomically: never half-written)."""
    from safetensors.torch import save_model

    out = Path(out)
    with atomic_dir(out) as tmp:
        save_model(model, str(tmp / "model.safetensors"), force_contiguous=True)  # decode_layout: column-major A
        meta = {"format": FORMAT, "spec": adapter_spec(model), "report": asdict(report) if report else None}
        (tmp / "adapters.json").write_text(json.dumps(meta, indent=1, default=float))
    return out


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def load_adapted(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild the adapters saved by :func:`save_adapted` in ``model`` (a fresh copy of the same base model)
    and load every weight (strict), with their decode path on (in eval mode, steps of a few tokens run through
    :mod:`drrl.kernels`). Returns ``model``."""
    from safetensors.torch import load_model

    path = Path(path)
    meta_file, weights = path / "adapters.json", path / "model.safetensors"
    if not meta_file.is_file() or not weights.is_file():
        raise DrrlError(
            f"{path} is not an adapted model (needs adapters.json and model.safetensors from drrl compress)"
        )
    if kind := pickle_kind(weights):
        raise DrrlError(
            f"{weights} is a {kind}, not safetensors; drrl never unpickles files (loading one can run arbitrary "
            "code): save adapted models with drrl.adapters.export.save_adapted"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise DrrlError(f"{meta_file}: unknown format {meta.get('format')!r}; expected {FORMAT}")
    like = next(model.parameters())
    spec = meta["spec"]
    bases = {}
    for name, s in spec.items():  # bases first: slices refer to them
        if s["type"] == "basis":
            bases[name] = SharedBasis(_empty((s["n_b"], s["d_in"]), like), 0.0, s["d_out"])
    try:
        for name, s in spec.items():
            t = s["type"]
            if t == "rank":
                new = RankAdapter(_empty((s["d_out"], s["n_b"]), like), _empty((s["n_b"], s["d_in"]), like), 0.0,
                                  _empty((s["d_out"],), like) if s["bias"] else None)  # fmt: skip
            elif t == "slice":
                b = bases[s["basis"]]
                new = SharedRankSlice(b, _empty((s["d_out"], b.n_b), like),
                                      _empty((s["d_out"],), like) if s["bias"] else None)  # fmt: skip
            elif t == "neuron":
                new = NeuronMaskedLinear(_empty((s["d_out"], s["d_in"]), like), 0.0,
                                         _empty((s["d_out"],), like) if s["bias"] else None)  # fmt: skip
            elif t == "neuron_mlp":
                old = model.get_submodule(name)
                new = NeuronAdapterMLP(old.gate_proj, old.up_proj, old.down_proj, old.act_fn, 0.0)
            else:
                continue  # bases are installed with their slices
            _set_submodule(model, name, new)
    except AttributeError as e:
        raise DrrlError(f"{path} does not fit this base model ({e}); load the model it was compressed from") from None
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as e:
        raise DrrlError(
            f"{path} does not fit this base model ({str(e).splitlines()[0][:160]}); load the model it was "
            "compressed from"
        ) from None
    return prepare_decode(model)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Replace every rank adapter and neuron mask by a dense ``nn.Linear`` (A B, W): the mask is dropped, so the
    result is the static low-rank model (for recovery fine-tuning or export to tools that know only Linear)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, RankAdapter | SharedRankSlice | NeuronMaskedLinear):
            if isinstance(m, RankAdapter):
                w = m.merged_weight()
            elif isinstance(m, SharedRankSlice):
                w = m.a @ m.basis.b
            else:
                w = m.weight
            lin = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None).to(w.device, w.dtype)
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
            _set_submodule(model, name, lin)
        elif isinstance(m, NeuronAdapterMLP):
            raise ValueError(f"{name}: a neuron adapter has no dense equivalent other than the original MLP")
    return model
