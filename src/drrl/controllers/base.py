"""The rank-controller interface: per-segment statistics in, one rank bucket per segment out.

A controller sees only prefix statistics (detached), so a decision for segment s depends on tokens
before s. The attention module enforces the guardrail afterwards (a choice masked as unsafe moves up
to the nearest safe bucket), so every controller obeys it; learning controllers should also use
``stats.allowed`` themselves (−inf logits) to keep their log-probabilities honest.

A controller says what it needs by its attributes, never by its name: ``needs_stats``, ``needs_bound``,
``wants_feedback`` (the attention then measures each executed decision against a full-rank teacher and calls
:meth:`RankController.observe`), ``shared`` (one instance decides for every layer of a model, built by
:func:`attach_controller`) and ``learns`` (a training loop must fit it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import torch
import torch.nn.functional as F
from torch import nn

from drrl import flops

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "drrl.controllers"


@dataclass
class SegmentStats:
    """Statistics of one layer's forward pass, one row per segment.

    Attributes:
        layer: layer index (−1 when the module is not inside a model).
        buckets: (n_buckets,) int64 candidate ranks, ascending; the last is r_max.
        energy: (n_segments, n_buckets) fraction of the score energy ‖Q Kᵀ‖_F² of the sequence's prefix
            (all tokens before the segment, no causal mask; pooled over heads) that the executed basis keeps
            at each bucket (1 − relative truncation error), in [0, 1]. While the prefix has fewer than d
            tokens, every bucket at or above its length keeps everything.
        bound: (n_segments, n_buckets) upper bound, on the same prefix, of ‖O − Õ‖_F / ‖V‖_F at each bucket
            (max over heads; drrl.linalg.bounds), a prediction for the segment. Zeros unless a guard is set
            or the controller has ``needs_bound = True``.
        allowed: (n_segments, n_buckets) bool, False where the guardrail masks a bucket.
        decide: (n_segments,) bool, False for segments without a decision (no prefix: full rank).
        step: training-step counter of the module (for schedules and random streams).
        row, features: see the fields.
    """

    layer: int
    buckets: torch.Tensor
    energy: torch.Tensor
    bound: torch.Tensor
    allowed: torch.Tensor
    decide: torch.Tensor
    step: int = 0
    row: int = 0  # the sequence within the batch (decisions are per sequence)
    features: torch.Tensor | None = None  # (n_segments, f): cheap prefix statistics ("sequence dynamics")


@dataclass
class Feedback:
    """What the executed decisions of one sequence (``row``) bought, in the order they were decided: per
    decision the cosine fidelity of the segment's output against a full-rank teacher (0-d tensors), the
    segment's attention cost at the executed rank over its cost at full rank, and the guardrail bound at the
    executed rank divided by its trivial maximum √(2·rows), clipped to 1 (0-d tensors). All in [0, 1].
    ``rank_fraction`` (r / d_head) and ``pairs`` (the segment's unmasked query-key pairs) give the segment's
    share of the score FLOPs, Σ pairs·rank_fraction / Σ pairs, which a budget is stated on. ``error`` (0-d
    tensors; empty unless the layer has an ``output_fisher``) is the second-order estimate of the KL divergence
    per token of the model's next-token distribution that the decision's output error costs: ½ Σ F·(o − o_full)²
    over the segment's positions, averaged, with F the diagonal Fisher of :mod:`drrl.attention.drrl.sensitivity`;
    ``head_error`` splits it per key/value head ((H_kv,) tensors summing to ``error``: the estimate is additive
    over heads)."""

    row: int
    fidelity: list[torch.Tensor]
    cost: list[float]
    bound: list[torch.Tensor]
    rank_fraction: list[float] = field(default_factory=list)
    pairs: list[int] = field(default_factory=list)
    error: list[torch.Tensor] = field(default_factory=list)
    head_error: list[torch.Tensor] = field(default_factory=list)


def segment_fidelity(y: torch.Tensor, teacher: torch.Tensor, segment: int) -> torch.Tensor:
    """Mean cosine similarity per segment of outputs (B, H, L, d) against the teacher -> (n_segments,)."""
    L = y.shape[-2]
    cos = F.cosine_similarity(y.float(), teacher.float(), dim=-1).mean((0, 1))  # (L,)
    n_seg = -(-L // segment)
    return torch.stack([cos[s * segment : (s + 1) * segment].mean() for s in range(n_seg)])


def cost_ratio(rank: int, d_head: int, q_start: int, q_len: int, causal: bool = True) -> float:
    """Attention FLOPs of a segment at ``rank`` over those at full rank (same pairs)."""
    pairs = flops.causal_pairs(q_start, q_len, causal)
    low, full = flops.attention_core(pairs, rank, d_head), flops.attention_core(pairs, d_head, d_head)
    return sum(low.values()) / sum(full.values())


class RankController(nn.Module):
    """Interface: ``forward(stats) -> (n_segments,) int64 bucket indices``, or (n_segments, H_kv) for a rank per
    key/value head (each group of query heads runs at its head's rank). An ``nn.Module`` so learned controllers
    carry parameters and state dicts.

    Attributes a controller sets to say what it needs (the attention reads them, never the name):
        needs_stats: False lets the attention skip the per-segment statistics (``energy`` is then all ones).
        needs_bound: True asks for the guardrail bound even without a guard.
        wants_feedback: True makes the attention score each executed decision and call :meth:`observe`.
        needs_teacher: False spares the attention its full-rank teacher branch: the feedback then carries no
            fidelity (NaN), which the controller measures elsewhere (e.g. from the model's output distribution).
        shared: one instance decides for every layer of a model; the attention holds a
            :class:`PendingController` until :func:`attach_controller` builds it with :meth:`for_layers`.
        learns: a training loop must fit it (``train.mode`` hybrid or policy).
    """

    needs_stats: bool = True
    needs_bound: bool = False
    needs_teacher: bool = True
    shared: bool = False
    learns: bool = False
    registry_name: str = ""

    @property
    def wants_feedback(self) -> bool:
        return False

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, feedback: Feedback) -> None:
        """Feedback on the decisions just executed (called only when ``wants_feedback``)."""

    def flops_per_decision(self, n_buckets: int) -> int:
        """Arithmetic per (layer, segment) decision, counted by drrl.flops like every other overhead."""
        return 0

    @classmethod
    def from_options(cls, options: dict, buckets: list[int]) -> RankController:
        """Build from a layer's options (``rank``, ``tau``, ``seed``, ...) and its rank buckets."""
        return cls()

    @classmethod
    def for_layers(cls, layers: list[nn.Module], **kwargs) -> RankController:
        """Build one instance for ``layers`` (a shared controller sizes itself from them)."""
        return cls(**kwargs)


_CONTROLLERS: dict[str, type[RankController]] = {}


def register_controller(name: str):
    """Class decorator: ``@register_controller("energy")`` makes the controller buildable by name."""

    def deco(cls):
        if name in _CONTROLLERS and _CONTROLLERS[name] is not cls:
            raise ValueError(f"rank controller {name!r} is already registered to {_CONTROLLERS[name].__name__}")
        _CONTROLLERS[name] = cls
        cls.registry_name = name
        return cls

    return deco


def _load_plugins() -> None:
    """Import the modules that register controllers of higher rooms (``drrl.controllers`` entry points)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _CONTROLLERS:
            continue
        if ep.value.startswith("drrl."):  # drrl's own: an error is a bug to see, not to swallow
            ep.load()
            continue
        try:
            ep.load()
        except Exception as e:  # a broken third-party plugin must not break the built-in controllers
            log.warning("rank controller plugin %s failed to load: %s", ep.value, e)


def available_controllers() -> list[str]:
    _load_plugins()
    return sorted(_CONTROLLERS)


def controller_class(name: str) -> type[RankController]:
    """The class registered as ``name`` (a one-line ValueError naming the registered ones otherwise)."""
    if not isinstance(name, str):
        name = repr(name)  # never a registered name; reported as given
    if name not in _CONTROLLERS:
        _load_plugins()
    if name not in _CONTROLLERS:
        raise ValueError(f"controller must be one of {', '.join(available_controllers())}, got {name!r}")
    return _CONTROLLERS[name]


def build_controller(name: str, **kwargs) -> RankController:
    return controller_class(name)(**kwargs)


class PendingController(RankController):
    """Stands in for a shared controller (``controller="rl"``) until :func:`attach_controller` builds it."""

    def __init__(self, name: str, options: dict | None = None):
        super().__init__()
        self.name, self.options = name, dict(options or {})

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        raise RuntimeError(
            f"controller {self.name!r} is one instance shared by a model's layers: build the model with "
            f"drrl.models.GPT (it attaches one), or call drrl.controllers.attach_controller(layers, {self.name!r})"
        )


def controlled_layers(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The modules of ``modules`` that take a rank controller (``set_controller``)."""
    return [m for m in modules if hasattr(m, "set_controller")]


def attach_controller(layers: Iterable[nn.Module], controller: RankController | str | None = None, **kwargs):
    """Give rank-controlled attention layers their controller; returns the shared controller (or None).

    ``controller`` is an instance (installed on every layer: one decision maker for all), a registered name
    (a shared class is built once for all layers, another class once per layer, with ``kwargs``), or None:
    build the shared controllers the layers were configured with (their :class:`PendingController`). A shared
    controller is moved to the device of the layers' buffers.
    """
    layers = controlled_layers(layers)
    if not layers:
        return None
    if controller is None:
        pending = [m for m in layers if isinstance(m.controller, PendingController)]
        if not pending:
            return None
        controller, kwargs = pending[0].controller.name, {**pending[0].controller.options, **kwargs}
        layers = pending
    if isinstance(controller, str):
        cls = controller_class(controller)
        if not cls.shared:
            for m in layers:
                m.set_controller(cls(**kwargs))
            return None
        buffer = next(iter(layers[0].buffers()), None)
        controller = cls.for_layers(layers, **kwargs)
        if buffer is not None:
            controller = controller.to(buffer.device)
    for m in layers:
        m.set_controller(controller)
    return controller
