"""Adapted linear layers: RaNA rank adapters (alone or sharing one basis across q/k/v), weight-norm neuron
masking, CATS-style gated neuron adapters, static low-rank factors. Each counts what it executes
(``tokens``, ``active``) so effective FLOPs are measured on whatever data runs through it.

Shapes: inputs (..., d_in) -> outputs (..., d_out), like ``nn.Linear``. Masks are computed without
gradient (a frozen τ: recovery fine-tuning trains the kept components only, as RaNA does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from drrl.kernels import masked_dots, masked_rows
from drrl.linalg.adaptive_lowrank import adapter_flops

DECODE_TOKENS = 4  # steps of at most this many tokens take the kernels (at 8 a masked matmul is faster: BENCHMARKS.md)


def decode_layout(weight: nn.Parameter) -> torch.Tensor:
    """Store a (d_out, n) parameter column-major, in place, and return its transpose: the (n, d_out) row-major
    matrix the kernels stream, as a view (one copy of the weights in memory). ``F.linear`` reads either layout;
    state dicts load into it keeping the layout, and ``.to()`` keeps it (``preserve_format``)."""
    if not weight.t().is_contiguous():
        weight.data = weight.detach().t().contiguous().t()
    return weight.detach().t()


class _Counted(nn.Module):
    """Counters of executed work since the last :meth:`reset_counts` (host floats, not state)."""

    def __init__(self):
        super().__init__()
        self.tokens, self.active = 0, 0.0

    def reset_counts(self) -> None:
        self.tokens, self.active = 0, 0.0

    @property
    def mean_active(self) -> float:
        return self.active / max(self.tokens, 1)


class RankAdapter(_Counted):
    """y = A (m ⊙ B x) + bias with m_i = [(B x)_i² ≥ τ] (RaNA). τ = 0 keeps every component: a static
    low-rank factorisation (the SVD baseline).

    Args:
        a: (d_out, n_b) basis (orthonormal columns when built by :func:`drrl.linalg.adaptive_lowrank.data_aware_basis`).
        b: (n_b, d_in) coordinates map, B = Aᵀ W.
        tau: mask threshold on the squared coordinates.
        bias: (d_out,) or None.

    In eval mode with ``fast=True`` (:meth:`prepare_decode`), a call of at most ``DECODE_TOKENS`` tokens reads
    only the rows of Aᵀ some token keeps, once each, without a gathered copy (:func:`drrl.kernels.masked_rows`,
    which also decides the mask): the memory-bound decode path.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, tau: float, bias: torch.Tensor | None = None):
        super().__init__()
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"a (d_out, n_b) and b (n_b, d_in) disagree on n_b: {tuple(a.shape)}, {tuple(b.shape)}")
        self.a = nn.Parameter(a.detach().clone())
        self.b = nn.Parameter(b.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("tau", torch.tensor(float(tau), dtype=torch.float32, device=b.device))
        self.fast, self._static = False, False
        self._a_t: torch.Tensor | None = None  # Aᵀ (n_b, d_out), a contiguous view of A once prepare_decode() ran
        self._a_key = None  # what _a_t was taken from (taken again when A or τ change, or A moves)

    @property
    def in_features(self) -> int:
        return self.b.shape[1]

    @property
    def out_features(self) -> int:
        return self.a.shape[0]

    @property
    def n_b(self) -> int:
        return self.b.shape[0]

    def extra_repr(self) -> str:
        return f"d_in={self.in_features}, d_out={self.out_features}, n_b={self.n_b}, tau={float(self.tau):.3g}"

    def prepare_decode(self) -> None:
        """Turn on the decode path: A is stored column-major (:func:`decode_layout`), so Aᵀ is a contiguous view
        the kernel streams, without a second copy."""
        self.fast = True
        self._decode_ready()

    def _decode_ready(self) -> bool:
        key = (self.a.data_ptr(), self.a._version, self.tau._version)
        if key != self._a_key:
            self._a_t = decode_layout(self.a)
            self._tau_f = float(self.tau)
            self._static = self._tau_f <= 0
            self._a_key = (self.a.data_ptr(), self.a._version, self.tau._version)
        return True

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = F.linear(x, self.b)
        with torch.no_grad():
            m = c.square() >= self.tau.to(c.dtype)
        return c, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.fast and not self.training and self._decode_ready()
        if fast and self._static:  # τ ≤ 0 keeps every component: two GEMMs
            self.tokens += x.numel() // self.in_features
            self.active += (x.numel() // self.in_features) * self.n_b
            return F.linear(F.linear(x, self.b), self.a, self.bias)
        n_tok = x.numel() // self.in_features
        if fast and n_tok <= DECODE_TOKENS:
            c = F.linear(x, self.b).reshape(n_tok, self.n_b)
            y, active = masked_rows(self._a_t, c, self._tau_f, None, self.bias)
            self.tokens += n_tok
            self.active += int(active.sum())
            return y.reshape(*x.shape[:-1], -1)
        c, m = self.coefficients(x)
        self.tokens += n_tok
        self.active += float(m.sum())
        return F.linear(c * m, self.a, self.bias)

    def flops_per_token(self) -> float:
        """Measured: 2·d_in·n_B + 2·d_out·(mean active components) over the tokens since the last reset."""
        return adapter_flops(self.in_features, self.out_features, self.n_b, self.mean_active)

    def merged_weight(self) -> torch.Tensor:
        """A B, the (d_out, d_in) weight of the adapter with every component active."""
        return self.a @ self.b


class SharedBasis(_Counted):
    """One B and one mask for several outputs (q, k and v stacked, as RaNA's QKV adapter): each
    :class:`SharedRankSlice` applies its rows of A to the same masked coordinates. The coordinates of the
    last input are cached by identity, so q, k and v may be called in any order (the cache holds one
    tensor reference and is replaced by the next input)."""

    def __init__(self, b: torch.Tensor, tau: float, d_out: int):
        super().__init__()
        self.b = nn.Parameter(b.detach().clone())
        self.register_buffer("tau", torch.tensor(float(tau), dtype=torch.float32, device=b.device))
        self.d_out = d_out  # stacked output width (for FLOPs)
        self._x: torch.Tensor | None = None
        self._key: tuple | None = None
        self._val: torch.Tensor | None = None

    @property
    def n_b(self) -> int:
        return self.b.shape[0]

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        # the same input object, unchanged in place, under the same grad mode and the same B: q, k and v of one
        # call (in any order) share the coordinates; anything else recomputes them
        key = (x._version, torch.is_grad_enabled(), self.b._version, self.tau._version)
        if self._x is not x or self._key != key or self._val is None:
            c = F.linear(x, self.b)
            with torch.no_grad():
                m = c.square() >= self.tau.to(c.dtype)
            self.tokens += c.numel() // self.n_b
            self.active += float(m.sum())
            self._x, self._key, self._val = x, key, c * m
        return self._val

    def clear(self) -> None:
        """Drop the cached input and coordinates (they are otherwise held until the next call)."""
        self._x = self._key = self._val = None

    def flops_per_token(self) -> float:
        return adapter_flops(self.b.shape[1], self.d_out, self.n_b, self.mean_active)


class SharedRankSlice(nn.Module):
    """Rows [lo, hi) of a stacked adapter: y = A[lo:hi] (m ⊙ B x) + bias, with B and m from ``basis``."""

    def __init__(self, basis: SharedBasis, a: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.basis = basis  # registered in each slice; parameters() deduplicates it
        self.a = nn.Parameter(a.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def in_features(self) -> int:
        return self.basis.b.shape[1]

    @property
    def out_features(self) -> int:
        return self.a.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.basis.masked(x), self.a, self.bias)


class NeuronMaskedLinear(_Counted):
    """The down projection of an adapted MLP: keep input neuron j iff |h_j|·‖W[:, j]‖₂ ≥ τ (the norm of its
    output contribution), y = W (m ⊙ h) + bias. FLOPs per token 2·d_out·(active neurons)."""

    def __init__(self, weight: torch.Tensor, tau: float, bias: torch.Tensor | None = None, *, weight_norm: bool = True):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("tau", torch.tensor(float(tau), dtype=torch.float32, device=weight.device))
        # weight_norm=False: |h_j| alone (the neuron adapter of a plain MLP, CATS's criterion)
        norm = weight.detach().norm(dim=0) if weight_norm else torch.ones(weight.shape[1], device=weight.device)
        self.register_buffer("col_norm", norm.float())
        self.fast = False
        self._w_t: torch.Tensor | None = None
        self._w_key = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"d_in={self.in_features}, d_out={self.out_features}, tau={float(self.tau):.3g}"

    def prepare_decode(self) -> None:
        """Turn on the decode path: calls of at most ``DECODE_TOKENS`` tokens read the kept rows of Wᵀ (W stored
        column-major, :func:`decode_layout`) through :func:`drrl.kernels.masked_rows`."""
        self.fast = True
        self._decode_ready()

    def _decode_ready(self) -> bool:
        key = (self.weight.data_ptr(), self.weight._version, self.tau._version)
        if key != self._w_key:
            self._w_t, self._tau_f = decode_layout(self.weight), float(self.tau)
            self._w_key = (self.weight.data_ptr(), self.weight._version, self.tau._version)
        return True

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        return h.detach().abs() * self.col_norm.to(h.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n_tok = h.numel() // self.in_features
        self.tokens += n_tok
        if self.fast and not self.training and n_tok <= DECODE_TOKENS and self._decode_ready():
            y, active = masked_rows(self._w_t, h.reshape(n_tok, -1), self._tau_f, self.col_norm, self.bias)
            self.active += int(active.sum())
            return y.reshape(*h.shape[:-1], -1)
        with torch.no_grad():
            m = self.scores(h) >= self.tau.to(h.dtype)
        self.active += float(m.sum())
        return F.linear(h * m, self.weight, self.bias)

    def flops_per_token(self) -> float:
        return 2.0 * self.out_features * self.mean_active


class NeuronAdapterMLP(_Counted):
    """Neuron adapter (CATS for gated MLPs, Lee et al. 2024): the activation a = act(W_gate x) is computed
    densely and thresholded, |a_j| ≥ t; only active rows of W_up and columns of W_down run:
    y = W_down ((m ⊙ a) ⊙ W_up x). Without ``up`` (a plain MLP: y = W_out act(W_fc x)) the same mask acts
    on the output projection's columns. FLOPs per token: 2·d·d_ff (dense gate/fc) + 2·d·k per masked
    matrix, k the active neurons."""

    def __init__(self, gate: nn.Linear, up: nn.Linear | None, down: nn.Linear, act, t: float):
        super().__init__()
        self.gate, self.up, self.down, self.act = gate, up, down, act
        self.register_buffer("t", torch.tensor(float(t), dtype=torch.float32, device=gate.weight.device))
        self.fast = False
        self._down_t: torch.Tensor | None = None
        self._down_key = None

    def prepare_decode(self) -> None:
        """Turn on the decode path: calls of at most ``DECODE_TOKENS`` tokens read the kept rows of W_up
        (:func:`drrl.kernels.masked_dots`) and of W_downᵀ (:func:`drrl.kernels.masked_rows`; W_down stored
        column-major, :func:`decode_layout`)."""
        self.fast = True
        self._decode_ready()

    def _decode_ready(self) -> bool:
        w = self.down.weight
        if (w.data_ptr(), w._version) != self._down_key:
            self._down_t = decode_layout(w)
            self._down_key = (w.data_ptr(), w._version)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_tok = x.numel() // x.shape[-1]
        self.tokens += n_tok
        if self.fast and not self.training and n_tok <= DECODE_TOKENS and self._decode_ready():
            x2 = x.reshape(n_tok, -1)
            a = self.act(self.gate(x2))
            m = a.abs() >= self.t.to(a.dtype)
            h = a
            if self.up is not None:  # the kept rows of W_up only, each read once (drrl.kernels.masked_dots)
                u = masked_dots(self.up.weight, x2, m)
                h = a * (u if self.up.bias is None else u + self.up.bias)
            y, active = masked_rows(self._down_t, h, 0.0, None, self.down.bias, keep=m)
            self.active += int(active.sum())
            return y.reshape(*x.shape[:-1], -1)
        a = self.act(self.gate(x))
        with torch.no_grad():
            m = a.abs() >= self.t.to(a.dtype)
        self.active += float(m.sum())
        h = a * m
        if self.up is not None:
            h = h * self.up(x)  # an up row whose gate is masked contributes nothing: counted as skipped
        return self.down(h)

    def flops_per_token(self) -> float:
        d_in, d_ff, d_out = self.gate.in_features, self.gate.out_features, self.down.out_features
        masked = (d_in if self.up is not None else 0) + d_out
        return 2.0 * d_in * d_ff + 2.0 * masked * self.mean_active
