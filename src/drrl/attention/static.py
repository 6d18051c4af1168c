"""The "fixed low-rank" baseline: every score matrix at one rank r with calibrated maps.

``StaticRankAttention`` is :class:`~drrl.attention.drrl.DynamicLowRankAttention` with a single bucket
(r_max = rank), calibrated bases and a fixed controller: no statistics and no decisions at run time, so it
costs only the two rank-r maps beside attention. Calibrate it like drrl (``with calibrating(model): ...``);
an uncalibrated layer raises. Works causally and bidirectionally; with RoPE the maps act on rotated q/k.
"""

from __future__ import annotations

from drrl.attention.base import check_int, register_attention
from drrl.attention.drrl import DynamicLowRankAttention


@register_attention("static")
class StaticRankAttention(DynamicLowRankAttention):
    """Args: d_model, n_head, causal, bias as :class:`~drrl.attention.base.Attention`; ``rank`` (required,
    1..d_head); ``segment`` (tokens per plan block, causal), ``ridge``, ``n_kv_head`` as drrl."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        causal: bool = True,
        bias: bool = False,
        rank: int | None = None,
        segment: int = 128,
        ridge: float = 1e-6,
        n_kv_head: int | None = None,
    ):
        d_model, n_head = check_int(d_model, "d_model"), check_int(n_head, "n_head")
        d_head = d_model // n_head if d_model % n_head == 0 else None
        r = check_int(rank, "static attention rank", minimum=None, optional=True)
        if r is None or d_head is None or not 0 < r <= d_head:
            raise ValueError(f"static attention needs rank= an integer in 1..d_head={d_head}, got {rank}")
        super().__init__(d_model, n_head, causal=causal, bias=bias, r_max=r, bucket=r, segment=segment,
                         basis="calibrated", controller="fixed", rank=r, ridge=ridge, n_kv_head=n_kv_head)  # fmt: skip
