"""The ``drrl prune`` recipe: Q/K channel pruning of a trained DeltaNet-family run, table over selectors and ratios.

For each selector and ratio p, a copy of the run's model keeps ⌊d_k (1 − p)⌋ query/key channels per head
(:func:`drrl.pruning.prune_qk`, calibrated once on windows of the calibration corpus's train split) and is
measured on held-out windows of the run's corpus (``split``, default test):

- ``ppl`` and ``ppl_ratio`` (over the unpruned model's, same windows);
- ``state_bytes_ratio``: recurrent state bytes over the unpruned model's;
- ``decode_speedup``: time of the recurrent decode step of all DeltaNet layers (``DeltaNet.step``) for
  ``decode_batch`` sequences, unpruned over pruned, medians of interleaved ``torch.utils.benchmark``
  measurements; ``model_step_speedup`` the same for a whole model step (embedding, MLPs and LM head too);
- ``utilisation``: mean rank utilisation (stable rank / min(d_k, d_v)) of the states over one window (the
  unpruned model's per layer and head, and its effective rank, are in ``unpruned``);
- with ``recover``: the same after LoRA recovery on q/k/v (``drrl.train.recovery``; ``ppl_recovered``).

Writes ``DIR/report.json`` (``{"rows": [{"selector", "ratio", "ppl", "ppl_ratio", "state_bytes_ratio",
"decode_speedup", ...}]}``), ``DIR/report.md``, ``DIR/utilisation.png`` (the unpruned model's rank
utilisation and effective rank over time, per layer, spread over heads) and, with ``save``, each pruned model as a checkpoint under
``DIR/models/<selector>-<p>`` that ``drrl eval`` and ``drrl.load`` read like any run.
"""

from __future__ import annotations

import copy
import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drrl.config import require
from drrl.data.tokens import load_tokens, spread_windows
from drrl.errors import ConfigError
from drrl.eval.perplexity import evaluate_lm
from drrl.pruning import (
    available_selectors,
    calibrate,
    decode_times,
    get_selector,
    kept_width,
    mixers,
    prune_qk,
    state_ranks,
)
from drrl.train.recovery import RecoveryConfig, lora_recover
from drrl.utils import check_out_dir, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class PruneConfig:
    selectors: list[str] = field(default_factory=lambda: ["drrqr"])
    ratios: list[float] = field(default_factory=lambda: [0.5])  # fraction of q/k channels removed per head
    calibration: str | None = None  # corpus whose train split calibrates (default: the run's training corpus)
    split: str = "test"  # held-out split of the run's evaluation corpus
    calib_windows: int = 16
    eval_tokens: int = 65536  # scored held-out tokens (0 = the whole split)
    rows: int = 5000  # DRRQR / PCA activation rows per head
    recover: bool = False
    recovery: RecoveryConfig = field(default_factory=lambda: RecoveryConfig(steps=100))
    decode_batch: int = 32
    timing_repeats: int = 5
    context: int | None = None  # tokens per window (a Hugging Face model's; default 512; a drrl run uses its own)
    prompt_tokens: int = 64  # Hugging Face models: generate() prompt and new tokens of the decode timing
    new_tokens: int = 32
    scale: str = "eps"  # Hugging Face models: readout scale after pruning, eps (the unpruned one, via ε) or kernel
    compare_scales: bool = True  # Hugging Face models: also the perplexity at the other scale
    save: bool = True
    seed: int = 0

    def __post_init__(self):
        require(bool(self.selectors), "selectors", "must list at least one selector")
        names = available_selectors()  # the registry: drrl.pruning.register_selector
        for s in self.selectors:
            require(s in names, "selectors", f"must be among {', '.join(names)}, got {s!r}")
        require(bool(self.ratios), "ratios", "must list at least one ratio")
        for r in self.ratios:
            require(0 <= r < 1, "ratios", f"are fractions of q/k channels removed, in [0, 1), got {r}")
        require(
            self.split in ("train", "validation", "test"), "split", f"must be train/validation/test, got {self.split}"
        )
        require(self.scale in ("eps", "kernel"), "scale", f"must be eps or kernel, got {self.scale!r}")
        require(self.context is None or self.context > 1, "context", f"must be > 1 tokens, got {self.context}")
        for name in ("calib_windows", "rows", "decode_batch", "timing_repeats", "prompt_tokens", "new_tokens"):
            require(getattr(self, name) > 0, name, f"must be a positive integer, got {getattr(self, name)}")
        require(self.eval_tokens >= 0, "eval_tokens", f"must be >= 0, got {self.eval_tokens}")


