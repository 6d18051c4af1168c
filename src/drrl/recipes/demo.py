"""The main job: DR-RL against full attention and rank heuristics on a pretrained LLM (``drrl demo``).

On the embedded SmolLM2-135M (or any supported Hugging Face model) and held-out Shakespeare plays (or any
corpus of the data layer), at a context of 1024 tokens:

1. ``full``: the model's own attention; perplexity on evenly spread test windows.
2. DR-RL attention is swapped in (:func:`drrl.integrations.hf.apply_dynamic_rank`) with calibrated post-RoPE
   bases fitted on training windows; one calibration serves every method below.
3. ``drrl`` and ``drrl-beta=<β>``: a rank policy per β trained with PPO in ``policy`` mode (the language model
   frozen) on training windows, evaluated greedily.
4. ``static`` (fixed rank, matched to DR-RL's mean rank, and neighbours for the curve), ``random`` and
   ``energy`` (threshold rule at a few τ).
5. Time (:mod:`.demo_timing`): each method's attention layers on one window's captured queries, keys and values against SDPA,
   interleaved, median of repeats; one decode step of every layer against a full-width cache.

Writes ``report.md``, ``results.json``, ``pareto.png`` and ``ranks.png`` into the output folder.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from drrl import flops
from drrl.attention.drrl import calibrating
from drrl.controllers import attach_controller, build_controller
from drrl.data.tokenizer import get_tokenizer
from drrl.data.tokens import load_tokens, spread_windows
from drrl.errors import ConfigError
from drrl.eval.machine import machine
from drrl.eval.perplexity import evaluate_lm
from drrl.integrations.hf import _geometry, apply_dynamic_rank, cache_bytes_per_token
from drrl.integrations.hub import EMBEDDED_MODEL, load_causal_lm
from drrl.progress import progress
from drrl.recipes.demo_report import plots, render_report, render_table
from drrl.recipes.demo_timing import capture_qkv, time_methods
from drrl.rl import PolicyTrainer, RLConfig
from drrl.utils import check_out_dir, resolve_device, write_json_atomic, write_text_atomic

__all__ = ["DemoConfig", "MethodResult", "render_report", "render_table", "run_demo"]

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Settings of ``drrl demo`` (defaults: about 6 minutes on 2 CPU cores)."""

    model: str | None = None  # None: the embedded SmolLM2-135M
    trust_remote_code: bool = False  # let a hub model run its own Python code (only for models you trust)
    corpus: str = "shakespeare"
    context: int = 1024
    segment: int = 128
    bucket: int = 8
    eval_windows: int = 6
    calib_windows: int = 6
    policy_steps: int = 12  # PPO updates per β (one training window each)
    policy_lr: float = 3e-3
    discount: float = 0.0  # a decision's reward is its own segment's: a contextual bandit (GAE with γ = 0)
    # the first β is the method "drrl"; 0.05 (the paper's default) keeps full rank under this reward (see report)
    betas: tuple[float, ...] = (0.5, 0.05, 1.0)
    static_ranks: tuple[int, ...] = (32, 40, 48)  # besides the one matched to drrl's mean rank
    alpha: float = 1.0
    gamma: float = 0.1
    taus: tuple[float, ...] = (0.97, 0.99)
    timing_repeats: int = 3
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        for name in ("context", "segment", "bucket", "eval_windows", "calib_windows", "timing_repeats"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"demo {name} must be a positive integer, got {getattr(self, name)}")
        if self.policy_steps < 0:
            raise ConfigError(f"demo policy_steps must be >= 0, got {self.policy_steps}")
        if not self.betas:
            raise ConfigError("demo needs at least one β (e.g. --betas 0.05)")
        if any(not 0 < t <= 1 for t in self.taus):
            raise ConfigError(f"energy thresholds tau must be in (0, 1], got {self.taus}")
        if any(not (math.isfinite(b) and b >= 0) for b in self.betas):
            raise ConfigError(f"reward cost weights beta must be finite and >= 0, got {self.betas}")
        names = [method_name(i, b) for i, b in enumerate(self.betas)]
        if len(set(names)) < len(names):
            raise ConfigError(f"the betas {self.betas} repeat a method name ({', '.join(names)}); give distinct values")
        resolve_device(self.device)  # a one-line error before any work


def method_name(i: int, beta: float) -> str:
    """``drrl`` for the first β of the sweep, ``drrl-beta=<β>`` for the others."""
    return "drrl" if i == 0 else f"drrl-beta={beta:g}"


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

    @property
    def reductions(self) -> dict:
        if not self.flops:
            return {"score_flops_reduction": 0.0, "attention_flops_reduction": 0.0}
        return flops.reductions(self.flops, self.full_flops)


# ------------------------------------------------------------------------------------------ evaluation


def _layer_stats(layers) -> tuple[float, Counter, Counter, float, float]:
    fl, full, rank_tokens, tokens, plan_s, ctrl_s = Counter(), Counter(), 0.0, 0, 0.0, 0.0
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
    return (rank_tokens / tokens if tokens else 0.0), fl, full, plan_s, ctrl_s


