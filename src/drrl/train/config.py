"""The run configuration: ``model``, ``data``, ``train`` and ``eval`` sections of a YAML file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from drrl.config import apply_overrides, from_dict, load_yaml, require, to_dict
from drrl.controllers import controller_class
from drrl.eval.perplexity import EvalConfig
from drrl.models.config import GPTConfig
from drrl.rl.config import RLConfig

__all__ = ["DataConfig", "EvalConfig", "GPTConfig", "RLConfig", "RunConfig", "TrainConfig"]


@dataclass
class DataConfig:
    corpus: str = "shakespeare"  # shakespeare | text:PATH | wikitext-2 | wikitext-103 | wikitext-2:DIR
    tokenizer: str = "gpt2"  # gpt2 | hf:NAME_OR_DIR

    def __post_init__(self):
        require(bool(self.corpus.strip()), "corpus", "must name a corpus, e.g. shakespeare or text:PATH")


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # end of the cosine decay
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    weight_decay: float = 0.1  # AdamW, applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    log_every: int = 10  # steps between metrics.jsonl lines
    eval_every: int = 250  # steps between validation evaluations; 0 = only at the end
    checkpoint_every: int = 250  # steps between checkpoints (the last step is always saved)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = fp32 on CPU, bf16 autocast on CUDA
    threads: int | None = None  # torch.set_num_threads; None = torch's default
    mode: Literal["lm", "hybrid", "policy"] = "lm"  # lm | hybrid (L_LM + λ·L_RL) | policy (LM frozen)
    init_from: str | None = None  # start from this run/checkpoint's weights (e.g. a trained LM for mode=policy)
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (ddp) or shard (fsdp) the model

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            require(v > 0, name, f"must be a positive integer, got {v}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            v = getattr(self, name)
            require(v >= 0, name, f"must be >= 0, got {v}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            require(0 <= v < 1, name, f"must be in [0, 1), got {v}")
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            f"must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        require(
            self.threads is None or self.threads > 0,
            "threads",
            f"must be a positive integer, got {self.threads}",
        )


@dataclass
class RunConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def __post_init__(self):
        if self.eval.context is not None:
            require(
                self.eval.context <= self.model.context,
                "eval.context",
                f"must be <= model.context ({self.model.context}), got {self.eval.context}",
            )
        window = self.eval.context or self.model.context
        if self.eval.stride is not None:
            require(
                self.eval.stride <= window,
                "eval.stride",
                f"must be <= the eval context ({window}), got {self.eval.stride}",
            )

        rl_controller = self._learned_controller()
        require(
            rl_controller or self.train.mode == "lm",
            "train.mode",
            f"{self.train.mode} trains a rank policy: set model.attention=drrl and model.attention_kwargs.controller=rl",
        )
        require(
            not rl_controller or self.train.mode != "lm",
            "model.attention_kwargs.controller",
            f"{self.model.attention_kwargs.get('controller')} needs train.mode=hybrid (language model and policy) or "
            "train.mode=policy (policy only)",
        )
        require(
            not (rl_controller and self.train.distributed == "fsdp"),
            "train.distributed",
            "fsdp shards language models without a rank policy; use ddp for controller=rl (the policy is small "
            "enough to replicate)",
        )
        require(
            self.rl.fidelity == "cosine",
            "rl.fidelity",
            "kl (the model's output against the full-rank model's) and fisher (each layer's output Fisher) are offered "
            "by drrl demo, where the language model is frozen; drrl train uses cosine for now",
        )
        require(
            not (self.model.attention == "drrl" and self.model.attention_kwargs.get("basis") == "calibrated"),
            "model.attention_kwargs.basis",
            "must be online (the default) for training: calibrated bases are fitted to a trained model and go "
            "stale while it trains; calibrate after training (drrl.attention.calibrating)",
        )

    def _learned_controller(self) -> bool:
        """Whether the model's attention picks its ranks with a controller that learns (the registry says so)."""
        name = self.model.attention_kwargs.get("controller")
        if not isinstance(name, str):
            return False
        try:
            return controller_class(name).learns
        except ValueError:  # the attention's own check has reported it already
            return False

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        return from_dict(cls, data)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
        """Read a YAML file (or start from defaults) and apply ``key=value`` overrides."""
        data = load_yaml(path) if path is not None else {}
        return from_dict(cls, apply_overrides(data, overrides))
