"""Models: ``GPT`` (decoder-only LM with pluggable attention)."""

from drrl.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
