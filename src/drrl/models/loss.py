"""Cross-entropy of a linear output layer without materialising the (N, V) logits.

For a GPT-2 vocabulary (V = 50,304) the logits of one CPU batch are hundreds of MB; allocating them
(and their log-softmax and gradient) anew each step spent more time zero-filling fresh pages in the
kernel than the matmuls took. :func:`linear_cross_entropy` walks over row chunks with one reusable
buffer and computes the gradients in the same pass (the approach of chunked/fused linear
cross-entropy kernels), with the same FLOPs as the plain path: 2·N·V·D for the logits and, when
training, 2·N·V·D each for the gradients of the hidden states and of the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, with_grad: bool):
        N, V = h.shape[0], weight.shape[0]
        buf = h.new_empty(min(chunk, max(N, 1)), V)
        grad_h = torch.empty_like(h) if with_grad else None
        grad_w = torch.zeros_like(weight) if with_grad else None
        total = torch.zeros((), dtype=h.dtype, device=h.device)
        for s in range(0, N, chunk):
            hs, ts = h[s : s + chunk], targets[s : s + chunk]
            n = hs.shape[0]
            logits = torch.mm(hs, weight.t(), out=buf[:n])  # (n, V)
            valid = ts != -100
            safe = ts.clamp(min=0)
            target_logit = logits.gather(1, safe[:, None]).squeeze(1)
            m = logits.max(1, keepdim=True).values
            probs = logits.sub_(m).exp_()  # in place: exp(logits - max)
            z = probs.sum(1, keepdim=True)
            total += ((z.log() + m).squeeze(1) - target_logit).masked_fill(~valid, 0).sum()
            if with_grad:  # d(sum NLL)/d logits = softmax - onehot(target), zero for ignored rows
                probs.div_(z)
                probs[torch.arange(n, device=h.device), safe] -= 1
                probs.mul_(valid[:, None])
                torch.mm(probs, weight, out=grad_h[s : s + n])
                grad_w.addmm_(probs.t(), hs)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable  # gradients come from the forward pass: no double backward
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """Summed next-token NLL of ``h @ weight.T``: ``h`` (N, D), ``weight`` (V, D), ``targets`` (N,) with
    -100 = ignore. Equals ``F.cross_entropy(h @ weight.T, targets, ignore_index=-100, reduction="sum")``
    (tested in float64, outputs and gradients)."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk}")
    if h.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"linear_cross_entropy sums in the input dtype and needs float32 or float64, got {h.dtype}")
    bad = ((targets < 0) & (targets != -100)) | (targets >= weight.shape[0])
    if bool(bad.any()):
        raise IndexError(f"target {int(targets[bad][0])} is out of bounds for {weight.shape[0]} classes")
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, with_grad)


def naive_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference for tests."""
    return F.cross_entropy(h @ weight.t(), targets, ignore_index=-100, reduction="sum")
