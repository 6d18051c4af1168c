"""A toy rank-allocation environment with a known answer, driving the real RLController and PolicyTrainer.

Two stand-in attention layers decide the rank of N_SEG segments each. Layer l's *local* fidelity (what the
cosine reward sees) is 1 − cos_c[l]·(1 − r/d)²; the *model's* KL on a segment (what the KL reward sees) is
Σ_l kl_c[l]·(1 − r_l/d)² over the layers' ranks for that segment. The two can disagree, as a layer's attention
output can change a lot and the model's prediction not at all. Each layer's feedback also carries its own term of
that KL, kl_c[l]·(1 − r/d)², as the ``error`` a layer with an output Fisher reports (what the fisher reward sees:
exact here, a second-order estimate in a real model)."""

from __future__ import annotations

import torch

from drrl.controllers import Feedback, SegmentStats
from drrl.flops import causal_pairs
from drrl.rl import PolicyTrainer, RLConfig, RLController

BUCKETS = torch.tensor([4, 8, 12, 16])
D, T, N_SEG = 16, 8, 4


class Layer:
    """A stand-in for an attention layer: asks the controller for ranks and reports its feedback."""

    def __init__(self, idx, ctrl, cos_c: float, kl_c: float = 0.0):
        self.idx, self.ctrl, self.cos_c, self.kl_c = idx, ctrl, cos_c, kl_c

    def forward(self, row):
        nb = len(BUCKETS)
        stats = SegmentStats(
            self.idx, BUCKETS, torch.ones(N_SEG, nb), torch.zeros(N_SEG, nb), torch.ones(N_SEG, nb, dtype=torch.bool),
            torch.ones(N_SEG, dtype=torch.bool), 0, row, torch.zeros(N_SEG, 3),
        )  # fmt: skip
        ranks = BUCKETS[self.ctrl(stats)].tolist()
        if self.ctrl.wants_feedback:
            fid = [torch.tensor(1 - self.cos_c * (1 - r / D) ** 2) for r in ranks]
            if not self.ctrl.needs_teacher:  # as the attention does: no teacher branch, no local fidelity
                fid = [torch.tensor(float("nan"))] * N_SEG
            fb = Feedback(row, fid, [0.0] * N_SEG, [torch.tensor(0.0)] * N_SEG, [r / D for r in ranks],
                          [causal_pairs(s * T, T) for s in range(N_SEG)],
                          [torch.tensor(self.kl_c * (1 - r / D) ** 2) for r in ranks])  # fmt: skip
            self.ctrl.observe(fb)
        return ranks


def fraction(ranks_by_layer) -> float:
    """Executed score-FLOPs fraction of a (layers, segments) rank table."""
    pairs = [causal_pairs(s * T, T) for s in range(N_SEG)]
    num = sum(p * r / D for ranks in ranks_by_layer for p, r in zip(pairs, ranks, strict=True))
    return num / (len(ranks_by_layer) * sum(pairs))


def model_kl(ranks_by_layer, kl_c) -> torch.Tensor:
    """The model's KL per segment for the layers' ranks."""
    return torch.tensor(
        [sum(c * (1 - ranks[s] / D) ** 2 for c, ranks in zip(kl_c, ranks_by_layer, strict=True)) for s in range(N_SEG)]
    )


def train(budget, *, steps=80, rows=2, beta=0.05, cos_c=(1.0, 0.02), kl_c=(0.0, 0.0), fidelity="cosine", seed=0,
          **rl):  # fmt: skip
    """PPO on the toy at ``budget``; returns (controller, greedy ranks per layer, update statistics)."""
    torch.manual_seed(seed)
    ctrl = RLController.for_layers([type("L", (), {"buckets": BUCKETS})()] * 2, seed=seed)
    # decisions are independent here (a bandit): no discounting across them
    cfg = RLConfig(lr=1e-3, beta=beta, gamma=0.0, budget=budget, eps_start=0.3, eps_end=0.0, eps_decay_steps=steps,
                   discount=0.0, gae_lambda=0.0, fidelity=fidelity, **rl)  # fmt: skip
    trainer = PolicyTrainer(ctrl, cfg, seed=seed)
    layers = [Layer(i, ctrl, c, k) for i, (c, k) in enumerate(zip(cos_c, kl_c, strict=True))]
    history = []
    for _ in range(steps):
        ctrl.train()
        trainer.begin()
        for row in range(rows):
            ranks = [layer.forward(row) for layer in layers]
            if fidelity == "kl":
                ctrl.observe_segments(row, torch.exp(-model_kl(ranks, kl_c)))
        trainer.collect()
        history.append(trainer.update())
    ctrl.eval()
    ctrl.begin()
    return ctrl, [layer.forward(0) for layer in layers], history
