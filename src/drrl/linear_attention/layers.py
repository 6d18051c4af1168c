"""DeltaNet and Gated DeltaNet token mixers in pure PyTorch, with flash-linear-attention's parameter names.

Per head (H heads, key width d_k, value width d_v), for input x_t ∈ R^D:
    q_t = SiLU(conv(W_q x)),  k_t = SiLU(conv(W_k x)),  v_t = SiLU(conv(W_v x)),  β_t = σ(w_bᵀ x_t)
    q̂, k̂ = q/‖q‖, k/‖k‖                                  (after any channel slicing: keys stay unit-norm)
    S_t = α_t (I − β_t k̂_t k̂_tᵀ) S_{t−1} + β_t k̂_t v_tᵀ    (α_t = 1 for DeltaNet; exp(g_t) when gated)
    o_t = RMSNorm(s · S_tᵀ q̂_t)  [· SiLU(W_g x_t) when gated],   then o_proj over the heads.
with conv a causal depthwise convolution over time (kernel ``conv_size``) and
g_t = −exp(A_log) · softplus(w_aᵀ x_t + dt_bias) for Gated DeltaNet.

Training runs the chunked WY form, decoding the recurrent form (``step``); both give the same outputs.
``slice_qk`` keeps d' channels per head of q and k (the same ones for both, and their convolutions), which
shrinks the state to d' × d_v; the score scale s stays the original d_k^{-1/2} so a pruned layer computes
the same function of its kept channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from drrl.linear_attention.ops import delta_rule_chunked, delta_rule_step


class ShortConvolution(nn.Conv1d):
    """Causal depthwise convolution over time followed by SiLU: x (B, T, C) -> (B, T, C)."""

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv1d(x.transpose(1, 2), self.weight, padding=self.kernel_size[0] - 1, groups=self.groups)
        return F.silu(y[..., : x.shape[1]].transpose(1, 2))

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """The decode cache after the sequence ``x`` (B, T, C): its last kernel_size − 1 inputs (B, C, K − 1)."""
        w = self.kernel_size[0] - 1
        x = x.transpose(1, 2)[..., -w:] if w else x.new_zeros(x.shape[0], x.shape[2], 0)
        return F.pad(x, (w - x.shape[-1], 0))

    def step(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token x (B, C) with cache (B, C, K − 1) -> (y (B, C), new cache)."""
        window = torch.cat([cache, x.unsqueeze(-1)], dim=-1)  # (B, C, K)
        return F.silu((window * self.weight.squeeze(1)).sum(-1)), window[..., 1:]

    def set_weight(self, weight: torch.Tensor) -> None:
        """Replace the kernels by ``weight`` (C', 1, K): the layer now has C' channels."""
        self.weight = nn.Parameter(weight.detach().clone().contiguous())
        self.in_channels = self.out_channels = self.groups = weight.shape[0]

    def keep_channels(self, rows: torch.Tensor) -> None:
        self.set_weight(self.weight.detach()[rows])


