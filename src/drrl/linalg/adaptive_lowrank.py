"""Input-adaptive low-rank maps, the tensor math under RaNA's rank adapters (Garcia et al. 2025): data-aware
bases, the squared-coefficient masker, the allocation search between basis size and mask density, and
neuron thresholds. (Formerly ``drrl.linalg.rana``; the adapters themselves live in :mod:`drrl.adapters`.)

A linear map y = W x (W: d_out × d_in) on inputs from a calibration distribution becomes
y ≈ A (m(x) ⊙ B x) with A = U (d_out × n_B, orthonormal columns: the leading left singular vectors of
W Xᵀ, X the calibration inputs as rows) and B = Aᵀ W. Then B x are the coordinates of W x in that
basis and, because A has orthonormal columns,

    ‖W x − A (m ⊙ B x)‖² = ‖(I − A Aᵀ) W x‖² + Σ_{i dropped} (B x)_i²,

so the mask m_i = [(B x)_i² ≥ τ] drops exactly the components that cost least, per token, with one
scalar τ per layer, and needs nothing beyond B x itself. Its FLOPs per token are 2·d_in·n_B (dense B)
plus 2·d_out·k (the k active columns of A), against 2·d_out·d_in dense (elementwise squares and
compares, O(n_B), are not counted, as for every other elementwise op in drrl.flops).

The left singular vectors of W Xᵀ are the eigenvectors of W (XᵀX) Wᵀ, so calibration only accumulates
the input Gram XᵀX (streamed over any number of tokens) plus a token sample for the thresholds.
Everything here is a pure function with a naive reference used by the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def data_aware_basis(weight: torch.Tensor, gram: torch.Tensor, rank: int | None = None):
    """Leading left singular vectors of W Xᵀ from the input Gram G = XᵀX.

    Args:
        weight: (d_out, d_in).
        gram: (d_in, d_in) symmetric PSD, Σ over calibration tokens of x xᵀ.
        rank: components to keep (default: all non-trivial ones, min(d_out, d_in)).

    Returns:
        (A, B, sigma2): A (d_out, r) orthonormal columns, B = Aᵀ W (r, d_in), sigma2 (r,) the squared
        singular values of W Xᵀ (descending): the calibration energy of each component. Computed in
        float64, returned in the weight's dtype.
    """
    d_out, d_in = weight.shape
    if gram.shape != (d_in, d_in):
        raise ValueError(
            f"gram must be ({d_in}, {d_in}) for a weight of shape {tuple(weight.shape)}, got {tuple(gram.shape)}"
        )
    r_max = min(d_out, d_in)
    rank = r_max if rank is None else int(rank)
    if not 0 < rank <= r_max:
        raise ValueError(f"rank must be in 1..{r_max}, got {rank}")
    w = weight.detach().double()
    g = gram.detach().double()
    c = w @ (0.5 * (g + g.T)) @ w.T  # (d_out, d_out) = (W Xᵀ)(W Xᵀ)ᵀ
    evals, evecs = torch.linalg.eigh(c)
    order = evals.flip(0)[:rank].clamp(min=0)
    a = evecs.flip(-1)[:, :rank]
    b = a.T @ w
    return a.to(weight.dtype), b.to(weight.dtype), order.to(weight.dtype)


def naive_data_aware_basis(weight: torch.Tensor, x: torch.Tensor, rank: int):
    """Reference: thin SVD of W Xᵀ for calibration inputs x (N, d_in). Returns (A, B, sigma2)."""
    u, s, _ = torch.linalg.svd(weight.double() @ x.double().T, full_matrices=False)
    a = u[:, :rank]
    return a, a.T @ weight.double(), s[:rank] ** 2


def masked_lowrank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tau: float, bias=None):
    """y = A (m ⊙ B x) (+ bias) with m = [(B x)² ≥ τ]; x (..., d_in) -> (y (..., d_out), mask (..., r))."""
    c = x @ b.T
    m = c.square() >= tau
    y = (c * m) @ a.T
    return (y if bias is None else y + bias), m


def naive_masked_lowrank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Reference: token by token, component by component (x (N, d_in) -> (N, d_out))."""
    out = torch.zeros(x.shape[0], a.shape[0], dtype=x.dtype)
    for n in range(x.shape[0]):
        for i in range(b.shape[0]):
            c = float(x[n] @ b[i])
            if c * c >= tau:
                out[n] += c * a[:, i]
    return out


