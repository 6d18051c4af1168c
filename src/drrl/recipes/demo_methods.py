"""One method of the demo, measured or fitted: perplexity with the drrl layers' counters (executed ranks, FLOPs,
planning time, rank grids, what a learned policy reads), a rank policy trained by PPO with the language model
frozen, and the inference-time cost shift that makes a trained policy meet a budget."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from drrl import flops
from drrl.attention.drrl import calibrating
from drrl.controllers import TableController, attach_controller, build_controller
from drrl.data.tokenizer import get_tokenizer
from drrl.data.tokens import load_tokens, spread_windows
from drrl.eval.allocation import fisher_errors, output_fisher
from drrl.eval.perplexity import evaluate_lm
from drrl.integrations.hf import apply_dynamic_rank
from drrl.integrations.hub import load_causal_lm
from drrl.progress import progress
from drrl.rl import PolicyTrainer, RLConfig, RLController
from drrl.rl.analysis import feature_use

if TYPE_CHECKING:
    from drrl.recipes.demo import DemoConfig

log = logging.getLogger(__name__)


@dataclass
class MethodResult:
    method: str
    ppl: float
    mean_rank: float
    flops: dict = field(default_factory=dict)  # by category, summed over layers
    full_flops: dict = field(default_factory=dict)
    plan_seconds: float = 0.0
    controller_seconds: float = 0.0
    forward_seconds: float = 0.0
    rank_grid: list | None = None  # (layers, segments) mean executed rank
    train_seconds: float = 0.0
    policy_updates: int = 0
    reward_history: list = field(default_factory=list)
    planned_scores: float = 0.0  # Q·Kᵀ FLOPs the decided ranks count (flops["scores"] is what executed)
    window_grids: list = field(default_factory=list)  # per evaluation window: (layers, segments) executed ranks
    feature_use: dict = field(default_factory=dict)  # a learned policy's decisions changed per feature group
    window_nll: list = field(default_factory=list)  # per evaluation window: summed next-token NLL (bootstrap CIs)
    window_tokens: list = field(default_factory=list)  # and its scored targets

    @property
    def adaptivity(self) -> float | None:
        """Fraction of (layer, segment) cells whose rank differs between evaluation windows (0: a fixed table)."""
        if len(self.window_grids) < 2:
            return None
        g = np.stack(self.window_grids)
        return float((g != g[:1]).any(0).mean())

    @property
    def reductions(self) -> dict:
        if not self.flops:
            return {
                "score_flops_reduction": 0.0,
                "attention_flops_reduction": 0.0,
                "planned_score_flops_reduction": 0.0,
            }
        red = flops.reductions(self.flops, self.full_flops)
        return {**red, "planned_score_flops_reduction": 1 - self.planned_scores / self.full_flops["scores"]}


def _layer_stats(layers) -> tuple[float, Counter, Counter, float, float, float]:
    fl, full, rank_tokens, tokens, plan_s, ctrl_s, planned = Counter(), Counter(), 0.0, 0, 0.0, 0.0, 0.0
    for m in layers:
        st = m.pop_stats(with_flops=True)
        if not st:
            continue
        rank_tokens += st["mean_rank"] * st["tokens"]
        tokens += st["tokens"]
        for k, v in st["flops"].items():
            (full if k.startswith("full_") else fl)[k.removeprefix("full_")] += v
        plan_s += st["time"].get("plan", 0.0)
        ctrl_s += st["time"].get("controller", 0.0)
        planned += st["planned_score_flops"]
    return (rank_tokens / tokens if tokens else 0.0), fl, full, plan_s, ctrl_s, planned


def perplexity(model, windows, layers=(), desc: str = "eval", quiet: bool = False) -> MethodResult:
    """Perplexity over ``windows`` (batch 1, :func:`drrl.eval.perplexity.evaluate_lm`), with the executed ranks
    and FLOPs of the drrl ``layers``."""
    for m in layers:
        m.pop_stats()
    bar = progress(total=len(windows), desc=desc, unit="win", disable=quiet, leave=False)
    grids, seen, records = [], {"tokens": 0, "seconds": 0.0}, []
    ctrl = layers[0].controller if layers else None
    learned = isinstance(ctrl, RLController)

    def on_window(n_tok: int, seconds: float) -> None:
        seen["tokens"] += n_tok
        seen["seconds"] += seconds
        bar.update(1)
        bar.set_postfix(tok_s=f"{seen['tokens'] / seen['seconds']:.0f}")
        if layers:
            grids.append(np.array([m.last_plan.ranks for m in layers], dtype=float))
        if learned and (rec := ctrl.decisions(0)) is not None:
            records.append(rec)

    # the LLM is frozen (eval mode); its drrl layers and controllers keep the modes the job gave them
    res = evaluate_lm(model, windows, batch_size=1, device=next(model.parameters()).device, on_batch=on_window,
                      set_eval=False, per_batch=True)  # fmt: skip
    bar.close()
    mean_rank, fl, full, plan_s, ctrl_s, planned = _layer_stats(layers)
    return MethodResult(
        desc, res["ppl"], mean_rank, dict(fl), dict(full), plan_s, ctrl_s, seen["seconds"],
        np.mean(grids, 0).tolist() if grids else None, planned_scores=planned, window_grids=grids,
        feature_use=feature_use(ctrl, records, layers[0].buckets) if learned else {},
        window_nll=res["batch_nll"], window_tokens=res["batch_tokens"],
    )  # fmt: skip


def train_policy(
    model, layers, windows, cfg: DemoConfig, beta: float, quiet: bool = False, budget=None, fidelity: str = "cosine"
):
    """Fit a fresh rank policy for reward weight β with PPO on ``windows``, the LM frozen (``policy`` mode). With a
    ``budget`` (a score-FLOPs cut) β is the initial Lagrange multiplier of the cost, moved towards the budget. With
    ``fidelity="kl"`` each step first runs the full-rank model (every layer at r_max) on the window for the teacher's
    next-token log-probabilities."""
    torch.manual_seed(cfg.seed)
    ctrl = attach_controller(layers, "rl", seed=cfg.seed)
    rl = RLConfig(
        lr=cfg.policy_lr, discount=cfg.discount, gae_lambda=0.95 if cfg.discount else 0.0, alpha=cfg.alpha, beta=beta,
        gamma=0.0 if fidelity == "fisher" else cfg.gamma,  # the bound is a proxy of the error Fisher measures
        eps_start=0.2, eps_end=0.0, eps_decay_steps=max(cfg.policy_steps, 1), budget=budget, fidelity=fidelity,
    )  # fmt: skip
    full_rank = TableController([[layers[0].buckets[-1].item()]] * len(layers))
    trainer = PolicyTrainer(ctrl, rl, seed=cfg.seed)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    what = (f"β={beta:g}" if budget is None else f"budget {100 * budget:g}%") + f" ({fidelity})"
    bar = progress(range(cfg.policy_steps), desc=f"policy {what}", unit="step", disable=quiet, leave=False)
    history = []
    for step in bar:
        ids = windows[step % len(windows)].to(device)[None]
        if fidelity == "kl":  # the teacher: the same frozen model at full rank (each window is seen once per policy)
            attach_controller(layers, full_rank)
            with torch.no_grad():
                teacher = F.log_softmax(model(input_ids=ids[:, :-1], use_cache=False).logits.float(), -1)
            attach_controller(layers, ctrl)
        ctrl.train()
        trainer.begin()
        with torch.no_grad():
            out = model(input_ids=ids[:, :-1], use_cache=False)
        if fidelity == "kl":
            trainer.observe_output(out.logits, teacher, cfg.segment)
            del teacher
        trainer.collect()
        stats = trainer.update()
        mean_r = stats.get("mean_reward", float("nan"))
        history.append(mean_r)
        bar.set_postfix(reward=f"{mean_r:.4f}", tok_s=f"{(step + 1) * ids.shape[1] / (time.perf_counter() - t0):.0f}")
        for m in layers:
            m.pop_stats()
        log.debug("policy %s step %d: %s", what, step, stats)
    ctrl.eval()
    return ctrl, time.perf_counter() - t0, history


@dataclass
class CalibratedLLM:
    """A causal LM with calibrated drrl layers, the demo's way (:func:`calibrated_llm`)."""

    model: object
    path: str
    layers: list
    calib: list  # windows spread over the first half of the training split (the first ``calibrate`` calibrated)
    test: list  # windows evenly spread over the test split