class DeltaNet(nn.Module):
    """DeltaNet (``gated=False``) or Gated DeltaNet (``gated=True``) token mixer: x (B, T, D) -> (B, T, D).

    Args:
        d_model: model width D.
        n_head: heads H.
        head_k_dim, head_v_dim: d_k (state rows, what pruning shrinks) and d_v; stored separately.
        conv_size: kernel of the short causal convolutions on q, k and v.
        gated: add the decay α_t = exp(g_t) and the SiLU output gate (Gated DeltaNet).
        chunk_size: tokens per chunk of the training form.
        scale: the readout scale s; default head_k_dim^{-1/2} (kept unchanged by ``slice_qk``).
        norm_eps: epsilon of the per-head output RMSNorm.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        head_k_dim: int,
        head_v_dim: int,
        *,
        conv_size: int = 4,
        gated: bool = False,
        chunk_size: int = 64,
        scale: float | None = None,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("n_head", n_head), ("head_k_dim", head_k_dim)):
            if v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        if head_v_dim < 1 or conv_size < 1 or chunk_size < 1:
            raise ValueError(
                f"head_v_dim, conv_size and chunk_size must be positive, got {head_v_dim}, {conv_size}, {chunk_size}"
            )
        self.n_head, self.head_k_dim, self.head_v_dim = n_head, head_k_dim, head_v_dim
        self.gated, self.chunk_size = gated, chunk_size
        self.scale = float(scale) if scale is not None else head_k_dim**-0.5
        kd, vd = n_head * head_k_dim, n_head * head_v_dim
        self.q_proj = nn.Linear(d_model, kd, bias=False)
        self.k_proj = nn.Linear(d_model, kd, bias=False)
        self.v_proj = nn.Linear(d_model, vd, bias=False)
        self.b_proj = nn.Linear(d_model, n_head, bias=False)
        self.q_conv1d = ShortConvolution(kd, conv_size)
        self.k_conv1d = ShortConvolution(kd, conv_size)
        self.v_conv1d = ShortConvolution(vd, conv_size)
        if gated:
            self.a_proj = nn.Linear(d_model, n_head, bias=False)
            self.A_log = nn.Parameter(torch.empty(n_head).uniform_(1, 16).log())
            dt = torch.exp(torch.empty(n_head).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
            self.g_proj = nn.Linear(d_model, vd, bias=False)
        self.o_norm = nn.RMSNorm(head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(vd, d_model, bias=False)

    # ------------------------------------------------------------------ pieces shared by both forms
    def _heads(self, x: torch.Tensor, d: int) -> torch.Tensor:  # (B, T, H·d) -> (B, H, T, d)
        return x.unflatten(-1, (self.n_head, d)).transpose(1, 2)

    def _beta_g(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # -> (B, T, H) each
        beta = torch.sigmoid(self.b_proj(x))
        if not self.gated:
            return beta, None
        dt = torch.promote_types(x.dtype, torch.float32)  # the decay in float32 at least (bf16 loses it)
        return beta, -self.A_log.to(dt).exp() * F.softplus(self.a_proj(x).to(dt) + self.dt_bias.to(dt))

    def _readout(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # o (..., H, d_v), x (..., D)
        o = self.o_norm(o)
        if self.gated:
            o = o * F.silu(self._gate(x))
        return self.o_proj(o.flatten(-2))

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        return self.g_proj(x).unflatten(-1, (self.n_head, self.head_v_dim))

    # ------------------------------------------------------------------ training / prefill
    def _inputs(self, x: torch.Tensor):
        """The projections (pre-convolution) and the delta rule's inputs q̂, k̂, v (B, H, T, ·), β, g (B, H, T)."""
        pq, pk, pv = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = F.normalize(self._heads(self.q_conv1d(pq), self.head_k_dim), dim=-1)
        k = F.normalize(self._heads(self.k_conv1d(pk), self.head_k_dim), dim=-1)
        v = self._heads(self.v_conv1d(pv), self.head_v_dim)
        beta, g = self._beta_g(x)
        return (pq, pk, pv), (q, k, v, beta.transpose(1, 2), None if g is None else g.transpose(1, 2))

    def delta_inputs(self, x: torch.Tensor) -> tuple:
        """(q̂, k̂, v, β, g) that the delta rule receives for the input x (B, T, D), in the ops' layout."""
        return self._inputs(x)[1]

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). With ``cache`` (an empty dict) it is filled for :meth:`step`."""
        (pq, pk, pv), (q, k, v, beta, g) = self._inputs(x)
        o, state = delta_rule_chunked(
            q, k, v, beta, g, scale=self.scale, chunk_size=self.chunk_size, output_final_state=cache is not None
        )
        if cache is not None:
            cache.update(q=self.q_conv1d.tail(pq), k=self.k_conv1d.tail(pk), v=self.v_conv1d.tail(pv), state=state)
        return self._readout(o.transpose(1, 2), x)

    # ------------------------------------------------------------------ decoding
    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token x (B, D) -> (B, D), updating ``cache`` (from :meth:`forward` or :meth:`empty_cache`)."""
        q, cache["q"] = self.q_conv1d.step(self.q_proj(x), cache["q"])
        k, cache["k"] = self.k_conv1d.step(self.k_proj(x), cache["k"])
        v, cache["v"] = self.v_conv1d.step(self.v_proj(x), cache["v"])
        q = F.normalize(q.unflatten(-1, (self.n_head, self.head_k_dim)), dim=-1)
        k = F.normalize(k.unflatten(-1, (self.n_head, self.head_k_dim)), dim=-1)
        beta, g = self._beta_g(x)
        o, cache["state"] = delta_rule_step(
            q, k, v.unflatten(-1, (self.n_head, self.head_v_dim)), beta, g, cache["state"], scale=self.scale
        )
        return self._readout(o.to(x.dtype), x)

    def empty_cache(self, batch: int, device=None, dtype=torch.float32) -> dict:
        w = self.q_conv1d.kernel_size[0] - 1
        kd, vd = self.n_head * self.head_k_dim, self.n_head * self.head_v_dim
        z = lambda *s, dt=dtype: torch.zeros(*s, device=device, dtype=dt)
        return {
            "q": z(batch, kd, w),
            "k": z(batch, kd, w),
            "v": z(batch, vd, w),
            "state": z(batch, self.n_head, self.head_k_dim, self.head_v_dim, dt=torch.float32),
        }

    def state_bytes(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the recurrent state (the d_k × d_v matrices of every head) for ``batch`` sequences."""
        return batch * self.n_head * self.head_k_dim * self.head_v_dim * torch.finfo(dtype).bits // 8

    # ------------------------------------------------------------------ structured Q/K pruning
    def slice_qk(self, idx: torch.Tensor) -> None:
        """Keep channels ``idx`` (H, d') of every head's queries and keys: rows of q_proj/k_proj and the
        matching channels of q_conv1d/k_conv1d. Values, β, gates and o_proj are untouched; the state
        becomes d' × d_v and the readout scale keeps its value."""
        idx = torch.as_tensor(idx, device=self.q_proj.weight.device)
        if idx.is_floating_point() or idx.is_complex():
            raise ValueError(f"idx must hold integer channel indices, got {idx.dtype}")
        idx = idx.long()
        if idx.dim() != 2 or idx.shape[0] != self.n_head:
            raise ValueError(f"idx must have shape (n_head={self.n_head}, d'), got {tuple(idx.shape)}")
        d_keep = idx.shape[1]
        if d_keep < 1 or int(idx.min()) < 0 or int(idx.max()) >= self.head_k_dim:
            raise ValueError(f"idx must hold 1..{self.head_k_dim} channel indices in [0, {self.head_k_dim}) per head")
        if any(len(set(row.tolist())) != d_keep for row in idx):
            raise ValueError("idx must not repeat a channel within a head")
        rows = (idx + self.head_k_dim * torch.arange(self.n_head, device=idx.device).unsqueeze(1)).flatten()
        for name in ("q_proj", "k_proj"):
            old = getattr(self, name)
            new = nn.Linear(old.in_features, rows.numel(), bias=False, device=old.weight.device, dtype=old.weight.dtype)
            new.weight = nn.Parameter(old.weight.detach()[rows].clone())
            setattr(self, name, new)
        self.q_conv1d.keep_channels(rows)
        self.k_conv1d.keep_channels(rows)
        self.head_k_dim = d_keep
