"""Loss and perplexity curves of a run from its ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from drrl.errors import DrrlError
from drrl.utils import atomic_path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DrrlError(f"{path} not found; pass a run folder written by `drrl train`")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise DrrlError(f"{path} line {i} is not JSON; the file is damaged") from None
    return rows


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a two-panel PNG (train/validation loss; validation perplexity) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r and not r.get("final")]
    final = [(r["step"], r["val_loss"]) for r in rows if r.get("final")]
    if not train and not val and not final:
        raise DrrlError(f"{run_dir}/metrics.jsonl holds no losses yet; train longer before plotting")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax1.plot(*zip(*train, strict=True), label="train", lw=1)
    if val:
        ax1.plot(*zip(*val, strict=True), "o-", label="validation (periodic, capped)")
        ax2.plot([s for s, _ in val], [math.exp(v) for _, v in val], "o-", color="C1", label="periodic (capped)")
    if final:
        ax1.plot(*zip(*final, strict=True), "*", ms=12, color="C3", label="final (whole split)")
        ax2.plot(
            [s for s, _ in final], [math.exp(v) for _, v in final], "*", ms=12, color="C3", label="final (whole split)"
        )
        ax2.legend()
    ax1.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax1.legend()
    ax2.set(xlabel="step", ylabel="perplexity", yscale="log", title="validation perplexity")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out
