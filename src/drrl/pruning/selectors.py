"""Q/K channel selectors for structured state reduction in linear attention (Nazari & Rusch 2026).

Channel i of head h is row h·d_k + i of W_q and W_k (both (H·d_k, D)). Every axis-aligned selector returns
``idx`` (H, d_keep), each row sorted ascending, the channels to keep in q *and* k of that head (one index set
per head keeps q·k in a common basis, and slicing commutes with the depthwise conv and SiLU):

- random: a random subset;
- l1: ‖Wq_i‖₁ + ‖Wk_i‖₁;
- wanda: Σ_j (|Wq_ij| + |Wk_ij|) · rms_j, rms the per-feature RMS over tokens of the attention input;
- taylor: Σ_j |Wq_ij · ∂L/∂Wq_ij| + Σ_j |Wk_ij · ∂L/∂Wk_ij| (first-order loss change, gradients accumulated);
- drrqr: strong rank-revealing QR of the joint activations M = [Q_h; K_h] (2N, d_k): the kept channels are a
  well-conditioned, large-volume basis of the columns, each dropped channel a bounded combination of kept
  ones plus a residual of size ≈ σ_{d_keep+1}(M).

Score ties go to the lower channel index. :func:`pca_rotation` is the rotation baseline (not axis-aligned).
"""

from __future__ import annotations

import logging

import torch

from drrl.linalg.rrqr import strong_rrqr

log = logging.getLogger(__name__)

SELECTORS = ("random", "l1", "wanda", "taylor", "pca", "drrqr")


def check_keep(d_k: int, d_keep: int) -> None:
    """Raise ValueError unless 1 ≤ d_keep ≤ d_k."""
    if not 1 <= int(d_keep) <= int(d_k):
        raise ValueError(f"d_keep must be in 1..{d_k} (the head's key dim), got {d_keep}")


def _head_dim(w: torch.Tensor, n_head: int, name: str) -> int:
    if w.ndim != 2 or n_head < 1 or w.shape[0] % n_head:
        raise ValueError(f"{name} must be (n_head·d_k, D) with rows divisible by n_head={n_head}, got {tuple(w.shape)}")
    return w.shape[0] // n_head


def _same_shape(*pairs: tuple[str, torch.Tensor], like: torch.Tensor) -> None:
    for name, t in pairs:
        if t.shape != like.shape:
            raise ValueError(f"{name} must have the shape of wq {tuple(like.shape)}, got {tuple(t.shape)}")


def top_channels(scores: torch.Tensor, d_keep: int) -> torch.Tensor:
    """The d_keep highest-scoring channels per head, sorted ascending; scores (H, d_k) -> idx (H, d_keep).
    A stable sort sends ties to the lower index."""
    check_keep(scores.shape[-1], d_keep)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, :d_keep].sort(dim=-1).values


