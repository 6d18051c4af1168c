"""Training: the run config, the language-model loop (with the rank policy beside it through
:class:`drrl.rl.PolicyTrainer`), checkpoints, torchrun data parallelism (DDP/FSDP) and LoRA recovery."""

from drrl.train.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from drrl.train.config import DataConfig, RunConfig, TrainConfig
from drrl.train.loop import lr_at, train

__all__ = [
    "Checkpoint",
    "DataConfig",
    "RunConfig",
    "TrainConfig",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
    "resolve_checkpoint",
    "save_checkpoint",
    "train",
]