def perplexity(model, windows, layers=(), desc: str = "eval", quiet: bool = False) -> MethodResult:
    """Perplexity over ``windows`` (batch 1, :func:`drrl.eval.perplexity.evaluate_lm`), with the executed ranks
    and FLOPs of the drrl ``layers``."""
    for m in layers:
        m.pop_stats()
    bar = progress(total=len(windows), desc=desc, unit="win", disable=quiet, leave=False)
    grid, seen = None, {"tokens": 0, "seconds": 0.0}

    def on_window(n_tok: int, seconds: float) -> None:
        nonlocal grid
        seen["tokens"] += n_tok
        seen["seconds"] += seconds
        bar.update(1)
        bar.set_postfix(tok_s=f"{seen['tokens'] / seen['seconds']:.0f}")
        if layers:
            g = np.array([m.last_plan.ranks for m in layers], dtype=float)
            grid = g if grid is None else grid + g

    # the LLM is frozen (eval mode); its drrl layers and controllers keep the modes the job gave them
    res = evaluate_lm(model, windows, batch_size=1, device=next(model.parameters()).device, on_batch=on_window,
                      set_eval=False)  # fmt: skip
    bar.close()
    mean_rank, fl, full, plan_s, ctrl_s = _layer_stats(layers)
    return MethodResult(
        desc, res["ppl"], mean_rank, dict(fl), dict(full), plan_s, ctrl_s, seen["seconds"],
        None if grid is None else (grid / len(windows)).tolist(),
    )  # fmt: skip


def train_policy(model, layers, windows, cfg: DemoConfig, beta: float, quiet: bool = False):
    """Fit a fresh rank policy for reward weight β with PPO on ``windows``, the LM frozen (``policy`` mode)."""
    torch.manual_seed(cfg.seed)
    ctrl = attach_controller(layers, "rl", seed=cfg.seed)
    rl = RLConfig(
        lr=cfg.policy_lr, discount=cfg.discount, gae_lambda=0.95 if cfg.discount else 0.0, alpha=cfg.alpha, beta=beta,
        gamma=cfg.gamma, eps_start=0.2, eps_end=0.0, eps_decay_steps=max(cfg.policy_steps, 1),
    )  # fmt: skip
    trainer = PolicyTrainer(ctrl, rl, seed=cfg.seed)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    bar = progress(range(cfg.policy_steps), desc=f"policy β={beta:g}", unit="step", disable=quiet, leave=False)
    history = []
    for step in bar:
        ctrl.train()
        trainer.begin()
        ids = windows[step % len(windows)].to(device)[None]
        with torch.no_grad():
            model(input_ids=ids[:, :-1], use_cache=False)
        trainer.collect()
        stats = trainer.update()
        mean_r = stats.get("mean_reward", float("nan"))
        history.append(mean_r)
        bar.set_postfix(reward=f"{mean_r:.4f}", tok_s=f"{(step + 1) * ids.shape[1] / (time.perf_counter() - t0):.0f}")
        for m in layers:
            m.pop_stats()
        log.debug("policy β=%g step %d: %s", beta, step, stats)
    ctrl.eval()
    return ctrl, time.perf_counter() - t0, history


# ------------------------------------------------------------------------------------------ the job


