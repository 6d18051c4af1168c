"""Perplexity of a causal LM over a token array (non-overlapping or sliding windows) or a list of windows."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
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


def _pairs(tokens, context: int | None, stride: int | None, max_tokens: int | None) -> list[tuple]:
    """(inputs, targets) of every window: a token array cut by :func:`drrl.data.tokens.eval_windows` (targets
    scored by an earlier window are -100), or a list of 1-D windows of ids (each scores all but its first)."""
    if isinstance(tokens, (list, tuple)):
        return [(w[:-1], w[1:]) for w in tokens]
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    return [_window_tensors(tokens, w) for w in eval_windows(n, context, stride)]


def _summed_nll(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of a batch: drrl's LMs (``nll`` avoids materialising the logits where it can) or a
    Hugging Face causal LM (called without its KV cache)."""
    if hasattr(model, "nll"):
        return model.nll(x, y)
    if hasattr(model, "config") and hasattr(model.config, "model_type"):  # a Hugging Face model
        logits = model(input_ids=x, use_cache=False).logits
    else:
        logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    tokens: np.ndarray | Sequence[torch.Tensor],
    context: int | None = None,
    *,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    shard: tuple[int, int] = (0, 1),
    on_batch: Callable[[int, float], None] | None = None,
    set_eval: bool = True,
    per_batch: bool = False,
) -> dict:
    """Mean next-token loss and perplexity of a causal LM (drrl's or a Hugging Face one); every target token
    is scored exactly once. The one perplexity of drrl: training, ``drrl eval``, the demo and compress use it.

    ``tokens`` is a token array cut into windows of ``context`` tokens (non-overlapping, or sliding by
    ``stride``), or a list of 1-D tensors of ids, one window each (e.g. evenly spread test windows). Windows of
    equal length are batched up to ``batch_size``. ``bf16`` runs the model under bf16 autocast (the loss is
    always summed in fp32). ``shard=(rank, size)`` (data-parallel training, process group initialised) scores
    every ``size``-th window from ``rank`` on and sums the losses over the processes: every process returns the
    result of the whole split. ``on_batch(targets, forward_seconds)`` is called after each batch (progress,
    per-window bookkeeping). ``set_eval`` puts the model in eval mode for the evaluation and gives every module
    its own mode back afterwards; ``False`` evaluates in the modes the caller set (the demo's frozen LLM, whose
    rank controllers keep theirs). Returns ``{"loss", "ppl", "tokens" (scored targets), "seconds", "context",
    "stride"}``; with ``per_batch`` also ``"batch_nll"`` and ``"batch_tokens"``, this process's summed NLL and
    scored targets per batch: per window with ``batch_size=1`` (bootstrap intervals, :mod:`drrl.eval.bootstrap`).
    """
    device = torch.device(device)
    rank, size = shard
    pairs = _pairs(tokens, context, stride, max_tokens)[rank::size]
    modes = {m: m.training for m in model.modules()} if set_eval else {}
    if set_eval:
        model.eval()
    t0 = time.perf_counter()
    total, count, batch_nll, batch_tokens = 0.0, 0, [], []
    try:
        i = 0
        while i < len(pairs):
            length = len(pairs[i][0])
            j = i
            while j < len(pairs) and j - i < batch_size and len(pairs[j][0]) == length:
                j += 1
            xs, ys = zip(*pairs[i:j], strict=True)
            x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
            t_fwd = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = _summed_nll(model, x, y)
            n = int((y != -100).sum())
            batch_nll.append(loss.item())
            batch_tokens.append(n)
            total += batch_nll[-1]
            count += n
            if on_batch is not None:
                on_batch(n, time.perf_counter() - t_fwd)
            i = j
    finally:
        for m, mode in modes.items():
            m.train(mode)
    if size > 1:
        import torch.distributed as dist

        sums = torch.tensor([total, count], dtype=torch.float64)
        sums = sums.to(device) if dist.get_backend() == "nccl" else sums
        dist.all_reduce(sums)
        total, count = sums[0].item(), int(sums[1].item())
    mean = total / max(count, 1)
    extra = {"batch_nll": batch_nll, "batch_tokens": batch_tokens} if per_batch else {}
    return {
        "loss": mean,
        "ppl": math.exp(mean),
        "tokens": count,
        "seconds": time.perf_counter() - t0,
        "context": context,
        "stride": stride or context,
        **extra,
    }
