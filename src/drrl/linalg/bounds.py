"""Perturbation bounds: rank transitions, softmax and output propagation, and basis staleness.

Notation per head: scores S = Q Kᵀ, attention P = softmax(S / √d + mask) row-wise, output O = P V.
A rank-r approximation S̃ gives P̃ and Õ. The chain used by the guardrail is

    ‖P − P̃‖_F ≤ ‖S − S̃‖_F / (2√d)            (row softmax is ½-Lipschitz in ℓ2; masking only removes entries)
    ‖O − Õ‖_F ≤ ‖P − P̃‖_F · ‖V‖_2              (the paper's Eq. 9, ‖P − P̃‖_2 · ‖V‖_F, is the other pairing)

where ‖S − S̃‖_F comes exactly from :func:`drrl.linalg.truncation_errors` (or the tail energy), and ‖V‖_2
from :func:`spectral_norm_bounds` on the Gram VᵀV. Staleness bounds (Weyl, Davis–Kahan, Wedin,
Yu–Wang–Samworth) say how far singular values and subspaces can move when the statistics drift by Δ.
"""

from __future__ import annotations

import torch


def rank_transition_cost(sigma: torch.Tensor, r: int, r2: int) -> torch.Tensor:
    """‖S_r − S_r'‖_F = sqrt(Σ_{min(r,r') < k ≤ max(r,r')} σ_k²): the exact cost of moving between ranks of one
    matrix (the paper's Eq. 8, which is exact here, not an approximation). ``sigma`` (..., d) descending."""
    lo, hi = sorted((r, r2))
    return sigma[..., lo:hi].square().sum(-1).sqrt()


def prob_error_bound(score_err_fro: torch.Tensor | float, d_head: int) -> torch.Tensor | float:
    """Bound on ‖P − P̃‖_F from ‖S − S̃‖_F for P = softmax(S / √d_head): the softmax Jacobian diag(p) − ppᵀ
    has spectral norm ≤ ½ (its quadratic form is a variance of a unit vector's entries), so each row moves
    by at most ½ · ‖Δs_row‖ / √d_head; a causal or padding mask removes entries from both sides."""
    return score_err_fro / (2.0 * d_head**0.5)


def output_error_bound(prob_err_fro: torch.Tensor | float, v_norm2: torch.Tensor | float) -> torch.Tensor | float:
    """Bound on ‖O − Õ‖_F = ‖(P − P̃) V‖_F ≤ ‖P − P̃‖_F · ‖V‖_2 (pass an *upper* bound of ‖V‖_2)."""
    return prob_err_fro * v_norm2


def spectral_norm_bounds(g: torch.Tensor, iters: int = 3, squarings: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds on λ_max of a symmetric PSD matrix ``g`` (..., d, d), e.g. the Gram VᵀV.

    Lower: ``iters`` power-iteration steps (Eq. 18 of the paper; a Rayleigh quotient never exceeds λ_max).
    Upper: tr(g^N)^{1/N} with N = 2^``squarings`` by repeated squaring (normalised by the trace at each
    step); it overestimates λ_max by at most a factor d^{1/N} (1.30 for d = 64, N = 16). A power-iteration
    estimate alone is *not* an upper bound, so the guardrail uses the upper value.
    """
    g = 0.5 * (g + g.transpose(-2, -1))
    tiny = torch.finfo(g.dtype).tiny
    x = torch.ones(g.shape[:-1], dtype=g.dtype, device=g.device).unsqueeze(-1)
    for _ in range(iters):
        x = g @ x
        x = x / x.norm(dim=-2, keepdim=True).clamp(min=tiny)
    lower = (x.transpose(-2, -1) @ g @ x).squeeze(-1).squeeze(-1) / (x.square().sum((-2, -1))).clamp(min=tiny)
    c = g.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=0)
    upper = c.clone()
    h = g / c.clamp(min=tiny)[..., None, None]
    n = 1.0
    for _ in range(squarings):
        h = h @ h
        t = h.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=0)
        n *= 2.0
        upper = upper * t.clamp(min=tiny) ** (1.0 / n)
        h = h / t.clamp(min=tiny)[..., None, None]
    upper = torch.where(c > 0, torch.maximum(upper, lower), 0 * upper)
    return lower.clamp(min=0), upper


def weyl_bound(delta: torch.Tensor) -> torch.Tensor:
    """Weyl: |λ_i(H + Δ) − λ_i(H)| ≤ ‖Δ‖_2 for symmetric H, and |σ_i(C + Δ) − σ_i(C)| ≤ ‖Δ‖_2 for any C.
    Returns ‖Δ‖_2 for (..., d, d)."""
    return torch.linalg.matrix_norm(delta, ord=2)


def _gap_bound(vals: torch.Tensor, r: int, delta_norm2: torch.Tensor) -> torch.Tensor:
    if not 0 < r < vals.shape[-1]:
        raise ValueError(f"rank r must be in 1..{vals.shape[-1] - 1}, got {r}")
    denom = vals[..., r - 1] - vals[..., r] - delta_norm2
    ok = denom > 0
    return torch.where(
        ok, (delta_norm2 / denom.clamp(min=torch.finfo(vals.dtype).tiny)).clamp(max=1.0), 1.0 + 0 * denom
    )


def davis_kahan_sin_theta(eigvals: torch.Tensor, r: int, delta_norm2: torch.Tensor) -> torch.Tensor:
    """Davis–Kahan: ‖sin Θ‖_2 between the top-r eigenspaces of symmetric H and H + Δ is at most
    ‖Δ‖_2 / (λ_r − λ_{r+1} − ‖Δ‖_2) when that gap is positive (else the trivial bound 1).
    ``eigvals`` (..., d) of H, descending."""
    return _gap_bound(eigvals, r, delta_norm2)


def yu_wang_samworth_sin_theta(eigvals: torch.Tensor, r: int, delta_norm2, delta_fro) -> torch.Tensor:
    """Yu, Wang & Samworth (2015): ‖sin Θ‖_F ≤ 2 min(√r ‖Δ‖_2, ‖Δ‖_F) / (λ_r − λ_{r+1}), with no condition on
    Δ (capped at the trivial √r)."""
    if not 0 < r < eigvals.shape[-1]:
        raise ValueError(f"rank r must be in 1..{eigvals.shape[-1] - 1}, got {r}")
    gap = eigvals[..., r - 1] - eigvals[..., r]
    num = 2 * torch.minimum(r**0.5 * torch.as_tensor(delta_norm2), torch.as_tensor(delta_fro))
    out = num / gap.clamp(min=torch.finfo(eigvals.dtype).tiny)
    return torch.where(gap > 0, out, torch.full_like(out, float("inf"))).clamp(max=r**0.5)


def wedin_sin_theta(sigma: torch.Tensor, r: int, delta_norm2: torch.Tensor) -> torch.Tensor:
    """Wedin: the top-r left and right singular subspaces of C and C + Δ are both within
    ‖sin Θ‖_2 ≤ ‖Δ‖_2 / (σ_r − σ_{r+1} − ‖Δ‖_2) when that gap is positive (else 1). ``sigma`` of C, descending."""
    return _gap_bound(sigma, r, delta_norm2)


def sin_theta(u1: torch.Tensor, u2: torch.Tensor, ord: int | str = 2) -> torch.Tensor:
    """Measured ‖sin Θ‖ between the column spaces of orthonormal bases u1, u2 (..., d, r): ‖(I − u1 u1ᵀ) u2‖."""
    resid = u2 - u1 @ (u1.transpose(-2, -1) @ u2)
    return torch.linalg.matrix_norm(resid, ord=ord)