def _plot_ranks(ranks: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "utilisation", "stable rank / min(d_k, d_v)"),
                           (axes[1], "effective_rank", "effective rank (Roy–Vetterli)")):  # fmt: skip
        for i, per_head in enumerate(ranks[key]):  # (H, T)
            t = np.arange(1, per_head.shape[1] + 1)
            line = ax.plot(t, per_head.mean(0), label=f"layer {i}")[0]
            ax.fill_between(t, per_head.min(0), per_head.max(0), color=line.get_color(), alpha=0.15, lw=0)
        ax.set_xlabel("token")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("DeltaNet states over one held-out window (line: mean over heads; band: min-max over heads)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


@dataclass
class _Job:
    """One ``drrl prune`` run: the unpruned model, its data and the measurements every pruned copy is held to."""

    cfg: PruneConfig
    out: Path
    dense: Any  # the unpruned model
    tok: Any
    ckpt: Any
    run_cfg: Any
    eval_tokens: Any
    train_tokens: Any  # the run's training corpus, for recovery (None without)
    window: torch.Tensor  # (1, T) held-out tokens for the state ranks
    ranks: dict  # state_ranks of the unpruned model
    base_ppl: float
    base_bytes: int
    cal: list  # calibrate's output, shared by every selector and ratio

    def ppl(self, model) -> float:
        return evaluate_lm(model, self.eval_tokens, self.run_cfg.model.context, batch_size=8)["ppl"]


def _load_deltanet(path: str | Path, cfg: PruneConfig):
    """The run at ``path`` (model, tokenizer, checkpoint, RunConfig); ConfigError unless it is a DeltaNet run
    whose heads keep a channel at every ratio of ``cfg``."""
    from drrl.api import load
    from drrl.train.config import RunConfig

    dense, tok, ckpt = load(path, "cpu")
    run_cfg = RunConfig.from_dict(ckpt.config)
    if run_cfg.model.kind != "deltanet":
        raise ConfigError(f"{path} holds a model of kind {run_cfg.model.kind}; drrl prune needs model.kind=deltanet")
    for r in cfg.ratios:  # prune_qk's rule, checked before any work: every head keeps at least one channel
        try:
            kept_width([m.head_k_dim for m in mixers(dense)], r)
        except ValueError as e:
            raise ConfigError(f"--ratio: {e}") from None
    return dense, tok, ckpt, run_cfg


def _prepare(path: str | Path, cfg: PruneConfig, out: Path) -> _Job:
    """Load the run and its corpora, measure the unpruned model (ppl, state bytes, ranks: DIR/utilisation.png)
    and calibrate it once for every selector."""
    dense, tok, ckpt, run_cfg = _load_deltanet(path, cfg)
    check_out_dir(out)
    context = run_cfg.model.context
    calib_tokens = load_tokens(cfg.calibration or run_cfg.data.corpus, "train", tok)
    eval_tokens = load_tokens(run_cfg.eval.corpus or run_cfg.data.corpus, cfg.split, tok)
    if cfg.eval_tokens:
        eval_tokens = eval_tokens[: cfg.eval_tokens + 1]
    train_tokens = load_tokens(run_cfg.data.corpus, "train", tok) if cfg.recover else None
    batches = [w.view(1, -1) for w in spread_windows(calib_tokens, cfg.calib_windows, context + 1)]
    base_ppl = evaluate_lm(dense, eval_tokens, context, batch_size=8)["ppl"]
    base_bytes = dense.state_bytes()
    window = torch.from_numpy(np.asarray(eval_tokens[: min(context, len(eval_tokens) - 1)], dtype=np.int64))[None]
    ranks = state_ranks(dense, window)
    out.mkdir(parents=True, exist_ok=True)
    _plot_ranks(ranks, out / "utilisation.png")
    cal = calibrate(dense, batches, ("acts", "rms", "grads"), rows=cfg.rows, seed=cfg.seed)
    log.info("unpruned: ppl %.3f, state %d bytes, utilisation %.3f", base_ppl, base_bytes, ranks["mean"])
    return _Job(
        cfg, out, dense, tok, ckpt, run_cfg, eval_tokens, train_tokens, window, ranks, base_ppl, base_bytes, cal
    )


def _prune_and_measure(job: _Job, sel: str, ratio: float, progress: bool) -> tuple[Any, dict, dict]:
    """A pruned (and, with ``recover``, recovered) copy of the unpruned model, its report row and prune_qk's info."""
    cfg, dense, base_ppl = job.cfg, job.dense, job.base_ppl
    model = copy.deepcopy(dense)
    info = prune_qk(model, ratio, sel, job.cal, seed=cfg.seed, rows=cfg.rows)
    p = job.ppl(model)
    row = {
        "selector": sel, "ratio": ratio, "d_keep": info["d_keep"], "d_k": info["d_k"],
        "ppl": p, "ppl_ratio": p / base_ppl,
        "state_bytes_ratio": model.state_bytes() / job.base_bytes,
        "utilisation": state_ranks(model, job.window)["mean"],
    }  # fmt: skip
    if cfg.recover:
        stats = lora_recover(model, job.train_tokens, cfg.recovery, teacher=dense, progress=progress)
        pr = job.ppl(model)
        row.update(ppl_recovered=pr, ppl_ratio_recovered=pr / base_ppl, recovery_seconds=stats["seconds"])
    log.info("%s p=%.2f: ppl %.3f (x%.3f)%s", sel, ratio, p, p / base_ppl,
             f", recovered {row['ppl_recovered']:.3f}" if cfg.recover else "")  # fmt: skip
    return model, row, info


def _save_pruned(job: _Job, sel: str, ratio: float, model, info: dict) -> None:
    """DIR/models/<selector>-<ratio>: a checkpoint that ``drrl eval`` and ``drrl.load`` read like any run."""
    from drrl.train.checkpoint import save_checkpoint

    rc = copy.deepcopy(job.run_cfg)
    rc.model = model.cfg
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(
        job.out / "models" / f"{sel}-{ratio:g}", job.ckpt.step, model, opt,
        {"config": rc.to_dict(), "tokenizer": job.tok.name, "pruning": {k: info[k] for k in ("selector", "ratio", "d_k", "d_keep")}},
    )  # fmt: skip


def _time_decode(job: _Job, rows: list[dict], timed: dict) -> None:
    """Decode timing per ratio: the unpruned model against the pruned one, interleaved; fills ``rows``."""
    cfg = job.cfg
    for ratio in cfg.ratios:
        t = decode_times({"dense": job.dense, "pruned": timed[ratio]}, cfg.decode_batch, cfg.timing_repeats)
        for row in rows:
            if row["ratio"] == ratio:
                row["decode_speedup"] = t["dense"]["mixers"] / t["pruned"]["mixers"]
                row["model_step_speedup"] = t["dense"]["model"] / t["pruned"]["model"]
                row["mixer_step_us"] = 1e6 * t["pruned"]["mixers"]
        log.info(
            "p=%.2f: DeltaNet layers' step %.1f -> %.1f us",
            ratio,
            1e6 * t["dense"]["mixers"],
            1e6 * t["pruned"]["mixers"],
        )


def _result(job: _Job, rows: list[dict]) -> dict:
    """report.json's content: the run, the config, the unpruned model's measurements, the rows, the machine."""
    ranks = job.ranks
    base = {
        "ppl": job.base_ppl, "state_bytes": job.base_bytes, "utilisation": ranks["mean"],
        "d_k": mixers(job.dense)[0].head_k_dim,
        "utilisation_per_head": ranks["utilisation"].mean(-1).round(4).tolist(),  # (L, H), token mean
        "effective_rank_per_head": ranks["effective_rank"].mean(-1).round(3).tolist(),
    }  # fmt: skip
    return {
        "run": str(job.ckpt.path), "config": asdict(job.cfg), "unpruned": base, "rows": rows,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }  # fmt: skip


def run_prune(path: str | Path, cfg: PruneConfig, out: str | Path, *, progress: bool = True) -> dict:
    """Prune the DeltaNet run or checkpoint at ``path`` for every selector × ratio of ``cfg``; see module doc."""
    out = Path(out)
    job = _prepare(path, cfg, out)
    rows, timed = [], {}  # one pruned model per ratio is timed (speed does not depend on the selector)
    timing_sel = next((s for s in cfg.selectors if not get_selector(s).rotates), cfg.selectors[0])
    for sel in cfg.selectors:
        for ratio in cfg.ratios:
            model, row, info = _prune_and_measure(job, sel, ratio, progress)
            rows.append(row)
            if sel == timing_sel:
                timed[ratio] = model
            if cfg.save:
                _save_pruned(job, sel, ratio, model, info)
    _time_decode(job, rows, timed)
    result = _result(job, rows)
    write_json_atomic(out / "report.json", result)
    write_text_atomic(out / "report.md", report_markdown(result))
    return result


def report_markdown(result: dict) -> str:
    base, rec = result["unpruned"], result["config"]["recover"]
    lines = [
        f"# Q/K channel pruning of {result['run']}",
        "",
        f"Unpruned: ppl {base['ppl']:.3f}, d_k {base['d_k']}, state {base['state_bytes']:,} bytes per sequence, "
        f"rank utilisation {base['utilisation']:.3f}. {result['machine']}.",
        "",
        "| selector | removed | d' | ppl | × unpruned |"
        + (" recovered ppl | × unpruned |" if rec else "")
        + " state bytes | DeltaNet step speed-up | model step speed-up | utilisation |",
        "|---|---:|---:|---:|---:|" + ("---:|---:|" if rec else "") + "---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        line = f"| {r['selector']} | {r['ratio']:.0%} | {r['d_keep']} | {r['ppl']:.3f} | {r['ppl_ratio']:.3f} |"
        if rec:
            line += f" {r['ppl_recovered']:.3f} | {r['ppl_ratio_recovered']:.3f} |"
        line += (
            f" {r['state_bytes_ratio']:.2f}× | {r.get('decode_speedup', float('nan')):.2f}× |"
            f" {r.get('model_step_speedup', float('nan')):.2f}× | {r['utilisation']:.3f} |"
        )
        lines.append(line)
    return "\n".join(lines) + "\n"
