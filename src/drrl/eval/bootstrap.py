"""Paired bootstrap confidence intervals over evaluation windows.

Two methods scored on the same windows differ by much less than either varies across windows (some windows are
simply harder), so the comparison resamples *windows*, the same draw for both methods, and recomputes the ratio
of their perplexities on each resample (Efron's percentile interval on a paired statistic).

>>> r = ppl_ratio_ci(nll_a, nll_b, tokens)      # summed NLL and target count per window, same windows
>>> r.ratio, r.low, r.high                      # perplexity of a over b, and its 95% interval
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class RatioCI:
    ratio: float  # exp((Σ nll_a − Σ nll_b) / Σ tokens): perplexity of a over perplexity of b on all windows
    low: float
    high: float
    level: float
    windows: int
    resamples: int

    def as_dict(self) -> dict:
        return asdict(self)


def ppl_ratio_ci(
    nll_a: Sequence[float],
    nll_b: Sequence[float],
    tokens: Sequence[int],
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> RatioCI:
    """Perplexity ratio of method a over method b with a paired bootstrap interval over windows.

    ``nll_a[i]`` and ``nll_b[i]`` are the summed next-token NLLs of window ``i`` under each method and
    ``tokens[i]`` its scored targets. Each resample draws windows with replacement (the same draw for a and b)
    and recomputes the ratio; the interval is the central ``level`` of those ratios. Deterministic in ``seed``."""
    a, b, n = (np.asarray(x, dtype=np.float64) for x in (nll_a, nll_b, tokens))
    if not (a.shape == b.shape == n.shape) or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need one summed NLL per window for both methods and one token count each, got "
                         f"{a.shape}, {b.shape}, {n.shape}")  # fmt: skip
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if (n <= 0).any():
        raise ValueError("every window needs at least one scored token")
    ratio = float(np.exp((a.sum() - b.sum()) / n.sum()))
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    diff = a - b
    boot = np.exp(diff[idx].sum(1) / n[idx].sum(1))
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return RatioCI(ratio, float(lo), float(hi), level, len(a), resamples)
