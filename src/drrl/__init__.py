"""drrl: adaptive-rank transformers.

>>> import drrl
>>> drrl.fit("configs/shakespeare-gpt-tiny.yaml", out="runs/tiny", overrides=["train.max_steps=50"])
>>> drrl.evaluate("runs/tiny")["ppl"]

Names are imported on first use, so ``import drrl`` (and ``drrl --help``) does not load torch.
The training entry point is ``drrl.fit``: ``drrl.train`` is the subpackage of the training loop.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "fit": "drrl.api",
    "evaluate": "drrl.api",
    "load": "drrl.api",
    "GPT": "drrl.models.gpt",
    "GPTConfig": "drrl.models.gpt",
    "RunConfig": "drrl.train.config",
    "DrrlError": "drrl.errors",
    "ConfigError": "drrl.errors",
    "DataError": "drrl.errors",
    "CheckpointError": "drrl.errors",
}
__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'drrl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