def top_fraction_threshold(values: torch.Tensor, keep: float) -> float:
    """τ such that ``values >= τ`` keeps the ⌊keep · numel⌋ largest entries (ties kept together);
    keep ≥ 1 -> 0 (everything), keep·numel < 1 -> +inf (nothing)."""
    v = values.detach().flatten()
    k = int(math.floor(keep * v.numel() + 1e-9))
    if k >= v.numel():
        return 0.0
    if k < 1:
        return math.inf
    return float(torch.topk(v.float(), k, sorted=False).values.min())


@dataclass
class Allocation:
    """One adapter's split of its FLOP budget between the basis (n_b) and the mask density."""

    n_b: int  # rows of B kept
    k_mean: float  # mean active components per token the budget allows
    tau: float  # mask threshold on (B x)²
    coverage: float  # fraction of the calibration output energy Σ‖W x‖² the adapter keeps
    candidates: list[tuple[int, float]]  # (n_b, coverage) of every candidate scored


def adapter_flops(d_in: int, d_out: int, n_b: int, k_mean: float) -> float:
    """FLOPs per token of a rank adapter: dense B (2·d_in·n_B) plus k active columns of A (2·d_out·k)."""
    return 2.0 * d_in * n_b + 2.0 * d_out * k_mean


class SortedCoefficients:
    """All entries of ``coeff_sq`` (N, r) sorted once (descending) with their columns. The top K entries among
    the first n_B columns are the first K of the sorted list whose column is < n_B, so one masked cumulative
    sum per n_B answers every budget K at once."""

    def __init__(self, coeff_sq: torch.Tensor):
        self.n, self.r = coeff_sq.shape
        vals, idx = coeff_sq.detach().float().flatten().sort(descending=True)
        self.vals, self.cols = vals.double(), idx % self.r

    def coverage(self, n_b: int, keep_entries: list[int], total: float) -> list[tuple[float, float]]:
        """(kept energy / total, threshold τ) for each K in ``keep_entries`` among the first ``n_b`` columns."""
        inside = self.cols < n_b
        count = inside.cumsum(0)
        kept = (self.vals * inside).cumsum(0)
        n_inside = int(count[-1])
        out = []
        for k in keep_entries:
            if k >= n_inside:
                out.append((float(kept[-1]) / total, 0.0))
            elif k < 1:
                out.append((0.0, math.inf))
            else:
                pos = int(torch.searchsorted(count, k))  # the K-th entry inside the first n_B columns
                out.append((float(kept[pos]) / total, float(self.vals[pos])))
        return out


