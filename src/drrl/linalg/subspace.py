"""Warm-started subspace iteration for the dominant left singular subspace of S = Q Kᵀ, from Grams only.

A basis Z (d × r) that is orthonormal in the G_q metric (Zᵀ G_q Z = I) defines the rank-r score maps
P_q = Z, P_k = G_q Z: then (Q Z)(K G_q Z)ᵀ = Π S with Π the orthogonal projector onto span(Q Z). One step
Z ← G_k G_q Z followed by G_q-orthonormalisation is one step of orthogonal iteration on S Sᵀ = Q G_k Qᵀ,
converging at rate (σ_{r+1}/σ_r)² per step; triangular orthonormalisation keeps the leading j columns a
subspace iteration of their own, so truncating to j ≤ r columns stays meaningful. The steps run in
whitened coordinates (one d × d Cholesky of G_q per refresh), then only matmuls and r × r Cholesky
factorisations (Householder QR as the fallback for ill-conditioned iterates).
"""

from __future__ import annotations

import torch

from drrl.linalg.factor import gram_root


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-2, -1))


def _cholesky_pass(x: torch.Tensor, metric: torch.Tensor | None, max_cond: float):
    a = x.transpose(-2, -1) @ (x if metric is None else metric @ x)
    low, info = torch.linalg.cholesky_ex(_sym(a))
    diag = low.diagonal(dim1=-2, dim2=-1)
    ratio = diag.abs().amax(-1) / diag.abs().amin(-1).clamp(min=torch.finfo(x.dtype).tiny)
    ok = bool((info == 0).all()) and bool(torch.isfinite(diag).all()) and bool((ratio < max_cond).all())
    if not ok:
        return x, False
    return torch.linalg.solve_triangular(low, x.transpose(-2, -1), upper=False).transpose(-2, -1), True


def cholesky_qr2(x: torch.Tensor, metric: torch.Tensor | None = None, *, max_cond: float | None = None):
    """Orthonormalise the columns of ``x`` (..., d, r): returns ``(z, fallback)`` with zᵀ z = I (or
    zᵀ M z = I for ``metric`` M, symmetric PD (..., d, d)) and span(z[:, :j]) = span(x[:, :j]) for all j.

    CholeskyQR2 (two Cholesky passes) costs two r × r Cholesky factorisations and matmuls; it is accurate
    when cond(x) < max_cond (default ε^{-1/2}: ≈ 4e3 in float32, 7e7 in float64). Otherwise it falls back
    (``fallback`` True) to Householder QR when there is no metric, which keeps nested spans, or with a
    metric to an r × r eigendecomposition, which orthonormalises but does not keep them.
    """
    if max_cond is None:
        max_cond = torch.finfo(x.dtype).eps ** -0.5
    z = x
    for _ in range(2):
        z, ok = _cholesky_pass(z, metric, max_cond)
        if not ok:
            break
    else:
        return z, False
    if metric is None:
        qm, rm = torch.linalg.qr(x)
        sign = torch.sign(rm.diagonal(dim1=-2, dim2=-1))
        return qm * torch.where(sign == 0, 1.0, sign).unsqueeze(-2), True
    a = _sym(x.transpose(-2, -1) @ metric @ x)
    lam, w = torch.linalg.eigh(a)
    keep = lam > lam.amax(-1, keepdim=True) * torch.finfo(x.dtype).eps * x.shape[-2]
    inv_root = torch.where(keep, lam.clamp(min=torch.finfo(x.dtype).tiny).rsqrt(), 0.0)
    return x @ (w * inv_root.unsqueeze(-2)), True


def whiten(gq: torch.Tensor, gk: torch.Tensor, *, ridge: float = 0.0):
    """The symmetric problem behind S Sᵀ in whitened coordinates: R (upper, Rᵀ R = G_q) and A = R G_k Rᵀ.

    A basis Z with Zᵀ G_q Z = I corresponds to an orthonormal Y = R Z, and one iteration step
    Z ← G_k G_q Z is Y ← A Y, whose eigenvalues are σ_i(Q Kᵀ)². Working on Y keeps orthonormalisation
    well conditioned even when G_q is not (Z = R⁻¹ Y by a triangular solve).
    """
    r = gram_root(gq, ridge)
    return r, r @ gk @ r.transpose(-2, -1)


def subspace_iteration(gq: torch.Tensor, gk: torch.Tensor, z: torch.Tensor, steps: int = 2, *, ridge: float = 0.0):
    """``steps`` warm-started steps Z ← orth_{G_q}(G_k G_q Z) from the previous basis ``z`` (..., d, r).

    Runs on Y = R Z in whitened coordinates (see :func:`whiten`) with CholeskyQR2, falling back to
    Householder QR when an iterate is ill-conditioned; both keep the leading j columns a subspace
    iteration of their own. Returns ``(z, fallback)`` with zᵀ G_q z = I; score maps are P_q = z, P_k = G_q z.
    """
    r, a = whiten(gq, gk, ridge=ridge)
    y, fallback = cholesky_qr2(r @ z)
    for _ in range(steps):
        y, fb = cholesky_qr2(a @ y)
        fallback |= fb
    return torch.linalg.solve_triangular(r, y, upper=True), fallback


def subspace_residual(gq: torch.Tensor, gk: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Relative residual of span(Q z) as an invariant subspace of S Sᵀ, from Grams only, in [0, 1].

    With W = G_k G_q z and E = W − z (zᵀ G_q W) (the part of the next iterate outside the current span),
    returns ‖Q E‖_F / ‖Q W‖_F = sqrt(tr(Eᵀ G_q E) / tr(Wᵀ G_q W)) for G_q-orthonormal ``z``. It is 0 when
    the basis spans an invariant (singular) subspace; by the residual form of Davis–Kahan the angle to
    the nearest one is at most ‖residual‖ / gap. Costs a few d × d × r matmuls: cheap enough to test staleness
    every segment and refresh only when it exceeds a tolerance.
    """
    w = gk @ (gq @ z)
    gw = gq @ w
    e = w - z @ (z.transpose(-2, -1) @ gw)
    num = (e * (gq @ e)).sum((-2, -1))
    den = (w * gw).sum((-2, -1))
    return (num.clamp(min=0) / den.clamp(min=torch.finfo(z.dtype).tiny)).sqrt().clamp(max=1.0)
