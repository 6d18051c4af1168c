"""The exact SDPA calls of low-rank attention: rank-r queries and keys with full-width values, a causal run of
segments that starts at an offset, and the kernel path each device takes (see the package docstring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kernel_path(device_type: str, width: int, d_head: int) -> str:
    """The fastest exact SDPA call for rank-``width`` queries/keys and values of width ``d_head``:
    ``sdpa`` (equal widths), ``sdpa-padded`` (CPU: pad q/k with zeros to d_head, keeps the fused kernel)
    or ``sdpa-narrow`` (CUDA: efficient/cuDNN backends take q/k narrower than v)."""
    if width == d_head:
        return "sdpa"
    return "sdpa-narrow" if device_type == "cuda" else "sdpa-padded"


def _flash_cpu_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _merge_applies(q, k, v) -> bool:
    """The log-sum-exp merge runs the fused CPU kernel, which has no autograd formula for its log-sum-exp:
    CPU, equal widths and dtypes, and no gradient needed."""
    return (
        q.device.type == "cpu"
        and q.shape[-1] == v.shape[-1]
        and q.dtype == k.dtype == v.dtype
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        and _flash_cpu_available()
    )


def attend_offset(q, k, v, offset: int, scale: float, *, merge: bool | None = None) -> torch.Tensor:
    """Causal attention of queries at positions [offset, offset + Tq) against keys/values [0, offset + Tq).

    ``q`` (B, H, Tq, w), ``k`` (B, H, offset + Tq, w), ``v`` (B, H, offset + Tq, d). With ``merge`` (default:
    CPU, no gradient needed, equal widths) the diagonal block runs causally and the off-diagonal block
    unmasked through the fused CPU kernel, merged by their log-sum-exps; otherwise one SDPA call with a
    boolean mask (differentiable, any device).
    """
    if offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if merge is None:
        merge = _merge_applies(q, k, v)
    tq = q.shape[-2]
    if merge:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        o1, l1 = op(q, k[..., offset:, :], v[..., offset:, :], is_causal=True, scale=scale)[:2]
        o2, l2 = op(q, k[..., :offset, :], v[..., :offset, :], is_causal=False, scale=scale)[:2]
        m = torch.maximum(l1, l2)
        w1, w2 = (l1 - m).exp().unsqueeze(-1), (l2 - m).exp().unsqueeze(-1)
        return ((o1 * w1 + o2 * w2) / (w1 + w2)).to(q.dtype)
    mask = torch.ones(tq, offset + tq, dtype=torch.bool, device=q.device).tril(offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def sdpa_lowrank(q, k, v, offset: int, scale: float, causal: bool) -> tuple[torch.Tensor, str, int]:
    """SDPA on rank-r q, k (any width ≤ d) and full-width v, by the fastest exact path for the device.
    Returns the output, the path taken and the number of (query, key) score entries the kernel computes."""
    d = v.shape[-1]
    q, k, v = (x.to(q.dtype) for x in (q, k, v))  # one dtype (autocast can leave v in another)
    path = kernel_path(q.device.type, q.shape[-1], d)
    if path == "sdpa-padded":
        q, k = F.pad(q, (0, d - q.shape[-1])), F.pad(k, (0, d - k.shape[-1]))
    tq, tk = q.shape[-2], k.shape[-2]
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale), path, tq * tk
    merge = offset > 0 and _merge_applies(q, k, v)
    entries = tq * offset + tq * (tq + 1) // 2 if offset == 0 or merge else tq * tk  # a masked call computes all
    out = attend_offset(q, k, v, offset, scale, merge=merge if offset else None)
    return out, path + ("+merge" if merge else "+mask" if offset else ""), entries
