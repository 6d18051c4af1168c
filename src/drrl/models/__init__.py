"""Models: ``GPT`` (decoder-only LM with pluggable attention), ``DeltaNetLM`` (linear-attention LM) and
``EncoderClassifier`` (BERT-style), their configurations (``config``), and ``build_model(cfg)``, which picks the
LM by ``cfg.kind``. Attention and controllers are chosen by name from the rooms below."""

from drrl.models.config import DeltaNetConfig, GPTConfig
from drrl.models.deltanet import DeltaNetLM
from drrl.models.encoder import EncoderClassifier, EncoderConfig
from drrl.models.gpt import GPT, build_model

__all__ = ["GPT", "DeltaNetConfig", "DeltaNetLM", "EncoderClassifier", "EncoderConfig", "GPTConfig", "build_model"]
