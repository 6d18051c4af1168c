"""How much the model's next-token distribution cares about each channel of a layer's attention output: the diagonal
of the Fisher information, F_c = E[(∂ℓ/∂o_c)²], with ℓ the summed next-token loss of labels drawn from the model's
own distribution (so that E over labels gives the Fisher of the distribution, not of the data).

For a small change Δo of the attention output at one position, the KL divergence between the model's next-token
distributions before and after is ½ Δoᵀ F Δo to second order; its diagonal part ½ Σ_c F_c Δo_c² is what a rank
decision's output error costs in the units of the loss. A layer whose ``output_fisher`` is set reports that estimate
per executed decision (:class:`drrl.controllers.Feedback` ``error``), so a learned controller can be rewarded per
layer and segment in nats instead of sharing one model-level KL among every layer's decisions.

>>> with measuring_output_fisher(layers):
...     for ids in windows:
...         loss_of_sampled_labels(model, ids).backward()    # drrl.eval.allocation.output_fisher does this
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def add_squared_grad(acc: list, grad: torch.Tensor) -> None:
    """Backward hook of a layer's (B, H, L, d) output while measuring: adds Σ over rows and positions of the squared
    gradient per (head, channel) to ``acc[0]`` and the positions to ``acc[1]``."""
    acc[0] += grad.detach().double().pow(2).sum((0, 2))
    acc[1] += grad.shape[0] * grad.shape[2]


def segment_error(y: torch.Tensor, teacher: torch.Tensor, fisher: torch.Tensor, segment: int) -> torch.Tensor:
    """½ Σ_c F_{h,c}·(y − teacher)² per head and position, averaged over the rows and over each segment's positions:
    (B, H, L, d) outputs, (H, d) Fisher -> (n_segments, H) estimated KL per token, float32. The diagonal Fisher
    makes the estimate additive over heads: a segment's is the sum of its row."""
    B, H, L, _ = y.shape
    err = 0.5 * torch.einsum("bhld,hd->lh", (y - teacher).float().pow(2), fisher.float()) / B
    counts = [min(segment, L - s * segment) for s in range(-(-L // segment))]
    return F.pad(err, (0, 0, 0, -L % segment)).view(-1, segment, H).sum(1) / err.new_tensor(counts)[:, None]


@contextmanager
def measuring_output_fisher(layers: Sequence):
    """Inside the block, every backward pass through the drrl ``layers`` adds the squared gradient of their attention
    outputs (B, H, L, d) per (head, channel); on exit each layer's ``output_fisher`` becomes the (H, d) mean over
    the positions seen (float32). Layers that saw no backward pass keep their previous value."""
    for m in layers:
        m._fisher_acc = [torch.zeros(m.n_head, m.d_head, dtype=torch.float64, device=m.pq.device), 0]
    try:
        yield layers
    finally:
        accs = [m._fisher_acc for m in layers]
        for m in layers:
            m._fisher_acc = None
    for m, (total, tokens) in zip(layers, accs, strict=True):
        if tokens:
            m.output_fisher = (total / tokens).float()
