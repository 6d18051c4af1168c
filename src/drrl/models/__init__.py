"""Models: ``GPT`` (decoder-only LM) and ``EncoderClassifier`` (BERT-style), both with pluggable attention."""

from drrl.models.encoder import EncoderClassifier, EncoderConfig
from drrl.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "EncoderClassifier", "EncoderConfig", "GPTConfig"]
