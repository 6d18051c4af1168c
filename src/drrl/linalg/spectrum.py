"""Spectrum tools on the singular values σ (..., d), descending, of a score core (= of Q Kᵀ)."""

from __future__ import annotations

import torch

from drrl.linalg.factor import gram_root


def core_singular_values(gq: torch.Tensor, gk: torch.Tensor, *, ridge: float = 0.0) -> torch.Tensor:
    """Singular values of Q Kᵀ from the Grams (..., d, d), descending, (..., d)."""
    rq, rk = gram_root(gq, ridge), gram_root(gk, ridge)
    return torch.linalg.svdvals(rq @ rk.transpose(-2, -1))


def tail_energy(sigma: torch.Tensor) -> torch.Tensor:
    """Σ_{k>r} σ_k² for r = 0 .. d, shape (..., d + 1); equals ‖S − S_r‖_F² for the optimal S_r."""
    sq = sigma.square()
    rev = sq.flip(-1).cumsum(-1).flip(-1)  # Σ_{k≥j}
    return torch.cat([rev, torch.zeros_like(sq[..., :1])], -1)


def energy_ratio(sigma: torch.Tensor) -> torch.Tensor:
    """Σ_{k≤r} σ_k² / Σ σ_k² for r = 0 .. d, (..., d + 1) (1 at every r for an all-zero spectrum)."""
    sq = sigma.square()
    total = sq.sum(-1, keepdim=True)
    head = torch.cat([torch.zeros_like(sq[..., :1]), sq.cumsum(-1)], -1)
    return torch.where(total > 0, head / total.clamp(min=torch.finfo(sq.dtype).tiny), torch.ones_like(head))


def stable_rank(sigma: torch.Tensor) -> torch.Tensor:
    """‖S‖_F² / ‖S‖_2² = Σ σ_k² / σ_1² (0 for a zero matrix)."""
    top = sigma[..., 0].square()
    return torch.where(top > 0, sigma.square().sum(-1) / top.clamp(min=torch.finfo(sigma.dtype).tiny), 0 * top)


def effective_rank(sigma: torch.Tensor) -> torch.Tensor:
    """Entropy effective rank exp(H(p)) with p_k = σ_k / Σ σ (Roy & Vetterli, 2007); 0 for a zero matrix."""
    total = sigma.sum(-1, keepdim=True)
    p = sigma / total.clamp(min=torch.finfo(sigma.dtype).tiny)
    h = -(p * p.clamp(min=torch.finfo(sigma.dtype).tiny).log()).sum(-1)
    return torch.where(total.squeeze(-1) > 0, h.exp(), 0 * h)
