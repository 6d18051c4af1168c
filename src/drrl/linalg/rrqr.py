"""QR with column pivoting and strong rank-revealing QR (Gu & Eisenstat 1996) for column subset selection.

For M (m × n) and a column permutation Π, write M Π = Q R with R = [[A_k, B_k], [0, C_k]], A_k (k × k). The
first k columns of M Π are the kept ones. Businger–Golub pivoting picks, greedily, the column with the largest
norm after projection onto the complement of the columns picked so far, so |r_11| ≥ |r_22| ≥ … ; it usually
reveals the rank but can fail badly (the Kahan matrix). Strong RRQR then swaps a kept column i with a dropped
column k + j while

    ρ_ij = sqrt((A_k⁻¹ B_k)_ij² + (γ_j(C_k) · ω_i(A_k))²) > f,

with γ_j the column norms of C_k and ω_i the row norms of A_k⁻¹. ρ_ij is exactly the factor by which the swap
multiplies |det A_k| (the volume of the kept columns), so the loop terminates. At the end (every ρ ≤ f > 1):
every |(A_k⁻¹ B_k)_ij| ≤ f (each dropped column is a bounded combination of kept ones plus a residual), and
σ_i(A_k) ≥ σ_i(M) / sqrt(1 + f² k (n − k)),  σ_j(C_k) ≤ σ_{k+j}(M) · sqrt(1 + f² k (n − k)).

Everything runs in float64; n (columns) is small (≤ 256) so loops over columns and refactoring M Π by
unpivoted QR after each swap are cheap.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def _check_matrix(m: torch.Tensor) -> None:
    if m.ndim != 2:
        raise ValueError(
            f"expected a 2-D (n_rows, n_cols) matrix, got shape {tuple(m.shape)}; flatten leading dims first"
        )


def _positive_diagonal(q: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sign = torch.sign(r.diagonal())
    sign = torch.where(sign == 0, 1.0, sign)
    return q * sign, r * sign.unsqueeze(-1)


def pivoted_qr(m: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder QR with Businger–Golub column pivoting, stopped after ``k`` pivots.

    Args:
        m: (n_rows, n_cols), any float dtype (computed in float64).
        k: pivots to take (default all); t = min(k, n_rows, n_cols) Householder steps are run.

    Returns:
        (q, r, perm): q (n_rows, t) orthonormal columns, r (t, n_cols) upper triangular with a non-negative,
        non-increasing diagonal, perm (n_cols,) LongTensor. The first t entries of perm are the pivots in order;
        the rest are the remaining columns in their original order. q r = q qᵀ M[:, perm]: the projection
        of M[:, perm] onto the span of its first t columns, which is M[:, perm] itself when t = rank(M) or
        t = min(n_rows, n_cols). Ties between column norms go to the lowest original index.
    """
    _check_matrix(m)
    n_rows, n_cols = m.shape
    k = n_cols if k is None else int(k)
    if not 0 <= k <= n_cols:
        raise ValueError(f"k must be in 0..{n_cols} (the number of columns), got {k}")
    t = min(k, n_rows, n_cols)
    # wt = Mᵀ (n_cols, n_rows): each column of M is a contiguous row, so norms and reflections stream memory.
    # Columns stay in original order; pivots are tracked, not moved.
    wt = m.detach().to(torch.float64).T.contiguous()
    free = torch.ones(n_cols, dtype=torch.bool)
    pivots: list[int] = []
    vs: list[torch.Tensor] = []
    for j in range(t):
        norms = torch.where(free, torch.linalg.vector_norm(wt[:, j:], dim=1), -1.0)  # residual norms; picked masked
        p = int(norms.argmax())  # argmax returns the first maximum: ties go to the lowest index
        x = wt[p, j:]
        alpha = float(norms[p])
        v = x.clone()
        v[0] += math.copysign(alpha, float(x[0])) if alpha > 0 else 1.0  # x = 0: reflect on e_1 (r_jj = 0)
        v /= v.norm()
        wt[:, j:].addr_(wt[:, j:] @ v, v, alpha=-2.0)  # H_j = I − 2 v vᵀ on the trailing rows of every column
        wt[p, j + 1 :] = 0.0
        free[p] = False
        pivots.append(p)
        vs.append(v)
    perm = torch.cat([torch.tensor(pivots, dtype=torch.long), torch.nonzero(free).flatten()])
    qt = torch.eye(t, n_rows, dtype=torch.float64)
    for j in reversed(range(t)):  # Q = H_1 ⋯ H_t applied to the first t unit vectors (held transposed)
        qt[:, j:].addr_(qt[:, j:] @ vs[j], vs[j], alpha=-2.0)
    q, w = qt.T, wt.T
    q, r = _positive_diagonal(q, w[:t, perm].triu())
    return q, r, perm