def select_random(n_head: int, d_k: int, d_keep: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random subset of d_keep channels per head: (H, d_keep)."""
    check_keep(d_k, d_keep)
    return torch.stack([torch.randperm(d_k, generator=generator)[:d_keep] for _ in range(n_head)]).sort(-1).values


def select_l1(wq: torch.Tensor, wk: torch.Tensor, n_head: int, d_keep: int) -> torch.Tensor:
    """Score ‖Wq_i‖₁ + ‖Wk_i‖₁ per channel; wq, wk (H·d_k, D) -> idx (H, d_keep)."""
    d_k = _head_dim(wq, n_head, "wq")
    _same_shape(("wk", wk), like=wq)
    scores = wq.detach().double().abs().sum(1) + wk.detach().double().abs().sum(1)
    return top_channels(scores.view(n_head, d_k), d_keep)


def select_wanda(wq: torch.Tensor, wk: torch.Tensor, x_rms: torch.Tensor, n_head: int, d_keep: int) -> torch.Tensor:
    """Score Σ_j (|Wq_ij| + |Wk_ij|) · x_rms_j, with x_rms (D,) the RMS over calibration tokens of each feature of
    the attention input (after the pre-norm); wq, wk (H·d_k, D) -> idx (H, d_keep)."""
    d_k = _head_dim(wq, n_head, "wq")
    _same_shape(("wk", wk), like=wq)
    if x_rms.shape != (wq.shape[1],):
        raise ValueError(f"x_rms must be ({wq.shape[1]},), the attention input width, got {tuple(x_rms.shape)}")
    scores = (wq.detach().double().abs() + wk.detach().double().abs()) @ x_rms.detach().double()
    return top_channels(scores.view(n_head, d_k), d_keep)


def select_taylor(
    wq: torch.Tensor, gq: torch.Tensor, wk: torch.Tensor, gk: torch.Tensor, n_head: int, d_keep: int
) -> torch.Tensor:
    """Score Σ_j |Wq_ij · gq_ij| + Σ_j |Wk_ij · gk_ij|, g the loss gradients accumulated over calibration batches;
    all (H·d_k, D) -> idx (H, d_keep)."""
    d_k = _head_dim(wq, n_head, "wq")
    _same_shape(("gq", gq), ("wk", wk), ("gk", gk), like=wq)
    q = (wq.detach().double() * gq.detach().double()).abs().sum(1)
    k = (wk.detach().double() * gk.detach().double()).abs().sum(1)
    return top_channels((q + k).view(n_head, d_k), d_keep)


def _heads(q_act: torch.Tensor, k_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if q_act.ndim < 3 or q_act.shape != k_act.shape:
        raise ValueError(
            f"q_act and k_act must both be (N, H, d_k) (leading dims are flattened), "
            f"got {tuple(q_act.shape)} and {tuple(k_act.shape)}"
        )
    h, d_k = q_act.shape[-2:]
    return q_act.detach().reshape(-1, h, d_k).double(), k_act.detach().reshape(-1, h, d_k).double()


def select_drrqr(
    q_act: torch.Tensor,
    k_act: torch.Tensor,
    d_keep: int,
    *,
    f: float = 1.5,
    max_swaps: int | None = 20,
    rows: int = 5000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DRRQR: per head, strong RRQR (:func:`drrl.linalg.rrqr.strong_rrqr`) of M = [Q_h; K_h] (2N, d_k).

    Args:
        q_act, k_act: (N, H, d_k) post-conv, pre-L2-norm activations (what enters the delta rule).
        d_keep: channels kept per head.
        f, max_swaps: strong RRQR bound and swap budget.
        rows: rows of M sampled without replacement (all when 2N ≤ rows).
        generator: drives the row sample (columns are not shuffled: ties go to the lower index).

    Returns:
        idx (H, d_keep), rows sorted ascending.
    """
    q, k = _heads(q_act, k_act)
    n_head, d_k = q.shape[1:]
    check_keep(d_k, d_keep)
    if rows < d_keep:
        raise ValueError(f"rows must be ≥ d_keep={d_keep} for a full-rank kept block, got {rows}")
    out = []
    for h in range(n_head):
        m = torch.cat([q[:, h], k[:, h]])  # (2N, d_k)
        if m.shape[0] > rows:
            m = m[torch.randperm(m.shape[0], generator=generator)[:rows]]
        res = strong_rrqr(m, d_keep, f=f, max_swaps=max_swaps)
        log.debug("drrqr head %d: %d swaps, max ρ %.3g, converged %s", h, res.swaps, res.max_ratio, res.converged)
        out.append(res.perm[:d_keep].sort().values)
    return torch.stack(out)


def _covariance(x: torch.Tensor) -> torch.Tensor:
    """Per-head covariance of L2-normalised rows: x (N, H, d) -> (H, d, d)."""
    x = x / x.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
    x = x - x.mean(0)
    return torch.einsum("nhd,nhe->hde", x, x) / max(x.shape[0] - 1, 1)


def pca_rotation(q_act: torch.Tensor, k_act: torch.Tensor, d_keep: int, *, use_q: bool = True) -> torch.Tensor:
    """PCA rotation baseline: per head, the top-d_keep eigenvectors (as rows) of the covariance of L2-normalised
    k (averaged with that of L2-normalised q when ``use_q``).

    Args:
        q_act, k_act: (N, H, d_k) post-conv activations (each row is normalised here).
        d_keep: components kept per head.

    Returns:
        T (H, d_keep, d_k), orthonormal rows in order of decreasing variance (sign: largest entry positive), in
        the activations' dtype. The caller replaces Wq_h ← T_h Wq_h and Wk_h ← T_h Wk_h. A rotation commutes with
        neither the depthwise conv nor SiLU, so the conv can only be approximated: new channel r gets the kernel
        (and bias) Σ_d T_rd² · w_d.
    """
    q, k = _heads(q_act, k_act)
    check_keep(q.shape[-1], d_keep)
    cov = _covariance(k)
    if use_q:
        cov = 0.5 * (cov + _covariance(q))
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    t = vecs.flip(-1)[..., :d_keep].transpose(-2, -1)  # (H, d_keep, d_k)
    peak = t.gather(-1, t.abs().argmax(-1, keepdim=True))
    t = t * torch.where(peak < 0, -1.0, 1.0)
    return t.to(k_act.dtype)
