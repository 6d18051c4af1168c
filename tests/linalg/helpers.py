"""Shared builders for the linalg tests: random orthonormal frames, Q/K pairs with a prescribed score
spectrum, and a hypothesis strategy for random and near-degenerate spectra."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(*shape: int, g: torch.Generator, dtype=F64) -> torch.Tensor:
    """(..., n, m) with orthonormal columns (n ≥ m)."""
    return torch.linalg.qr(torch.randn(*shape, generator=g, dtype=dtype))[0]


def qk_with_spectrum(s, length: int, g: torch.Generator, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    """Q, K (length, d) with Q Kᵀ = U_q A diag(s) Bᵀ U_kᵀ, so the singular values of Q Kᵀ are exactly ``s``.

    Q = U_q M for a well-conditioned random M and Kᵀ = M⁻¹ C U_kᵀ with C = A diag(s) Bᵀ: the Grams are general
    (not commuting, not diagonal), G_q has condition ≤ 4, and G_k is singular exactly when ``s`` has zeros.
    """
    s = torch.as_tensor(s, dtype=F64)
    d = s.shape[-1]
    uq, uk = orthonormal(length, d, g=g), orthonormal(length, d, g=g)
    a, b, o1, o2 = (orthonormal(d, d, g=g) for _ in range(4))
    m = o1 @ torch.diag(torch.linspace(1.0, 2.0, d, dtype=F64)) @ o2
    c = (a * s) @ b.T
    q = uq @ m
    k = uk @ torch.linalg.solve(m, c).T
    return q.to(dtype), k.to(dtype)


def random_qk(*batch: int, length: int, d: int, seed: int = 0, dtype=F64):
    g = gen(seed)
    return (torch.randn(*batch, length, d, generator=g, dtype=dtype) for _ in range(2))


@st.composite
def spectra(draw, min_d: int = 2, max_d: int = 8, allow_zero: bool = True) -> list[float]:
    """Descending non-negative spectra mixing generic values, clusters of (nearly or exactly) equal values,
    tiny values and exact zeros."""
    d = draw(st.integers(min_d, max_d))
    kinds = ["generic", "cluster", "tiny"] + (["zero"] if allow_zero else [])
    vals: list[float] = []
    for _ in range(d):
        kind = draw(st.sampled_from(kinds))
        if kind == "generic" or (kind == "cluster" and not vals):
            vals.append(draw(st.floats(0.05, 10.0)))
        elif kind == "cluster":
            vals.append(vals[-1] * (1.0 - draw(st.sampled_from([0.0, 1e-12, 1e-9, 1e-6]))))
        elif kind == "tiny":
            vals.append(draw(st.floats(1e-12, 1e-6)))
        else:
            vals.append(0.0)
    return sorted(vals, reverse=True)


seeds = st.integers(0, 2**31 - 1)


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over leading dims of ‖a − b‖_F / ‖b‖_F."""
    num = torch.linalg.matrix_norm(a - b)
    den = torch.linalg.matrix_norm(b).clamp(min=torch.finfo(b.dtype).tiny)
    return float((num / den).max())