def run_demo(cfg: DemoConfig, out: str | Path, quiet: bool = False) -> dict:
    """Run the whole comparison and write the report; returns the results dictionary."""
    out = Path(out)
    check_out_dir(out)  # a bad --out fails now, not after minutes of work
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, path = load_causal_lm(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model.to(device)
    tok = get_tokenizer("hf:" + path, trust_remote_code=cfg.trust_remote_code)
    test = load_tokens(cfg.corpus, "test", tok)
    train = load_tokens(cfg.corpus, "train", tok)
    L = cfg.context + 1
    eval_w = spread_windows(test, cfg.eval_windows, L)
    calib_w = spread_windows(train, cfg.calib_windows, L)
    policy_w = spread_windows(train, max(cfg.policy_steps, 1), L, offset_frac=0.5)  # between the calibration windows

    results: dict[str, MethodResult] = {}
    results["full"] = perplexity(model, eval_w, desc="full", quiet=quiet)
    layers = apply_dynamic_rank(model, controller="fixed", rank=_r_max(model), segment=cfg.segment,
                                bucket=cfg.bucket)  # fmt: skip
    with calibrating(model):
        for w in progress(calib_w, desc="calibrate", unit="win", disable=quiet, leave=False):
            model(input_ids=w[None, :-1].to(device), use_cache=False)
    n_cal = sum(bool(m.calibrated) for m in layers)
    if n_cal < len(layers):
        log.warning("%d of %d layers failed to calibrate and run at full rank", len(layers) - n_cal, len(layers))
    buckets = layers[0].buckets.tolist()

    setups, matched = _evaluate_methods(model, layers, results, eval_w, policy_w, cfg, quiet)
    attach_controller(layers, build_controller("fixed", rank=buckets[-1]))  # capture a full-rank pass's q, k, v
    qkv = capture_qkv(model, layers, eval_w[0])
    timing = time_methods(layers, qkv, setups, cfg.timing_repeats)
    rows = _rows(results, timing, model, cfg)
    report = {
        "config": asdict(cfg),
        "model": path if cfg.model else EMBEDDED_MODEL,
        "machine": machine(device),
        "buckets": buckets,
        "matched_static_rank": matched,
        "policy_overhead": _policy_overhead(results["drrl"]),
        "seconds": time.perf_counter() - t_start,
        "rows": rows,
        "rank_grids": {n: r.rank_grid for n, r in results.items() if r.rank_grid is not None},
        "reward_history": {
            n: [x if math.isfinite(x) else None for x in r.reward_history]
            for n, r in results.items()
            if n.startswith("drrl")
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    plots(report, out)
    write_json_atomic(out / "results.json", report)
    write_text_atomic(out / "report.md", render_report(report))
    return report


def _evaluate_methods(model, layers, results: dict, eval_w, policy_w, cfg: DemoConfig, quiet: bool):
    """DR-RL (one policy per β) and the heuristics on the calibrated layers, evaluated into ``results``. Returns
    each method's controller installer and the static rank matched to DR-RL's mean rank."""
    buckets = layers[0].buckets.tolist()

    def install(ctrl_factory):
        def setup():
            attach_controller(layers, ctrl_factory())

        return setup

    setups: dict = {}
    # DR-RL: one policy per β
    policies = {}
    for i, beta in enumerate(cfg.betas):
        name = method_name(i, beta)
        ctrl, secs, history = train_policy(model, layers, policy_w, cfg, beta, quiet)
        policies[name] = ctrl
        setups[name] = install(lambda ctrl=ctrl: ctrl)
        setups[name]()
        res = perplexity(model, eval_w, layers, desc=name, quiet=quiet)
        res.train_seconds, res.policy_updates = secs, ctrl.updates
        res.reward_history = history
        results[name] = res
    # the heuristics
    drrl_rank = results["drrl"].mean_rank
    matched = min(buckets, key=lambda b: (abs(b - drrl_rank), -b))
    static_ranks = sorted({matched, *(b for b in cfg.static_ranks if b in buckets and b != buckets[-1])})
    for r in static_ranks:
        name = "static" if r == matched else f"static-r={r}"
        setups[name] = install(lambda r=r: build_controller("fixed", rank=r))
        setups[name]()
        results[name] = perplexity(model, eval_w, layers, desc=name, quiet=quiet)
    setups["random"] = install(lambda: build_controller("random", seed=cfg.seed))
    setups["random"]()
    results["random"] = perplexity(model, eval_w, layers, desc="random", quiet=quiet)
    for i, tau in enumerate(cfg.taus):
        name = "energy" if i == 0 else f"energy-tau={tau:g}"
        setups[name] = install(lambda tau=tau: build_controller("energy", tau=tau))
        setups[name]()
        results[name] = perplexity(model, eval_w, layers, desc=name, quiet=quiet)

    return setups, matched


def _r_max(model) -> int:
    return _geometry(model)[3]


def _policy_overhead(res: MethodResult) -> dict:
    """Host time spent on state features and the policy (the whole plan) against the model's forward time."""
    return {
        "plan_seconds": res.plan_seconds,
        "controller_seconds": res.controller_seconds,
        "forward_seconds": res.forward_seconds,
        "plan_fraction": res.plan_seconds / max(res.forward_seconds, 1e-12),
        "controller_fraction": res.controller_seconds / max(res.forward_seconds, 1e-12),
    }


def _rows(results: dict[str, MethodResult], timing: dict, model, cfg: DemoConfig) -> list[dict]:
    full_ppl = results["full"].ppl
    d = _r_max(model)
    full_cache = cache_bytes_per_token(model, None)
    rows = []
    for name, r in results.items():
        red = r.reductions
        # the decode cache keeps keys at width r_max (a dynamic method may need any bucket later); a static rank
        # only needs its own width
        cache_rank = None if name == "full" else (int(round(r.mean_rank)) if name.startswith("static") else d)
        t = timing.get(name, {"attn_time_ratio": 1.0, "decode_time_ratio": 1.0})
        rows.append(
            {
                "method": name,
                "ppl": r.ppl,
                "ppl_ratio": r.ppl / full_ppl,
                "mean_rank": r.mean_rank if name != "full" else float(d),
                "score_flops_reduction": red["score_flops_reduction"],
                "attn_flops_reduction": red["attention_flops_reduction"],
                "attn_time_ratio": t["attn_time_ratio"],
                "decode_time_ratio": t["decode_time_ratio"],
                "cache_bytes_ratio": cache_bytes_per_token(model, cache_rank) / full_cache,
                "policy_train_seconds": r.train_seconds,
            }
        )
    return rows