def add_llm_arguments(ap, *, calib_windows: int) -> None:
    """The options of :func:`calibrated_llm` on an ``argparse`` parser (the scripts in benchmarks/ that use it):
    ``--model``, ``--corpus``, ``--context``, ``--segment``, ``--bucket`` and ``--calib-windows``."""
    ap.add_argument("--model", default=None, help="Hugging Face folder or name (default: embedded SmolLM2-135M)")
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--segment", type=int, default=128)
    ap.add_argument("--bucket", type=int, default=8)
    ap.add_argument("--calib-windows", type=int, default=calib_windows)


def calibrated_llm(model=None, *, corpus="shakespeare", context=1024, calib_windows=6, calibrate=None,
                   test_windows=6, segment=128, bucket=8, adapters=None) -> CalibratedLLM:  # fmt: skip
    """Load ``model`` (default: the embedded SmolLM2-135M) in eval mode with its tokenizer and ``corpus``, swap in
    drrl attention (energy controller) and calibrate it on the first ``calibrate`` (default: all) of
    ``calib_windows`` windows of ``context`` + 1 tokens spread over the first half of the training split.
    ``adapters``: a ``drrl compress`` output folder whose adapters replace the model's linears first (with their
    decode path on), so the bases are calibrated on the adapted model's keys."""
    lm, path = load_causal_lm(model)
    lm.eval()
    if adapters is not None:
        from drrl.adapters.export import load_adapted

        load_adapted(lm, adapters)
    tok = get_tokenizer("hf:" + path)
    train, test = load_tokens(corpus, "train", tok), load_tokens(corpus, "test", tok)
    cal = spread_windows(train[: len(train) // 2], calib_windows, context + 1)
    ev = spread_windows(test, test_windows, context + 1)
    layers = apply_dynamic_rank(lm, controller="energy", segment=segment, bucket=bucket)
    with calibrating(lm):
        for w in cal[: calib_windows if calibrate is None else calibrate]:
            lm(input_ids=w[None, :-1], use_cache=False)
    return CalibratedLLM(lm, path, layers, cal, ev)


def fit_output_fisher(model, layers, windows, seed: int, quiet: bool = False) -> dict:
    """Each drrl layer's output Fisher from ``windows`` (:func:`drrl.eval.allocation.output_fisher`), with a
    progress bar; returns the passes and seconds it took (a one-off cost of the fisher reward and alloc-cells@B)."""
    t0 = time.perf_counter()
    bar = progress(total=len(windows), desc="output fisher", unit="win", disable=quiet, leave=False)
    device = next(model.parameters()).device
    passes = output_fisher(model, layers, windows, seed=seed, device=device, on_step=lambda: bar.update(1))
    bar.close()
    return {"windows": passes, "seconds": time.perf_counter() - t0}


def fit_cell_errors(model, layers, windows, quiet: bool = False):
    """Each (layer, segment) cell's Fisher KL estimate at every bucket (:func:`drrl.eval.allocation.fisher_errors`),
    with a progress bar; returns them and what they cost, with the model's summed estimate per uniform rank."""
    t0, buckets = time.perf_counter(), layers[0].buckets.tolist()
    bar = progress(total=len(windows) * (len(buckets) - 1), desc="cell errors", unit="fwd", disable=quiet,
                   leave=False)  # fmt: skip
    cells = fisher_errors(model, layers, windows, buckets, on_step=lambda: bar.update(1))
    bar.close()
    n_seg = len(cells.pairs)
    kl = {r: sum(row[s][j] for row in cells.error for s in range(n_seg)) / n_seg for j, r in enumerate(cells.ranks)}
    return cells, {"forwards": cells.forwards, "seconds": time.perf_counter() - t0, "kl_at_rank": kl}


def executed_fraction(model, layers, windows) -> float:
    """Executed score-FLOPs fraction of the drrl ``layers`` over forward passes on ``windows`` (their controllers as
    installed, in their current modes)."""
    device = next(model.parameters()).device
    for m in layers:
        m.pop_stats()
    with torch.no_grad():
        for w in windows:
            model(input_ids=w.to(device)[None, :-1], use_cache=False)
    fl = [m.pop_stats(with_flops=True).get("flops", {}) for m in layers]
    return sum(f.get("scores", 0) for f in fl) / max(sum(f.get("full_scores", 0) for f in fl), 1)


def meet_budget(ctrl, model, layers, windows, budget: float, steps: int = 6) -> tuple[float, float]:
    """The inference-time cost shift (:attr:`~drrl.rl.RLController.cost_shift`) that spends the budget: the
    smallest shift whose greedy decisions execute at most 1 − ``budget`` of the score FLOPs on ``windows``
    (training data). A policy that spends more gets a positive shift (lower ranks), one that spends less a negative
    one (higher ranks), so every policy is compared at the budget, not below it. Doubling brackets the shift, then
    ``steps`` bisection steps. Returns (shift, executed fraction on ``windows``)."""
    target, limit = 1 - budget, 2.0**12

    def fraction(shift: float) -> float:
        ctrl.cost_shift = shift
        return executed_fraction(model, layers, windows)

    f0 = fraction(0.0)
    if f0 > target:  # too expensive: raise the shift until it fits
        lo, hi = 0.0, 1.0
        while (f_hi := fraction(hi)) > target and hi < limit:
            lo, hi = hi, 2 * hi
        if f_hi > target:  # not even the largest shift fits (e.g. the guardrail forces high ranks)
            return hi, f_hi
    else:  # within the budget: lower the shift while it still fits
        lo, hi, f_hi = -1.0, 0.0, f0
        while (f_lo := fraction(lo)) <= target and lo > -limit:
            lo, hi, f_hi = 2 * lo, lo, f_lo
        if f_lo <= target:  # even the largest bonus fits (every decision at r_max)
            ctrl.cost_shift = lo
            return lo, f_lo
    shift, frac = smallest_within(fraction, lo, hi, f_hi, target, steps)
    ctrl.cost_shift = shift
    return shift, frac


def smallest_within(fraction, lo: float, hi: float, f_hi: float, target: float, steps: int) -> tuple[float, float]:
    """Bisection for the smallest knob x in [lo, hi] with ``fraction(x) <= target``, ``fraction`` non-increasing and
    ``fraction(hi) = f_hi <= target``: ``steps`` halvings; returns (x, fraction(x)), on the feasible side."""
    frac = f_hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        f_mid = fraction(mid)
        if f_mid <= target:
            hi, frac = mid, f_mid
        else:
            lo = mid
    return hi, frac


def tune_energy(model, layers, windows, budget: float, steps: int = 7) -> tuple[float, float]:
    """The largest energy threshold τ whose rule executes at most 1 − ``budget`` of the score FLOPs on ``windows``
    (training data): bisection on log10(1 − τ) in [−6, 0] (the kept energy that matters sits just below 1).
    Leaves the energy rule at that τ installed; returns (τ, executed fraction on ``windows``)."""
    target = 1 - budget

    def tau_at(x: float) -> float:  # log10(1 - τ) = x; τ stays > 0 (the rule's domain)
        return max(1 - 10**x, 1e-12)

    def fraction(x: float) -> float:
        attach_controller(layers, build_controller("energy", tau=tau_at(x)))
        return executed_fraction(model, layers, windows)

    f0 = fraction(0.0)  # τ → 0: the smallest bucket everywhere
    if f0 > target:
        return tau_at(0.0), f0
    x, frac = smallest_within(fraction, -6.0, 0.0, f0, target, steps)
    tau = tau_at(x)
    attach_controller(layers, build_controller("energy", tau=tau))
    return tau, frac


def nearest_buckets(grid: list, buckets: list[int]) -> list[list[int]]:
    """Each cell of a mean-rank grid rounded to the nearest bucket (the larger one on a tie)."""
    return [[min(buckets, key=lambda b, x=x: (abs(b - x), -b)) for x in row] for row in grid]
