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

The registry (end of this file) names the selectors :func:`drrl.pruning.prune_qk`, ``drrl prune`` and its
config accept, in the order ``SELECTORS`` lists them; a new selector is one registered function:

    @register_selector("mine", needs=("acts",))  # calibration it reads: acts, rms, grads
    def _mine(x: SelectorInputs, d_keep: int, generator: torch.Generator) -> torch.Tensor:
        return top_channels(x.q_act.abs().mean(0) + x.k_act.abs().mean(0), d_keep)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from drrl.linalg.rrqr import strong_rrqr

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- registry

CALIBRATION = ("acts", "rms", "grads")  # what drrl.pruning.calibrate can record


class SelectorInputs:
    """One DeltaNet layer as a registered selector sees it, each tensor computed when first read.

    ``layer``: anything with ``q_proj``, ``k_proj`` (weights (H·d_k, D)), ``n_head`` and ``head_k_dim``;
    ``calibration``: its :class:`drrl.pruning.LayerCalibration` (``q``, ``k``, ``sq_sum``, ``tokens``, ``gq``,
    ``gk``); ``rows``: the activation rows a DRRQR-like selector may sample per head."""

    def __init__(self, layer, calibration, *, rows: int = 5000):
        self.layer, self.calibration, self.rows = layer, calibration, rows
        self.n_head, self.d_k = layer.n_head, layer.head_k_dim

    @cached_property
    def wq(self) -> torch.Tensor:  # (H·d_k, D), float32 on the CPU
        return self.layer.q_proj.weight.detach().float().cpu()

    @cached_property
    def wk(self) -> torch.Tensor:
        return self.layer.k_proj.weight.detach().float().cpu()

    @cached_property
    def q_act(self) -> torch.Tensor:  # (N, H, d_k) calibrated post-conv queries ("acts")
        return torch.cat(self.calibration.q)

    @cached_property
    def k_act(self) -> torch.Tensor:
        return torch.cat(self.calibration.k)

    @cached_property
    def x_rms(self) -> torch.Tensor:  # (D,) RMS of the mixer input over calibration tokens ("rms")
        c = self.calibration
        return (c.sq_sum / max(c.tokens, 1)).sqrt()

    @cached_property
    def gq(self) -> torch.Tensor:  # (H·d_k, D) accumulated ∂L/∂W_q ("grads")
        return self.calibration.gq.float().cpu()

    @cached_property
    def gk(self) -> torch.Tensor:
        return self.calibration.gk.float().cpu()


SelectorFn = Callable[[SelectorInputs, int, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Selector:
    """A registered selector: ``fn(inputs, d_keep, generator)`` returns the kept channels idx (H, d_keep), or
    with ``rotates`` a rotation T (H, d_keep, d_k) (:func:`drrl.pruning.rotate_qk`); ``needs``: the
    calibration it reads."""

    name: str
    fn: SelectorFn
    needs: tuple[str, ...] = ()
    rotates: bool = False


_REGISTRY: dict[str, Selector] = {}


def register_selector(
    name: str, *, needs: tuple[str, ...] = (), rotates: bool = False
) -> Callable[[SelectorFn], SelectorFn]:
    """Decorator: register ``fn(inputs: SelectorInputs, d_keep, generator)`` as selector ``name`` (appended to
    ``SELECTORS``), reading the calibration ``needs`` (of ``acts``, ``rms``, ``grads``)."""
    bad = [n for n in needs if n not in CALIBRATION]
    if bad:
        raise ValueError(f"selector {name!r} needs unknown calibration {bad}; choose from {', '.join(CALIBRATION)}")

    def register(fn: SelectorFn) -> SelectorFn:
        if name in _REGISTRY:
            raise ValueError(f"selector {name!r} is already registered")
        _REGISTRY[name] = Selector(name, fn, tuple(needs), rotates)
        return fn

    return register


def unregister_selector(name: str) -> None:
    """Remove selector ``name`` from the registry (a test's or a plugin's)."""
    get_selector(name)
    del _REGISTRY[name]


def available_selectors() -> tuple[str, ...]:
    """The registered selector names, in registration order."""
    return tuple(_REGISTRY)


def get_selector(name: str) -> Selector:
    """The registered selector ``name``; ValueError if there is none."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown selector {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def __getattr__(name: str):
    if name == "SELECTORS":  # the registered names now, a tuple
        return available_selectors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The built-in selectors, in the order SELECTORS lists them (drrl prune --selector all runs them in it).


@register_selector("random")
def _random(x: SelectorInputs, d_keep: int, generator: torch.Generator) -> torch.Tensor:
    return select_random(x.n_head, x.d_k, d_keep, generator=generator)


@register_selector("l1")
def _l1(x: SelectorInputs, d_keep: int, generator: torch.Generator) -> torch.Tensor:
    return select_l1(x.wq, x.wk, x.n_head, d_keep)


@register_selector("wanda", needs=("rms",))
def _wanda(x: SelectorInputs, d_keep: int, generator: torch.Generator) -> torch.Tensor:
    return select_wanda(x.wq, x.wk, x.x_rms, x.n_head, d_keep)


@register_selector("taylor", needs=("grads",))
def _taylor(x: SelectorInputs, d_keep: int, generator: torch.Generator) -> torch.Tensor:
    return select_taylor(x.wq, x.gq, x.wk, x.gk, x.n_head, d_keep)


@register_selector("pca", needs=("acts",), rotates=True)
def _pca(x: SelectorInputs, d_keep: int, generator: torch.Generator) -> torch.Tensor:
    return pca_rotation(x.q_act, x.k_act, d_keep)


@register_selector("drrqr", needs=("acts",))
def _drrqr(x: SelectorInputs, d_keep: int, generator: torch.Generator) -> torch.Tensor:
    return select_drrqr(x.q_act, x.k_act, d_keep, rows=x.rows, generator=generator)
