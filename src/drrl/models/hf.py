"""A transformers architecture trained by drrl: ``model.kind: hf``, the transformers config under ``model.hf``.

    model:
      kind: hf
      n_layer: 4            # num_hidden_layers
      n_head: 4             # num_attention_heads
      d_model: 256          # hidden_size
      context: 256          # max_position_embeddings
      hf: {model_type: qwen3_5_text, layer_types: [linear_attention, ...], linear_key_head_dim: 64, ...}

transformers builds the model (its own modules and kernels, e.g. the Gated DeltaNet of Qwen3.5 with its pure-PyTorch
chunked fallback on CPU); :class:`HFCausalLM` gives it drrl's language-model interface (``hidden``, the tied
``lm_head``, the chunked loss), so ``drrl train``, ``drrl eval`` and the checkpoints treat it like drrl's own models.
``model.lm`` is the plain transformers model: ``save_pretrained``, ``generate`` and ``drrl prune`` use it.
The sizes drrl already names (width, layers, heads, vocabulary, context) are set from the ``model`` section and may
not be repeated under ``hf``; embeddings are tied.
"""

from __future__ import annotations

import torch

from drrl.models.lm import CausalLM

RESERVED = {  # transformers config key -> the drrl field that sets it
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "context",
    "tie_word_embeddings": "(always tied)",
}


def hf_config(cfg):
    """The transformers config of a ``kind: hf`` model section ``cfg`` (:class:`drrl.models.config.GPTConfig`).
    ValueError names an unknown ``model_type``, a key drrl sets itself, or an architecture without a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    spec = dict(cfg.hf)
    model_type = spec.pop("model_type", None)
    if not model_type:
        raise ValueError("needs model_type, the transformers architecture (e.g. qwen3_5_text)")
    clash = sorted(k for k in spec if k in RESERVED)
    if clash:
        raise ValueError(f"must not set {', '.join(clash)}: set model.{RESERVED[clash[0]]} instead")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        import transformers

        raise ValueError(f"model_type {model_type!r} has no causal LM in transformers {transformers.__version__}; "
                         "choose one it has (e.g. llama) or upgrade transformers")  # fmt: skip
    sizes = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                 vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context, tie_word_embeddings=True)  # fmt: skip
    return AutoConfig.for_model(model_type, **sizes, **spec)


class HFCausalLM(CausalLM):
    """A transformers causal LM built from ``cfg.hf`` (module doc), with drrl's interface."""

    def __init__(self, cfg):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.lm = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.float32)
        self.wte = self.lm.get_input_embeddings()
        self.lm_head = self.lm.get_output_embeddings()
        if self.lm_head.weight is not self.wte.weight:
            raise ValueError(f"{type(self.lm).__name__} does not tie its embeddings; drrl's LM head is the embedding")
        self.rank_controller = None

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` (B, L) token ids, L ≤ ``cfg.context`` -> the final (normed) hidden states (B, L, d_model)."""
        if idx.shape[1] > self.cfg.context:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the model context {self.cfg.context}")
        return self.lm.get_decoder()(input_ids=idx, use_cache=False).last_hidden_state
