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
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DrrlError(f"{path} is not UTF-8 text; the file is damaged") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                raise DrrlError(f"{path} line {i} is not JSON; the file is damaged") from None
            if not isinstance(row, dict):
                raise DrrlError(f"{path} line {i} is not a JSON object; the file is damaged")
            rows.append(row)
    return rows


PLOT_MAX = 1e300  # matplotlib's autoscaling overflows near the largest float; such values are not drawn


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _points(rows: list[dict], key: str, run_dir, keep=lambda r: True) -> list[tuple[float, float]]:
    """(step, value) of the rows that hold ``key`` (and pass ``keep``); a non-numeric one is a damaged file."""
    pts = []
    for r in rows:
        if key in r and keep(r):
            step, value = r.get("step"), r[key]
            if not (_number(step) and _number(value)):
                raise DrrlError(
                    f"{run_dir}/metrics.jsonl has a {key} row with step {step!r} and value {value!r}, not two "
                    "numbers; the file is damaged"
                )
            if abs(step) < PLOT_MAX and abs(value) < PLOT_MAX:  # a diverged step (NaN/inf loss) is not drawn
                pts.append((step, value))
    return pts


def _ppl(points: list[tuple[float, float]]) -> tuple[list, list]:
    """Steps and perplexities exp(loss), leaving out those that overflow or underflow a float."""
    kept = [(s, math.exp(v)) for s, v in points if -700 < v < 700]  # exp(v) > 0 and < inf: drawable on a log axis
    return [s for s, _ in kept], [p for _, p in kept]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a two-panel PNG (train/validation loss; validation perplexity) and return its path.

    Steps whose loss is NaN or infinite (a diverged run) or beyond ±1e300 are left out of the curves, and so
    are perplexities beyond float range; a row whose step or loss is not a number means a damaged file
    (DrrlError)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out) if out else Path(run_dir) / "curves.png"
    if out.is_dir():
        raise DrrlError(f"--out {out} is a folder; pass a PNG file path")
    rows = read_metrics(run_dir)
    train = _points(rows, "loss", run_dir)
    val = _points(rows, "val_loss", run_dir, lambda r: not r.get("final"))
    final = _points(rows, "val_loss", run_dir, lambda r: r.get("final"))
    if not train and not val and not final:
        raise DrrlError(f"{run_dir}/metrics.jsonl holds no finite losses yet; train longer before plotting")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        if train:
            ax1.plot(*zip(*train, strict=True), label="train", lw=1)
        if val:
            ax1.plot(*zip(*val, strict=True), "o-", label="validation (periodic, capped)")
            ax2.plot(*_ppl(val), "o-", color="C1", label="periodic (capped)")
        if final:
            ax1.plot(*zip(*final, strict=True), "*", ms=12, color="C3", label="final (whole split)")
            ax2.plot(*_ppl(final), "*", ms=12, color="C3", label="final (whole split)")
            ax2.legend()
        ax1.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
        ax1.legend()
        ax2.set(xlabel="step", ylabel="perplexity", yscale="log", title="validation perplexity")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        fig.suptitle(Path(run_dir).name)
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
    return out
