"""Rank controllers: given per-segment statistics of one layer, choose a rank bucket for each segment.

A controller sees only prefix statistics (detached), so a decision for segment s depends on tokens
before s. The attention module enforces the guardrail afterwards (a choice masked as unsafe moves up
to the nearest safe bucket), so every controller obeys it; learning controllers should also use
``stats.allowed`` themselves (−inf logits) to keep their log-probabilities honest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


class RankController(nn.Module):
    """Interface: ``forward(stats) -> (n_segments,) int64 bucket indices``. An ``nn.Module`` so learned
    controllers carry parameters and state dicts. ``needs_stats = False`` lets the attention skip the
    per-segment statistics (``energy`` is then all ones); ``needs_bound = True`` asks for the guardrail
    bound even without a guard."""

    needs_stats: bool = True
    needs_bound: bool = False

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        raise NotImplementedError

    def flops_per_decision(self, n_buckets: int) -> int:
        """Arithmetic per (layer, segment) decision, counted by drrl.flops like every other overhead."""
        return 0


_CONTROLLERS: dict[str, type[RankController]] = {}


def register_controller(name: str):
    def deco(cls):
        _CONTROLLERS[name] = cls
        cls.registry_name = name
        return cls

    return deco


def available_controllers() -> list[str]:
    return sorted(_CONTROLLERS)


def build_controller(name: str, **kwargs) -> RankController:
    if name not in _CONTROLLERS:
        raise ValueError(f"unknown rank controller {name!r}; available: {', '.join(available_controllers())}")
    return _CONTROLLERS[name](**kwargs)


@register_controller("fixed")
class FixedController(RankController):
    """The same rank for every segment (the "fixed low-rank" baseline)."""

    needs_stats = False

    def __init__(self, rank: int):
        super().__init__()
        self.rank = int(rank)

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        hit = (stats.buckets == self.rank).nonzero()
        if len(hit) == 0:
            raise ValueError(f"fixed rank {self.rank} is not a bucket; buckets are {stats.buckets.tolist()}")
        return hit[0, 0].expand(stats.energy.shape[0]).clone()


@register_controller("random")
class RandomController(RankController):
    """A uniformly random allowed bucket per segment, reproducible from (seed, layer, segment, step)."""

    needs_stats = False

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = int(seed)

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        out, allowed = [], stats.allowed.cpu()
        for s in range(stats.energy.shape[0]):
            g = torch.Generator().manual_seed(hash((self.seed, stats.layer, s, stats.step)) & (2**62 - 1))
            choices = allowed[s].nonzero().flatten()
            if len(choices) == 0:
                choices = torch.tensor([len(stats.buckets) - 1])
            out.append(choices[torch.randint(len(choices), (1,), generator=g)].item())
        return torch.tensor(out, dtype=torch.long)


@register_controller("energy")
class EnergyController(RankController):
    """The energy-threshold rule: the smallest bucket whose kept energy is at least ``tau``."""

    def __init__(self, tau: float = 0.95):
        super().__init__()
        if not 0 < tau <= 1:
            raise ValueError(f"energy threshold tau must be in (0, 1], got {tau}")
        self.tau = float(tau)

    def flops_per_decision(self, n_buckets: int) -> int:
        return 2 * n_buckets  # compare, then select the first qualifying bucket

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        ok = (stats.energy >= self.tau) & stats.allowed
        ok[:, -1] = True  # r_max always qualifies
        return ok.float().argmax(-1).cpu()  # first True


@register_controller("rl")
class RLController(RankController):
    """The DR-RL controller: a :class:`~drrl.rl.policy.RankPolicy` shared by all layers.

    Per sequence (``stats.row``) it builds the decision sequence of the forward pass (layer-major) and
    decides all segments of a layer in one policy pass: the "previous rank" in a decision's state is the
    rank the layer below chose for the same segment, so no decision waits for another of its own layer.
    When ``explore`` is on it samples from the ε-mixture and records :class:`~drrl.rl.ppo.Episode` steps;
    the attention then reports each executed
    decision's reward through :meth:`observe`. ``collect()`` hands finished episodes to PPO. A sequence
    whose layers start again begins a new episode (``begin()`` also clears everything).
    """

    needs_stats = True
    N_SEQ_FEATURES = 3  # the attention's "sequence dynamics" features (SegmentStats.features)

    @property
    def needs_bound(self) -> bool:
        """The bound is a reward term, not a feature: computed only on steps that train the policy."""
        return self.wants_reward

    @classmethod
    def n_features(cls, n_buckets: int) -> int:
        """Per-decision input width of the policy: kept energy at every bucket and the sequence statistics."""
        return n_buckets + cls.N_SEQ_FEATURES

    def __init__(self, policy, *, reward=None, epsilon=None, seed: int = 0):
        super().__init__()
        from drrl.rl.policy import EpsilonSchedule
        from drrl.rl.reward import RewardConfig

        self.policy = policy
        self.reward_cfg = reward or RewardConfig()
        self.epsilon = epsilon or EpsilonSchedule()
        self.explore = True
        self.updates = 0  # PPO updates so far (drives the ε schedule)
        self.generator = torch.Generator().manual_seed(seed)
        self._rows: dict[int, dict] = {}
        self._last_len = self._last_new = 0

    @property
    def wants_reward(self) -> bool:
        return self.explore and self.training

    def begin(self) -> None:
        self._rows = {}

    @staticmethod
    def features(stats: SegmentStats) -> torch.Tensor:
        extra = stats.features if stats.features is not None else torch.zeros(len(stats.energy), 0)
        return torch.cat([stats.energy.float(), extra.float()], -1).cpu()

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        from drrl.rl.policy import sample

        nb = len(stats.buckets)
        param = next(self.policy.parameters())
        feats, allowed, decide = self.features(stats).to(param.dtype), stats.allowed.cpu(), stats.decide.cpu()
        layer = max(stats.layer, 0)
        ep = self._rows.get(stats.row)
        if ep is None or (ep["layers"] and ep["layers"][-1] >= layer):  # a new forward pass
            keys = ("feats", "layers", "segments", "prev", "allowed", "actions", "logp", "values", "rewards")
            ep = self._rows[stats.row] = {k: [] for k in keys}
            ep["below"] = {}  # segment -> action of the previous layer at that segment
        explore = self.explore and self.training
        eps = self.epsilon(self.updates) if explore else 0.0
        out = torch.full((len(feats),), nb - 1, dtype=torch.long)
        segs = decide.nonzero().flatten().tolist()
        if not segs:
            ep["below"] = {}
            return out
        # all of this layer's decisions in one policy pass: a decision's state holds nothing chosen in the same
        # layer (its previous rank is the layer below's at the same segment), so they need no sequential loop
        for s in segs:
            ep["feats"].append(feats[s]), ep["layers"].append(layer), ep["segments"].append(s)
            ep["prev"].append(ep["below"].get(s, nb)), ep["allowed"].append(allowed[s])
        with torch.no_grad():
            logits, values = self.policy(*(t.to(param.device) for t in self._tensors(ep)))
        n = len(segs)
        a, lp = sample(logits[-n:].cpu(), allowed[segs], eps, self.generator, greedy=not explore)
        ep["actions"].extend(a.tolist()), ep["logp"].extend(lp.tolist()), ep["values"].extend(values[-n:].tolist())
        out[segs] = a
        ep["below"] = dict(zip(segs, a.tolist(), strict=True))
        self._last_len, self._last_new = len(ep["actions"]), n
        return out

    @staticmethod
    def _tensors(ep: dict):
        return (
            torch.stack(ep["feats"]),
            torch.tensor(ep["layers"]),
            torch.tensor(ep["segments"]),
            torch.tensor(ep["prev"]),
            torch.stack(ep["allowed"]),
        )

    def observe(self, row: int, rewards: list[float]) -> None:
        """Rewards of the decisions just executed for ``row`` (in the order they were decided)."""
        self._rows[row]["rewards"].extend(rewards)

    def collect(self) -> list:
        """Finished episodes (every executed decision rewarded), as PPO episodes; clears the buffer."""
        from drrl.rl.ppo import Episode

        eps = self.epsilon(self.updates)
        out = []
        for ep in self._rows.values():
            if ep["actions"] and len(ep["rewards"]) == len(ep["actions"]):
                feats, layers, segments, prev, allowed = self._tensors(ep)
                out.append(Episode(feats, layers, segments, prev, allowed, torch.tensor(ep["actions"]),
                                   torch.tensor(ep["logp"]), torch.tensor(ep["values"]),
                                   torch.tensor(ep["rewards"]), eps))  # fmt: skip
        self._rows = {}
        return out

    def flops_per_decision(self, n_buckets: int) -> int:
        # one policy pass per layer re-encodes the decision sequence so far (≈ 2 FLOPs per parameter per
        # position), shared by the layer's decisions
        per_pass = 2 * sum(p.numel() for p in self.policy.parameters()) * max(self._last_len, 1)
        return per_pass // max(self._last_new, 1)


class PendingRLController(RankController):
    """Stands in for ``controller="rl"`` until a model installs its shared :class:`RLController`."""

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        raise RuntimeError(
            "controller 'rl' needs a rank policy: build the model with drrl.models.GPT (it creates and installs "
            "one) or call set_controller(RLController(policy)) on every drrl layer"
        )
