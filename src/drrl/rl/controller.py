"""The learned rank controller of DR-RL: a :class:`~drrl.rl.policy.RankPolicy` shared by a model's layers,
sampling from an ε-mixture while it explores and turning the attention's :class:`~drrl.controllers.Feedback`
into rewards (:mod:`drrl.rl.reward`) that PPO learns from (:mod:`drrl.rl.trainer`)."""

from __future__ import annotations

import torch

from drrl.controllers import Feedback, RankController, SegmentStats, register_controller
from drrl.rl.policy import EpsilonSchedule, PolicyCache, RankPolicy, sample
from drrl.rl.ppo import Episode
from drrl.rl.reward import RewardConfig, budget_reward, fisher_fidelity, reward


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
    shared = True  # one policy decides for every layer: its decisions form one sequence per forward pass
    learns = True
    N_SEQ_FEATURES = 3  # the attention's "sequence dynamics" features (SegmentStats.features)

    @property
    def needs_bound(self) -> bool:
        """The bound is a reward term, not a feature: computed only on steps that train the policy, with γ > 0."""
        return self.wants_feedback and self.reward_cfg.gamma > 0

    @classmethod
    def n_features(cls, n_buckets: int) -> int:
        """Per-decision input width of the policy: kept energy at every bucket and the sequence statistics."""
        return n_buckets + cls.N_SEQ_FEATURES

    @classmethod
    def for_layers(cls, layers, *, seed: int = 0, **kwargs) -> RLController:
        """A fresh policy sized for ``layers`` (their rank buckets and their number)."""
        nb = len(layers[0].buckets)
        return cls(RankPolicy(cls.n_features(nb), nb, len(layers), **kwargs), seed=seed)

    def __init__(self, policy, *, reward=None, epsilon=None, seed: int = 0):
        super().__init__()
        self.policy = policy
        self.reward_cfg = reward or RewardConfig()
        self.epsilon = epsilon or EpsilonSchedule()
        self.explore = True
        self.updates = 0  # PPO updates so far (drives the ε schedule)
        self.generator = torch.Generator().manual_seed(seed)
        self._rows: dict[int, dict] = {}
        self._last_len = 0
        self.lagrange = self.reward_cfg.beta  # the cost's multiplier λ when the reward has a budget
        # greedy decisions maximise logit − cost_shift·(rank / r_max): an inference-time multiplier on the rank that
        # a caller tunes so that the greedy policy meets a budget on held-in windows (never used while exploring)
        self.cost_shift = 0.0
        self.spent = [0.0, 0.0]  # Σ pairs·r/d and Σ pairs of the decisions rewarded since the last update

    @property
    def needs_teacher(self) -> bool:
        """The per-layer teacher branch feeds the cosine and Fisher fidelities; a KL reward comes from the model's
        output (:meth:`observe_segments`)."""
        return self.reward_cfg.fidelity in ("cosine", "fisher")

    @property
    def wants_feedback(self) -> bool:
        """Rewards are measured only while the policy explores and learns (training mode)."""
        return self.explore and self.training

    def begin(self) -> None:
        self._rows = {}

    @staticmethod
    def features(stats: SegmentStats) -> torch.Tensor:
        extra = stats.features if stats.features is not None else torch.zeros(len(stats.energy), 0)
        return torch.cat([stats.energy.float(), extra.float()], -1).cpu()

    def forward(self, stats: SegmentStats) -> torch.Tensor:
        nb = len(stats.buckets)
        param = next(self.policy.parameters())
        feats, allowed, decide = self.features(stats).to(param.dtype), stats.allowed.cpu(), stats.decide.cpu()
        layer = max(stats.layer, 0)
        ep = self._rows.get(stats.row)
        if ep is None or (ep["layers"] and ep["layers"][-1] >= layer):  # a new forward pass
            keys = ("feats", "layers", "segments", "prev", "allowed", "actions", "logp", "values", "rewards")
            ep = self._rows[stats.row] = {k: [] for k in keys}
            ep["below"] = {}  # segment -> action of the previous layer at that segment
            ep["cache"] = PolicyCache()  # the policy's keys and values of the decisions so far
        explore = self.explore and self.training
        eps = self.epsilon(self.updates) if explore else 0.0
        out = torch.full((len(feats),), nb - 1, dtype=torch.long)
        segs = decide.nonzero().flatten().tolist()
        if not segs:
            ep["below"] = {}
            return out
        # all of this layer's decisions in one policy pass: a decision's state holds nothing chosen in the same
        # layer (its previous rank is the layer below's at the same segment), so they need no sequential loop
        n, prev = len(segs), [ep["below"].get(s, nb) for s in segs]
        for s, p in zip(segs, prev, strict=True):
            ep["feats"].append(feats[s]), ep["layers"].append(layer), ep["segments"].append(s)
            ep["prev"].append(p), ep["allowed"].append(allowed[s])
        new = (feats[segs], torch.full((n,), layer), torch.tensor(segs), torch.tensor(prev), allowed[segs])
        logits, values = self.policy.extend(ep["cache"], *(t.to(param.device) for t in new))
        logits = logits.cpu()
        if not explore and self.cost_shift:
            frac = stats.buckets.cpu().to(logits.dtype) / stats.buckets[-1].item()
            logits = logits - self.cost_shift * frac
        a, lp = sample(logits, allowed[segs], eps, self.generator, greedy=not explore)
        ep["actions"].extend(a.tolist()), ep["logp"].extend(lp.tolist()), ep["values"].extend(values.tolist())
        out[segs] = a
        ep["below"] = dict(zip(segs, a.tolist(), strict=True))
        self._last_len = len(ep["actions"])
        return out

    def decisions(self, row: int = 0) -> dict | None:
        """The decision sequence of ``row``'s last forward pass, for analysis: ``feats``, ``layers``, ``segments``,
        ``prev``, ``allowed`` (as the policy saw them) and the ``actions`` taken; None before any decision."""
        ep = self._rows.get(row)
        if not ep or not ep["actions"]:
            return None
        feats, layers, segments, prev, allowed = self._tensors(ep)
        return {"feats": feats, "layers": layers, "segments": segments, "prev": prev, "allowed": allowed,
                "actions": torch.tensor(ep["actions"])}  # fmt: skip

    @torch.no_grad()
    def greedy(self, record: dict, buckets: torch.Tensor) -> torch.Tensor:
        """Greedy actions for a whole recorded decision sequence (:meth:`decisions`, features possibly edited) in
        one policy pass: the policy's mask keeps every decision causal in decision order, so this equals deciding
        layer by layer, with the recorded previous ranks (``buckets``: the layers' rank buckets, for the shift)."""
        param = next(self.policy.parameters())
        keys = ("feats", "layers", "segments", "prev", "allowed")
        logits, _ = self.policy(*(record[k].to(param.device) for k in keys))
        logits = logits.cpu()
        if self.cost_shift:
            logits = logits - self.cost_shift * buckets.cpu().to(logits.dtype) / buckets[-1].item()
        return logits.argmax(-1)

    @staticmethod
    def _tensors(ep: dict):
        return (
            torch.stack(ep["feats"]),
            torch.tensor(ep["layers"]),
            torch.tensor(ep["segments"]),
            torch.tensor(ep["prev"]),
            torch.stack(ep["allowed"]),
        )

    def observe(self, feedback: Feedback) -> None:
        """The rewards (:func:`drrl.rl.reward.reward`) of the decisions just executed for ``feedback.row``, in the
        order they were decided."""
        cfg = self.reward_cfg
        fidelity = feedback.fidelity
        if cfg.fidelity == "fisher":
            if len(feedback.error) != len(fidelity):
                raise RuntimeError(
                    "the 'fisher' reward needs each layer's output Fisher: run drrl.eval.allocation.output_fisher("
                    "model, layers, windows) after calibration"
                )
            fidelity = [fisher_fidelity(e, self.policy.layer_emb.num_embeddings) for e in feedback.error]
        elif not self.needs_teacher:  # measured on the model's output later (observe_segments): 0 until then
            fidelity = [torch.zeros(()) for _ in fidelity]
        if cfg.budget is None:
            rewards = [
                float(reward(f, torch.tensor(c), b, cfg))
                for f, c, b in zip(fidelity, feedback.cost, feedback.bound, strict=True)
            ]
        else:
            frac = torch.tensor(feedback.rank_fraction, dtype=torch.float64)
            pairs = torch.tensor(feedback.pairs, dtype=torch.float64)
            fid = torch.stack([f.double().cpu() for f in fidelity])
            bound = torch.stack([b.double().cpu() for b in feedback.bound])
            rewards = budget_reward(fid, frac, pairs, bound, self.lagrange, cfg).tolist()
            self.spent[0] += float((pairs * frac).sum())
            self.spent[1] += float(pairs.sum())
        self._rows[feedback.row]["rewards"].extend(rewards)

    def observe_segments(self, row: int, fidelity: torch.Tensor) -> None:
        """The model-level fidelity of ``row``'s segments (e.g. exp(−KL) of the next-token distributions on each
        segment's tokens, :func:`drrl.rl.reward.segment_kl`), added as α·fidelity[s] to the reward of every
        decision for segment s (every layer's), after the layers' :meth:`observe` gave the cost and bound terms."""
        ep = self._rows.get(row)
        if ep is None:
            return
        if len(ep["rewards"]) != len(ep["actions"]):
            raise RuntimeError("observe_segments() comes after the forward pass (every decision observed)")
        fid = fidelity.detach().double().cpu().tolist()
        alpha = self.reward_cfg.alpha
        ep["rewards"] = [r + alpha * fid[s] for r, s in zip(ep["rewards"], ep["segments"], strict=True)]
        ep["output_observed"] = True

    def collect(self) -> list:
        """Finished episodes (every executed decision rewarded), as PPO episodes; clears the buffer."""
        if not self.needs_teacher and any(
            ep["actions"] and not ep.get("output_observed") for ep in self._rows.values()
        ):
            raise RuntimeError(
                "the 'kl' reward needs the model's output: call PolicyTrainer.observe_output(logits, teacher_logprobs, "
                "segment) after each forward pass, before collect()"
            )
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
        # each decision is one new row of the policy (≈ 2 FLOPs per parameter), whose attention in every encoder layer
        # reads the cached keys and values of the N decisions so far (2·N·d_model for the scores, as much for the sum)
        enc = self.policy.encoder.layers
        attend = sum(4 * max(self._last_len, 1) * layer.self_attn.embed_dim for layer in enc)
        return 2 * sum(p.numel() for p in self.policy.parameters()) + attend
