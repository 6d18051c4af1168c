"""Perplexity of a causal LM over a token array, with non-overlapping or sliding windows."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from drrl.config import require
from drrl.data.tokens import Window, eval_windows


@dataclass
class EvalConfig:
    corpus: str | None = None  # None = the training corpus
    split: Literal["train", "validation", "test"] = "validation"
    context: int | None = None  # None = the model's context
    stride: int | None = None  # None = non-overlapping windows; < context = sliding windows
    batch_size: int = 8
    periodic_max_tokens: int = 32768  # evaluations during training read at most this many tokens

    def __post_init__(self):
        require(
            self.context is None or self.context > 0,
            "context",
            f"must be a positive integer, got {self.context}",
        )
        require(self.stride is None or self.stride > 0, "stride", f"must be a positive integer, got {self.stride}")
        if self.context is not None and self.stride is not None:
            require(
                self.stride <= self.context,
                "stride",
                f"must be <= context ({self.context}), got {self.stride}",
            )
        require(self.batch_size > 0, "batch_size", f"must be a positive integer, got {self.batch_size}")
        require(
            self.periodic_max_tokens > 1,
            "periodic_max_tokens",
            f"must be > 1, got {self.periodic_max_tokens}",
        )


def _window_tensors(tokens: np.ndarray, w: Window) -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.from_numpy(np.asarray(tokens[w.start : w.end], dtype=np.int64))
    x, y = seq[:-1], seq[1:].clone()
    n_old = w.score_from - (w.start + 1)  # targets already scored by an earlier window
    y[:n_old] = -100
    return x, y


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    tokens: np.ndarray,
    context: int,
    *,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """Mean next-token loss and perplexity; every target token is scored exactly once.

    ``bf16`` runs the model under bf16 autocast (the loss is always summed in fp32). ``shard=(rank, size)``
    (data-parallel training, process group initialised) scores every ``size``-th window from ``rank`` on and
    sums the losses over the processes: every process returns the result of the whole split.
    Returns ``{"loss", "ppl", "tokens" (scored targets), "seconds", "context", "stride"}``.
    """
    device = torch.device(device)
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    windows = eval_windows(n, context, stride)
    rank, size = shard
    windows = windows[rank::size]
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    total, count = 0.0, 0
    try:
        i = 0
        while i < len(windows):
            length = windows[i].end - windows[i].start
            j = i
            while j < len(windows) and j - i < batch_size and windows[j].end - windows[j].start == length:
                j += 1
            xs, ys = zip(*(_window_tensors(tokens, w) for w in windows[i:j]), strict=True)
            x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if hasattr(model, "nll"):  # summed NLL without materialising the logits where possible
                    loss = model.nll(x, y)
                else:
                    logits = model(x)
                    loss = F.cross_entropy(
                        logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"
                    )
            total += loss.item()
            count += int((y != -100).sum())
            i = j
    finally:
        model.train(was_training)
    if size > 1:
        import torch.distributed as dist

        sums = torch.tensor([total, count], dtype=torch.float64)
        sums = sums.to(device) if dist.get_backend() == "nccl" else sums
        dist.all_reduce(sums)
        total, count = sums[0].item(), int(sums[1].item())
    mean = total / max(count, 1)
    return {
        "loss": mean,
        "ppl": math.exp(mean),
        "tokens": count,
        "seconds": time.perf_counter() - t0,
        "context": context,
        "stride": stride or context,
    }