def naive_pivoted_qr(m: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for :func:`pivoted_qr`: the projector P = I − Q Qᵀ (n_rows × n_rows) rebuilt at every step,
    the next pivot the free column with the largest ‖P m_c‖, q_j = P m_p / ‖P m_p‖ (Gram–Schmidt, projected twice).
    Only for full-rank steps (a zero residual has no direction)."""
    n_rows, n_cols = m.shape
    k = n_cols if k is None else k
    t = min(k, n_rows, n_cols)
    x = m.detach().to(torch.float64)
    qs: list[torch.Tensor] = []
    pivots: list[int] = []
    for _ in range(t):
        qmat = torch.stack(qs, 1) if qs else torch.zeros(n_rows, 0, dtype=torch.float64)
        proj = torch.eye(n_rows, dtype=torch.float64) - qmat @ qmat.T
        res = proj @ x
        norms = res.norm(dim=0)
        norms[pivots] = -1.0
        p = int(norms.argmax())
        u = proj @ res[:, p]  # second projection: re-orthogonalisation
        qs.append(u / u.norm())
        pivots.append(p)
    rest = [c for c in range(n_cols) if c not in pivots]
    perm = torch.tensor(pivots + rest, dtype=torch.long)
    q = torch.stack(qs, 1) if qs else torch.zeros(n_rows, 0, dtype=torch.float64)
    return q, (q.T @ x[:, perm]).triu(), perm


@dataclass
class RRQRResult:
    """Outcome of :func:`strong_rrqr`."""

    perm: torch.Tensor  # (n_cols,) LongTensor; perm[:k] are the kept columns
    swaps: int  # column exchanges performed
    max_ratio: float  # final max ρ_ij (0 when k is 0 or n_cols; inf when A_k is numerically singular)
    converged: bool  # max_ratio ≤ f


def _blocks(m64: torch.Tensor, perm: torch.Tensor, k: int):
    """A_k, B_k, C_k of R in M[:, perm] = Q R (R padded with zero rows to n_cols × n_cols when n_rows < n_cols)."""
    n_cols = m64.shape[1]
    r = torch.linalg.qr(m64[:, perm], mode="r").R
    if r.shape[0] < n_cols:
        r = torch.cat([r, r.new_zeros(n_cols - r.shape[0], n_cols)])
    return r[:k, :k], r[:k, k:], r[k:, k:]


def _ratios(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a_inv_b = torch.linalg.solve_triangular(a, b, upper=True)  # (k, n − k)
    a_inv = torch.linalg.solve_triangular(a, torch.eye(a.shape[0], dtype=a.dtype), upper=True)
    omega = a_inv.norm(dim=1)  # (k,) row norms of A_k⁻¹
    gamma = c.norm(dim=0)  # (n − k,) column norms of C_k
    return a_inv_b, torch.sqrt(a_inv_b.square() + torch.outer(omega, gamma).square())


def rrqr_ratios(m: torch.Tensor, perm: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A_k⁻¹ B_k and ρ (both (k, n_cols − k), float64) for the first ``k`` columns of m[:, perm] kept.

    ρ_ij is the factor by which exchanging kept column i with dropped column k + j multiplies |det A_k|.
    Entries are inf/nan when A_k is singular.
    """
    _check_matrix(m)
    a, b, c = _blocks(m.detach().to(torch.float64), torch.as_tensor(perm, dtype=torch.long), k)
    return _ratios(a, b, c)


def strong_rrqr(
    m: torch.Tensor,
    k: int,
    *,
    f: float = 1.5,
    max_swaps: int | None = 20,
    tol: float = 1e-9,
    generator: torch.Generator | None = None,
) -> RRQRResult:
    """Strong rank-revealing QR (Gu & Eisenstat 1996, algorithm 4): choose k well-conditioned, large-volume
    columns of ``m`` (n_rows, n_cols).

    Starts from :func:`pivoted_qr`, then swaps kept column i with dropped column k + j (the largest ρ_ij) and
    refactors M[:, perm] by unpivoted QR while max ρ > f, for at most ``max_swaps`` swaps (None: until
    converged; terminates since each swap multiplies |det A_k| by more than f > 1). Stops early, logging it,
    when A_k is numerically singular: min |diag A_k| ≤ tol · max_c ‖m_c‖ (relative, so scale-free), which
    happens when rank(M) < k or n_rows < k; the selection is then only as good as pivoting makes it.
    ``generator`` shuffles the columns before pivoting (random tie-breaking); without it ties go to the
    lowest index.

    Returns:
        :class:`RRQRResult`; ``perm[:k]`` are the kept columns, in pivot order (not sorted).
    """
    _check_matrix(m)
    n_cols = m.shape[1]
    k = int(k)
    if not 0 <= k <= n_cols:
        raise ValueError(f"k must be in 0..{n_cols} (the number of columns), got {k}")
    if not f > 1.0:
        raise ValueError(f"f must be > 1 for the swap loop to terminate, got {f}")
    m64 = m.detach().to(torch.float64)
    shuffle = torch.randperm(n_cols, generator=generator) if generator is not None else torch.arange(n_cols)
    perm = shuffle[pivoted_qr(m64[:, shuffle], k)[2]]
    if k in (0, n_cols):
        return RRQRResult(perm, 0, 0.0, True)
    scale = float(m64.norm(dim=0).max())
    swaps = 0
    while True:
        a, b, c = _blocks(m64, perm, k)
        if not float(a.diagonal().abs().min()) > tol * scale:  # also catches a zero matrix (scale 0)
            log.info("strong_rrqr: A_k is numerically singular (rank < k = %d) after %d swaps; stopping", k, swaps)
            return RRQRResult(perm, swaps, math.inf, False)
        rho = _ratios(a, b, c)[1]
        max_ratio = float(rho.max())
        if max_ratio <= f:
            return RRQRResult(perm, swaps, max_ratio, True)
        if max_swaps is not None and swaps >= max_swaps:
            log.debug("strong_rrqr: stopped at max_swaps=%d with max ρ = %.3g > f = %.3g", max_swaps, max_ratio, f)
            return RRQRResult(perm, swaps, max_ratio, False)
        i, j = divmod(int(rho.argmax()), rho.shape[1])
        perm = perm.clone()
        perm[i], perm[k + j] = perm[k + j].clone(), perm[i].clone()
        swaps += 1
