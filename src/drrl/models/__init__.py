"""Models: ``GPT`` (decoder-only LM with pluggable attention), ``DeltaNetLM`` (linear-attention LM) and
``EncoderClassifier`` (BERT-style); ``build_model(cfg)`` picks the LM by ``cfg.kind``."""

from drrl.models.deltanet import DeltaNetConfig, DeltaNetLM
from drrl.models.encoder import EncoderClassifier, EncoderConfig
from drrl.models.gpt import GPT, GPTConfig, build_model

__all__ = ["GPT", "DeltaNetConfig", "DeltaNetLM", "EncoderClassifier", "EncoderConfig", "GPTConfig", "build_model"]
