"""drrl: adaptive-rank transformers.

>>> import drrl
>>> drrl.train("configs/shakespeare-gpt-tiny.yaml", out="runs/tiny", overrides=["train.max_steps=50"])
>>> drrl.evaluate("runs/tiny")["ppl"]
"""

from drrl.api import evaluate, load, train
from drrl.errors import CheckpointError, ConfigError, DataError, DrrlError
from drrl.models import GPT, GPTConfig
from drrl.train.config import RunConfig

__version__ = "0.1.0"
__all__ = [
    "GPT",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DrrlError",
    "GPTConfig",
    "RunConfig",
    "__version__",
    "evaluate",
    "load",
    "train",
]
