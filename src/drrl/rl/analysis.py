"""What a trained rank policy's decisions depend on: replace one group of state features by its mean over
evaluation windows at the same (layer, segment) and count the greedy decisions that change. A policy whose
decisions never change under any replacement is a fixed table of (layer, segment); one that changes with the
kept-energy features adapts to its input."""

from __future__ import annotations

import torch

from drrl.rl.controller import RLController


def feature_groups(n_buckets: int) -> dict[str, list[int]]:
    """The columns of each feature group of :meth:`RLController.features` (energy at every bucket, then the
    attention's sequence statistics)."""
    return {"energy": list(range(n_buckets)), "query norm": [n_buckets], "key norm": [n_buckets + 1],
            "position": [n_buckets + 2]}  # fmt: skip


def feature_use(ctrl: RLController, records: list[dict], buckets: torch.Tensor) -> dict:
    """For each feature group, the fraction of greedy decisions (over ``records``: :meth:`RLController.decisions`
    of evaluation windows with the same decision layout) that change when the group is replaced by its mean over
    the windows at each (layer, segment). Also ``replayed``: the fraction of recorded actions the one-pass replay
    reproduces (1.0 unless the policy's numerics differ between the two). Empty when fewer than 2 windows or the
    layouts differ."""
    if len(records) < 2 or any(
        not (torch.equal(r["layers"], records[0]["layers"]) and torch.equal(r["segments"], records[0]["segments"]))
        for r in records
    ):
        return {}
    feats = torch.stack([r["feats"] for r in records])  # (W, N, F): the same decision index is the same cell
    base = [ctrl.greedy(r, buckets) for r in records]
    n = sum(len(b) for b in base)
    out = {"replayed": sum(int((b == r["actions"]).sum()) for b, r in zip(base, records, strict=True)) / n}
    for name, cols in feature_groups(len(buckets)).items():
        mean = feats[..., cols].mean(0)
        changed = 0
        for r, b in zip(records, base, strict=True):
            edited = dict(r, feats=r["feats"].clone())
            edited["feats"][:, cols] = mean
            changed += int((ctrl.greedy(edited, buckets) != b).sum())
        out[name] = changed / n
    return out