def allocate_many(
    coeff_sq: torch.Tensor, total_energy: float, d_in: int, d_out: int, keeps: list[float], *, grid: int = 24
) -> list[Allocation]:
    """:func:`allocate` for several budgets on the same coefficients (one sort, shared candidate scans)."""
    n, r = coeff_sq.shape
    if any(not k > 0 for k in keeps):
        raise ValueError(f"kept FLOP fractions must be > 0, got {keeps}")
    srt = SortedCoefficients(coeff_sq)
    total = max(float(total_energy), torch.finfo(torch.float32).tiny)
    scored: list[dict[int, tuple[float, float, float]]] = [{} for _ in keeps]

    def k_mean(keep: float, nb: int) -> float:
        return min((keep * d_out * d_in - d_in * nb) / d_out, float(nb))  # nothing to mask beyond n_B

    def score(nb: int, which: list[int]) -> None:
        which = [i for i in which if 1 <= nb <= r and nb not in scored[i] and k_mean(keeps[i], nb) >= 0]
        if not which:
            return
        ks = [k_mean(keeps[i], nb) for i in which]
        res = srt.coverage(nb, [int(math.floor(k * n + 1e-9)) for k in ks], total)
        for i, k, (cov, tau) in zip(which, ks, res, strict=True):
            scored[i][nb] = (cov, k, tau)

    everyone = list(range(len(keeps)))
    step = max(1, r // grid)
    for nb in [*range(r, 0, -step), 1]:
        score(nb, everyone)
    for i, keep in enumerate(keeps):
        if not scored[i]:
            raise ValueError(
                f"a kept FLOP fraction of {keep:.3f} is below the cost of B alone at n_B = 1 "
                f"({1 / d_out:.2e}); raise the FLOPs ratio"
            )
    fine = max(1, step // 4)
    want: dict[int, list[int]] = {}
    for i in everyone:
        best = max(scored[i], key=lambda nb, i=i: scored[i][nb][0])
        for nb in range(best - step + fine, best + step, fine):
            want.setdefault(nb, []).append(i)
    for nb, which in sorted(want.items()):
        score(nb, which)
    out = []
    for i in everyone:
        best = max(scored[i], key=lambda nb, i=i: scored[i][nb][0])
        cov, km, tau = scored[i][best]
        out.append(Allocation(best, km, tau, cov, sorted((nb, v[0]) for nb, v in scored[i].items())))
    return out


def allocate(
    coeff_sq: torch.Tensor, total_energy: float, d_in: int, d_out: int, keep: float, *, grid: int = 24
) -> Allocation:
    """Search n_B against mask density under the FLOP model for a kept FLOP fraction ``keep``.

    ``coeff_sq`` (N, r) holds (B x)² of N calibration tokens for the full basis (columns in basis order);
    ``total_energy`` = Σ_tokens ‖W x‖². For each n_B the budget fixes k̄ = (keep·d_out·d_in − d_in·n_B)/d_out
    active components per token on average; the adapter keeps the k̄·N largest entries of the first n_B
    columns (one threshold τ for the layer). The n_B whose kept energy (coverage) is largest wins. Candidates:
    a grid of ``grid`` values over 1..r, then a finer grid (a quarter of its step) around the best (coarse to
    fine; coverage is flat near its optimum). Budget not reachable (k̄ < 0 even at n_B = 1) raises
    ``ValueError``.
    """
    return allocate_many(coeff_sq, total_energy, d_in, d_out, [keep], grid=grid)[0]


def top_fraction_thresholds(values: torch.Tensor, keeps: list[float]) -> list[float]:
    """:func:`top_fraction_threshold` for several fractions (one sort)."""
    v = values.detach().float().flatten().sort(descending=True).values
    out = []
    for keep in keeps:
        k = int(math.floor(keep * v.numel() + 1e-9))
        out.append(0.0 if k >= v.numel() else math.inf if k < 1 else float(v[k - 1]))
    return out


def naive_allocate(coeff_sq: torch.Tensor, total_energy: float, d_in: int, d_out: int, keep: float) -> Allocation:
    """Reference: every n_B from 1 to r, by sorting."""
    n, r = coeff_sq.shape
    best = None
    for nb in range(1, r + 1):
        k_mean = (keep * d_out * d_in - d_in * nb) / d_out
        if k_mean < 0:
            continue
        k_mean = min(k_mean, float(nb))
        kept = int(math.floor(k_mean * n + 1e-9))
        vals = coeff_sq[:, :nb].flatten().double().sort(descending=True).values
        cov = float(vals[:kept].sum()) / total_energy
        if best is None or cov > best[1]:
            best = (nb, cov, k_mean)
    assert best is not None
    return Allocation(best[0], best[2], math.nan, best[1], [])
