"""Where adapters go and what they are fitted on: find a model's MLPs and q/k/v projections by structure, and
collect the calibration inputs of their linears (an input Gram over every token plus a uniform token sample).
Sites found: gated MLPs (``gate_proj``/``up_proj``/``down_proj``/``act_fn``: Llama, Mistral, Qwen, SmolLM),
plain MLPs (Hugging Face BERT ``intermediate``/``output``; drrl's encoder ``fc``/``out`` and GPT
``fc``/``proj``), and q/k/v projections (``q_proj``/``k_proj``/``v_proj``, BERT ``query``/``key``/``value``, or
drrl's stacked ``qkv``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from drrl.attention.base import Attention
from drrl.progress import progress as progress_bar

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
        for batch in progress_bar(list(calibration), desc="calibrate", unit="batch", disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)
            _forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    if not cols or next(iter(cols.values())).tokens == 0:
        raise ValueError("the calibration data is empty; pass at least one batch of token ids")
    return cols
