"""The exact best rank-r factorisation of a score matrix S = Q Kᵀ without forming S.

For per-head queries Q and keys K of shape (L, d): with Gram matrices G_q = QᵀQ = R_qᵀR_q and
G_k = KᵀK = R_kᵀR_k, Q = U_q R_q and K = U_k R_k with orthonormal U_q, U_k, so S = U_q C U_kᵀ with the
small core C = R_q R_kᵀ (d × d). The singular values of S are those of C, and with C = U Σ Vᵀ the maps

    P_q = R_q⁻¹ U_r Σ_r^{1/2},   P_k = R_k⁻¹ V_r Σ_r^{1/2}        (d × r)

give (Q P_q)(K P_k)ᵀ = U_q U_r Σ_r V_rᵀ U_kᵀ = S_r, the Eckart–Young optimum. The cost is O(L d²) for
the Grams (accumulated online or over calibration data) and O(d³) for the core, independent of L.
"""

from __future__ import annotations

import torch


def gram(x: torch.Tensor) -> torch.Tensor:
    """(..., L, d) -> (..., d, d) Gram matrix xᵀx."""
    return x.transpose(-2, -1) @ x


def gram_root(g: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Upper-triangular R with Rᵀ R = G + ε·I, ε = ridge · tr(G)/d, by Cholesky. (..., d, d) -> (..., d, d).

    A small relative ridge keeps real (ill-conditioned) query/key Grams factorable in float32 and leaves
    P_q P_kᵀ = I at full rank exactly. It moves the singular values of the core by a √ε amount, not by ε:
    with ε_q, ε_k the ridges of G_q, G_k, the ridged core has the singular values of Q'K'ᵀ for the stacked
    Q' = [Q; √ε_q I], K' = [K; √ε_k I], and Q'K'ᵀ = [[Q Kᵀ, √ε_k Q], [√ε_q Kᵀ, √(ε_q ε_k) I]] holds Q Kᵀ as a
    block, so by interlacing and Weyl's inequality

        0 ≤ σ_j(ridged) − σ_j(Q Kᵀ) ≤ √ε_k ‖Q‖₂ + √ε_q ‖K‖₂ + √(ε_q ε_k),   ‖Q‖₂ = ‖G_q‖₂^{1/2}, ‖K‖₂ = ‖G_k‖₂^{1/2}.

    The √ε order is reached where Q Kᵀ is rank-deficient (a zero σ_j becomes ≈ √ε_k ‖Q‖₂ when the rows of Q and
    of K span orthogonal subspaces). A σ_j > 0 moves by at most (ε_k ‖Q‖₂² + ε_q ‖K‖₂² + ε_q ε_k) / (2 σ_j) (Weyl on
    σ_j² = eigenvalues of G_q^{1/2} G_k G_q^{1/2}), which is O(ε) for σ_j well above √ε.
    Raises ``torch.linalg.LinAlgError`` when the (ridged) Gram is not positive definite.
    """
    d = g.shape[-1]
    g = 0.5 * (g + g.transpose(-2, -1))
    if ridge:
        trace = g.diagonal(dim1=-2, dim2=-1).sum(-1)
        if bool((trace <= 0).any()):
            raise torch.linalg.LinAlgError("gram_root: a Gram matrix is zero (no data); a relative ridge cannot help")
        scale = trace / d
        g = g + ridge * scale[..., None, None] * torch.eye(d, dtype=g.dtype, device=g.device)
    return torch.linalg.cholesky(g).transpose(-2, -1)


def _maps_from_roots(rq: torch.Tensor, rk: torch.Tensor, rank: int | None):
    core = rq @ rk.transpose(-2, -1)  # C = R_q R_kᵀ, (..., d, d)
    u, s, vh = torch.linalg.svd(core)  # d × d: O(d³), never an L × d SVD
    r = s.shape[-1] if rank is None else rank
    root = s[..., :r].sqrt().unsqueeze(-2)
    pq = torch.linalg.solve_triangular(rq, u[..., :r] * root, upper=True)
    pk = torch.linalg.solve_triangular(rk, vh[..., :r, :].transpose(-2, -1) * root, upper=True)
    return pq, pk, s


def lowrank_score_maps(gq: torch.Tensor, gk: torch.Tensor, rank: int | None = None, *, ridge: float = 0.0):
    """Maps for the best rank-``rank`` approximation of Q Kᵀ from the Grams G_q = QᵀQ, G_k = KᵀK.

    Args:
        gq, gk: (..., d, d) Gram matrices of queries and keys (any common scaling, e.g. means).
        rank: number of columns r ≤ d to return (all d when None); column j belongs to σ_j, descending.
        ridge: relative Cholesky ridge (see :func:`gram_root`).

    Returns ``(P_q, P_k, sigma)``: P_q, P_k of shape (..., d, r) with (Q P_q[:, :j])(K P_k[:, :j])ᵀ = S_j for
    every j ≤ r, and the d singular values of the core (= singular values of Q Kᵀ), descending.
    """
    return _maps_from_roots(gram_root(gq, ridge), gram_root(gk, ridge), rank)


def lowrank_score_maps_from_qk(q: torch.Tensor, k: torch.Tensor, rank: int | None = None):
    """Same maps from Q, K themselves (..., L, d) with L ≥ d, through thin QR factors (better conditioned
    than Grams; meant for offline calibration, not for a forward pass)."""
    if q.shape[-2] < q.shape[-1] or k.shape[-2] < k.shape[-1]:
        raise ValueError(f"need at least d={q.shape[-1]} rows, got {q.shape[-2]} and {k.shape[-2]}; use Grams")
    rq = torch.linalg.qr(q, mode="r")[1]
    rk = torch.linalg.qr(k, mode="r")[1]
    return _maps_from_roots(rq, rk, rank)


def truncation_errors(
    gq: torch.Tensor, gk: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor, ranks: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact ‖Q Kᵀ − (Q P_q[:, :r])(K P_k[:, :r])ᵀ‖_F² from the Grams, for *any* maps and every r in ``ranks``.

    Args: gq, gk (..., d, d) symmetric Grams; pq, pk (..., d, R); ranks: 1-D int tensor of ranks in 0..R
    (default 0, 1, ..., R). Returns (..., len(ranks)), clamped at 0.
    Works for stale bases too (maps fitted on other data), which makes it the refresh and guardrail
    test: ‖M − M̃‖² = tr(G_q G_k) − 2 tr(P_kᵀ G_k G_q P_q) + tr((P_qᵀ G_q P_q)(P_kᵀ G_k P_k)), each term
    restricted to the leading r columns through an (R, n_ranks) indicator matrix. Cost O(d² R + d R²).
    The terms are each of the order of tr(G_q G_k) and cancel down to the error, so they are computed in float64
    whatever the inputs' dtype (float32 leaves 1e-7 to 1e-6 of tr(G_q G_k) of rounding, far above the tail errors of
    good maps near full rank); the result is returned in the inputs' dtype.
    """
    dtype = torch.promote_types(torch.promote_types(gq.dtype, gk.dtype), torch.promote_types(pq.dtype, pk.dtype))
    gq, gk, pq, pk = (t.to(torch.float64) for t in (gq, gk, pq, pk))
    R = pq.shape[-1]
    if ranks is None:
        ranks = torch.arange(R + 1, device=pq.device)
    total = (gq * gk.transpose(-2, -1)).sum((-2, -1))  # tr(G_q G_k)
    gqp, gkp = gq @ pq, gk @ pk
    cross = (gkp * gqp).sum(-2)  # diag(P_kᵀ G_k G_q P_q), (..., R)
    f = (pq.transpose(-2, -1) @ gqp) * (pk.transpose(-2, -1) @ gkp)  # X ∘ Y, (..., R, R)
    m = (torch.arange(R, device=pq.device)[:, None] < ranks.to(pq.device)[None, :]).to(pq.dtype)  # (R, n)
    quad = (m * (f @ m)).sum(-2)  # Σ_{i,j<r} X_ij Y_ij
    return (total.unsqueeze(-1) - 2 * (cross @ m) + quad).clamp(min=0).to(dtype)


# ----------------------------------------------------------------------------- naive references (tests)


def naive_lowrank_scores(q: torch.Tensor, k: torch.Tensor, rank: int) -> torch.Tensor:
    """Reference: form S = Q Kᵀ (..., L, L) and truncate its SVD to ``rank``."""
    u, s, vh = torch.linalg.svd(q @ k.transpose(-2, -1), full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]


def naive_truncation_errors(q, k, pq, pk) -> torch.Tensor:
    """Reference for :func:`truncation_errors` from formed score matrices."""
    s = q @ k.transpose(-2, -1)
    errs = [(s**2).sum((-2, -1))]
    for r in range(1, pq.shape[-1] + 1):
        approx = (q @ pq[..., :r]) @ (k @ pk[..., :r]).transpose(-2, -1)
        errs.append(((s - approx) ** 2).sum((-2, -1)))
    return torch.stack(errs, -1)
