"""The main job: DR-RL against full attention and rank heuristics on a pretrained LLM (``drrl demo``).

On the embedded SmolLM2-135M (or any supported Hugging Face model) and held-out Shakespeare plays (or any
corpus of the data layer), at a context of 1024 tokens:

1. ``full``: the model's own attention; perplexity on evenly spread test windows.
2. DR-RL attention is swapped in (:func:`drrl.integrations.hf.apply_dynamic_rank`) with calibrated post-RoPE
   bases fitted on training windows; one calibration serves every method below.
3. ``drrl`` and ``drrl-beta=<β>``: a rank policy per β trained with PPO in ``policy`` mode (the language model
   frozen) on training windows (disjoint from the calibration windows), evaluated greedily; ``drrl-frozen`` its
   mean ranks replayed as a fixed table. Other reward fidelities add ``-<fidelity>``.
4. ``static`` (fixed rank, matched to DR-RL's mean rank, and neighbours for the curve), ``random`` and
   ``energy`` (threshold rule at a few τ).
5. With budgets, every method at each cut: ``drrl@B`` (trained with a Lagrange multiplier, then a cost shift tuned
   to meet the budget), ``drrl-frozen@B``, ``alloc@B`` (a rank per layer searched against the loss),
   ``alloc-cells@B`` (a rank per layer and segment from the output Fisher's KL estimates), ``alloc-heads@B``
   (the same per key/value head), ``static@B``,
   ``energy@B`` and ``random@B``. The default reward is ``fisher``: each decision's own KL estimate.
   Measuring and fitting one method lives in :mod:`.demo_methods`.
6. Time (:mod:`.demo_timing`): each method's attention layers on one window's captured queries, keys and values against SDPA,
   interleaved, median of repeats; one decode step of every layer against a full-width cache.

Writes ``report.md``, ``results.json``, ``pareto.png`` and ``ranks.png`` into the output folder.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from drrl.attention.drrl import calibrating
from drrl.controllers import TableController, attach_controller, build_controller
from drrl.data.tokenizer import get_tokenizer
from drrl.data.tokens import load_tokens, spread_windows
from drrl.errors import ConfigError, DataError
from drrl.eval.allocation import cell_allocation, layer_sensitivity, static_allocation
from drrl.eval.bootstrap import ppl_ratio_ci
from drrl.eval.machine import machine
from drrl.integrations.hf import _geometry, apply_dynamic_rank, cache_bytes_per_token
from drrl.integrations.hub import EMBEDDED_MODEL, load_causal_lm
from drrl.progress import progress
from drrl.recipes.demo_methods import (
    MethodResult,
    fit_cell_errors,
    fit_output_fisher,
    meet_budget,
    nearest_buckets,
    perplexity,
    train_policy,
    tune_energy,
)
from drrl.recipes.demo_report import plots, render_report, render_table
from drrl.recipes.demo_timing import capture_qkv, time_methods
from drrl.rl.reward import FIDELITIES
from drrl.utils import check_out_dir, resolve_device, write_json_atomic, write_text_atomic

__all__ = ["DemoConfig", "MethodResult", "render_report", "render_table", "run_demo"]

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Settings of ``drrl demo`` (defaults: about 9 minutes on 2 CPU cores)."""

    model: str | None = None  # None: the embedded SmolLM2-135M
    trust_remote_code: bool = False  # let a hub model run its own Python code (only for models you trust)
    corpus: str = "shakespeare"
    context: int = 1024
    segment: int = 128
    bucket: int = 8
    eval_windows: int = 6
    calib_windows: int = 6
    policy_steps: int = 12  # PPO updates per policy (one training window each)
    policy_lr: float = 3e-3
    discount: float = 0.0  # a decision's reward is its own segment's: a contextual bandit (GAE with γ = 0)
    # budgets (score-FLOPs cuts in (0, 1)), the default comparison: per budget, DR-RL trained to meet it (``drrl@B``:
    # a Lagrange multiplier on its cost, then an inference-time cost shift tuned on a training window), its frozen
    # table, the static per-layer allocation searched against the loss (``alloc@B``), the uniform static rank, the
    # energy rule at the τ that meets it and random ranks with its mean, all at that cut
    budgets: tuple[float, ...] = (0.4,)
    lagrange_init: float = 0.5  # the budget policies' initial multiplier of the cost
    sensitivity_windows: int = 1  # calibration windows the per-layer loss search (alloc@B) and the Fisher run on
    tune_windows: int = 1  # policy-training windows the cost shift and the energy rule's τ are tuned on
    # a β sweep (off by default): one policy per fixed cost weight β, the first named "drrl" (with its frozen table,
    # the static rank nearest its mean rank and random ranks); 0.05, the paper's β, kept full rank in earlier runs
    betas: tuple[float, ...] = ()
    static_ranks: tuple[int, ...] = ()  # extra uniform static ranks (a curve for the plot)
    alpha: float = 1.0
    gamma: float = 0.1
    taus: tuple[float, ...] = ()  # extra energy-rule thresholds (a curve for the plot)
    timing_repeats: int = 3
    seed: int = 0
    device: str = "cpu"
    # the reward fidelities (drrl.rl.reward): "fisher" (each decision's KL estimate from the output Fisher), "cosine"
    # or "kl" (one model-level KL per segment, shared by the layers); the first names drrl@B and drrl, the others
    # add "-<fidelity>" (the budgets and the first β), so the rewards compare in one table (BENCHMARKS.md)
    fidelities: tuple[str, ...] = ("fisher",)

    def __post_init__(self):
        for name in ("context", "segment", "bucket", "eval_windows", "calib_windows", "timing_repeats"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"demo {name} must be a positive integer, got {getattr(self, name)}")
        if self.policy_steps < 0:
            raise ConfigError(f"demo policy_steps must be >= 0, got {self.policy_steps}")
        if not self.betas and not self.budgets:
            raise ConfigError("demo needs a budget or a β to train a policy for (e.g. --budgets 0.4 or --betas 0.5)")
        if not (math.isfinite(self.lagrange_init) and self.lagrange_init >= 0):
            raise ConfigError(f"demo lagrange_init must be finite and >= 0, got {self.lagrange_init}")
        if any(not 0 < b < 1 for b in self.budgets):
            raise ConfigError(f"budgets are score-FLOPs cuts in (0, 1), got {self.budgets}")
        fids = self.fidelities
        if not fids or any(f not in FIDELITIES for f in fids) or len(set(fids)) < len(fids):
            raise ConfigError(f"demo fidelities must be distinct, from {', '.join(FIDELITIES)}; got {fids}")
        if self.tune_windows < 1:
            raise ConfigError(f"demo tune_windows must be >= 1, got {self.tune_windows}")
        if self.sensitivity_windows < 1:
            raise ConfigError(f"demo sensitivity_windows must be >= 1, got {self.sensitivity_windows}")
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
    calib_w, policy_w = protocol_windows(train, cfg.calib_windows, max(cfg.policy_steps, 1), L)

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
    fisher_info = None
    if "fisher" in cfg.fidelities or cfg.budgets:  # each layer's output Fisher: the fisher reward and alloc-cells@B
        fisher_info = fit_output_fisher(model, layers, calib_w[: cfg.sensitivity_windows], cfg.seed, quiet)

    setups, matched = _evaluate_methods(model, layers, results, eval_w, policy_w, cfg, quiet)
    budget_info = _budget_methods(model, layers, results, setups, eval_w, policy_w, calib_w, cfg, quiet)
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
        "policy_overhead": {"method": first_policy(results), **_policy_overhead(results[first_policy(results)])},
        "budgets": budget_info,
        "output_fisher": fisher_info,  # the Fisher reward's one-off cost: forward-backward passes and seconds
        # DR-RL's perplexity over each same-budget method's (and its frozen table's), bootstrap 95% over windows
        "comparisons": comparisons(results, cfg),
        "seconds": time.perf_counter() - t_start,
        "rows": rows,
        "rank_grids": {n: r.rank_grid for n, r in results.items() if r.rank_grid is not None},
        # fraction of (layer, segment) cells whose rank differs between evaluation windows
        "input_adaptivity": {n: r.adaptivity for n, r in results.items() if r.adaptivity is not None},
        # per learned policy: greedy decisions that change when a state-feature group is replaced by its mean
        # over the evaluation windows at the same (layer, segment)
        "feature_use": {n: r.feature_use for n, r in results.items() if r.feature_use},
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
    # DR-RL: one policy per β (the first fidelity); the other fidelities with the first β
    for f_i, fid in enumerate(cfg.fidelities):
        suffix = "" if f_i == 0 else f"-{fid}"
        for i, beta in enumerate(cfg.betas if f_i == 0 else cfg.betas[:1]):
            name = method_name(i, beta) + suffix
            ctrl, secs, history = train_policy(model, layers, policy_w, cfg, beta, quiet, fidelity=fid)
            setups[name] = install(lambda ctrl=ctrl: ctrl)
            setups[name]()
            res = perplexity(model, eval_w, layers, desc=name, quiet=quiet)
            res.train_seconds, res.policy_updates = secs, ctrl.updates
            res.reward_history = history
            results[name] = res
            if i == 0:  # the ablation "frozen": the policy's mean rank per (layer, segment) replayed as a table
                table, frozen = nearest_buckets(res.rank_grid, buckets), "drrl-frozen" + suffix
                setups[frozen] = install(lambda table=table: TableController(table))
                setups[frozen]()
                results[frozen] = perplexity(model, eval_w, layers, desc=frozen, quiet=quiet)
    # the heuristics: with a β sweep, the static rank nearest drrl's mean rank and random ranks; the extra curves
    matched = None
    if "drrl" in results:
        drrl_rank = results["drrl"].mean_rank
        matched = min(buckets, key=lambda b: (abs(b - drrl_rank), -b))
    static_ranks = sorted({b for b in cfg.static_ranks if b in buckets and b != buckets[-1]} | {matched} - {None})
    for r in static_ranks:
        name = "static" if r == matched else f"static-r={r}"
        setups[name] = install(lambda r=r: build_controller("fixed", rank=r))
        setups[name]()
        results[name] = perplexity(model, eval_w, layers, desc=name, quiet=quiet)
    if cfg.betas:
        setups["random"] = install(lambda: build_controller("random", seed=cfg.seed))
        setups["random"]()
        results["random"] = perplexity(model, eval_w, layers, desc="random", quiet=quiet)
    for i, tau in enumerate(cfg.taus):
        name = "energy" if i == 0 else f"energy-tau={tau:g}"
        setups[name] = install(lambda tau=tau: build_controller("energy", tau=tau))
        setups[name]()
        results[name] = perplexity(model, eval_w, layers, desc=name, quiet=quiet)

    return setups, matched


def protocol_windows(train, n_calib: int, n_policy: int, length: int):
    """Calibration windows from the first half of the training split and policy-training windows from the second:
    disjoint, whatever the corpus size (evaluation reads the test split). Each set is evenly spread over its half."""
    half = len(train) // 2
    if half < length:
        raise DataError(
            f"the training split has {len(train)} tokens: calibration and policy training need two disjoint halves "
            f"of at least one window ({length} tokens) each; lower --context or use a larger corpus"
        )
    return spread_windows(train[:half], n_calib, length), spread_windows(train[half:], n_policy, length)


def _budget_methods(model, layers, results: dict, setups: dict, eval_w, policy_w, calib_w, cfg: DemoConfig, quiet):
    """Every method at each budget of ``cfg.budgets`` (see :class:`DemoConfig`), evaluated into ``results``; returns
    what each budget's methods were given (the shift, the allocation, the search's cost)."""
    if not cfg.budgets:
        return {}
    buckets = layers[0].buckets.tolist()
    r_max, device = buckets[-1], next(model.parameters()).device
    # the loss of each layer alone at every other bucket from r_max down to r_max / 2, on calibration windows (a
    # rank below half rarely pays for its loss at cuts up to 50%; the search is the job's largest cost)
    top = sorted(buckets[::-1][::2])
    cand = buckets if len(buckets) <= 2 else [r for r in top if r >= r_max / 2]
    sens_w = [w.to(device) for w in calib_w[: cfg.sensitivity_windows]]
    bar = progress(total=1 + len(layers) * (len(cand) - 1), desc="layer sensitivity", unit="fwd", disable=quiet,
                   leave=False)  # fmt: skip
    t0 = time.perf_counter()
    sens = layer_sensitivity(model, layers, sens_w, cand, device=device, on_step=lambda: bar.update(1))
    bar.close()
    info = {"sensitivity": {"ranks": sens.ranks, "loss": sens.loss, "base": sens.base, "forwards": sens.forwards,
                            "seconds": time.perf_counter() - t0}}  # fmt: skip
    cells, info["cell_errors"] = fit_cell_errors(model, layers, sens_w, quiet)  # for a static table per cell
    tune_w = policy_w[: cfg.tune_windows]
    for b in cfg.budgets:
        tag = f"@{100 * b:g}%"
        uniform = max([r for r in buckets if r <= (1 - b) * r_max + 1e-9] or buckets[:1])  # the budget's bucket
        alloc = static_allocation(sens, b)
        tables = {"alloc" + tag: alloc, "alloc-cells" + tag: cell_allocation(cells, b),
                  "alloc-heads" + tag: cell_allocation(cells, b, per_head=True),
                  "static" + tag: [[uniform]] * len(layers)}  # fmt: skip
        info[tag] = {"budget": b, "allocation": [row[0] for row in alloc], "uniform_rank": uniform, "policies": {}}
        for f_i, fid in enumerate(cfg.fidelities):
            name = "drrl" + ("" if f_i == 0 else f"-{fid}") + tag
            ctrl, secs, history = train_policy(model, layers, policy_w, cfg, cfg.lagrange_init, quiet, budget=b,
                                               fidelity=fid)  # fmt: skip
            ctrl.eval()
            shift, tuned = meet_budget(ctrl, model, layers, tune_w, b)
            setups[name] = lambda ctrl=ctrl: attach_controller(layers, ctrl)
            setups[name]()
            res = perplexity(model, eval_w, layers, desc=name, quiet=quiet)
            res.train_seconds, res.policy_updates, res.reward_history = secs, ctrl.updates, history
            results[name] = res
            tables[name.replace("drrl", "drrl-frozen", 1)] = nearest_buckets(res.rank_grid, buckets)
            info[tag]["policies"][name] = {"lagrange": ctrl.lagrange, "cost_shift": shift, "tuned_fraction": tuned}
        for name, table in tables.items():
            setups[name] = lambda table=table: attach_controller(layers, TableController(table))
            setups[name]()
            results[name] = perplexity(model, eval_w, layers, desc=name, quiet=quiet)
        # the heuristics at the same cut: the energy rule at the τ that meets it on the tuning windows, and random
        # ranks whose expectation is the budget's rank
        tau, tuned = tune_energy(model, layers, tune_w, b)
        setups["energy" + tag] = lambda tau=tau: attach_controller(layers, build_controller("energy", tau=tau))
        setups["random" + tag] = lambda b=b: attach_controller(
            layers, build_controller("random", seed=cfg.seed, mean_rank=(1 - b) * r_max)
        )
        info[tag].update(energy_tau=tau, energy_tuned_fraction=tuned, random_mean_rank=(1 - b) * r_max)
        for name in ("energy" + tag, "random" + tag):
            setups[name]()
            results[name] = perplexity(model, eval_w, layers, desc=name, quiet=quiet)
    return info


def comparisons(results: dict[str, MethodResult], cfg: DemoConfig) -> list[dict]:
    """DR-RL against each method at the same budget (and the β-sweep's ``drrl`` against its frozen table): the
    perplexity ratio with a paired bootstrap 95% interval over the evaluation windows (below 1: DR-RL better)."""
    pairs = [("drrl", "drrl-frozen")] if "drrl-frozen" in results else []
    for b in cfg.budgets:
        tag = f"@{100 * b:g}%"
        ours = "drrl" + tag
        pairs += [(ours, n) for n in results if n.endswith(tag) and n != ours]
    rows = []
    for a, ref in pairs:
        ra, rb = results[a], results[ref]
        if len(ra.window_nll) != len(rb.window_nll) or not ra.window_nll:
            continue
        ci = ppl_ratio_ci(ra.window_nll, rb.window_nll, ra.window_tokens, seed=cfg.seed)
        rows.append({"method": a, "reference": ref, **ci.as_dict()})
    return rows


def first_policy(results: dict) -> str:
    """The demo's headline learned method: ``drrl`` of a β sweep, else the first budget's ``drrl@B``."""
    return "drrl" if "drrl" in results else next(n for n in results if n.startswith("drrl@"))


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
        # the decode cache keeps keys at width r_max (a dynamic method may need any bucket later); a static table
        # only needs each layer's widest rank
        static = name.startswith(("static", "alloc")) and r.rank_grid is not None
        cache_rank = None if name == "full" else ({i: round(max(row)) for i, row in enumerate(r.rank_grid)}
                                                  if static else d)  # fmt: skip
        t = timing.get(name, {"attn_time_ratio": 1.0, "decode_time_ratio": 1.0})
        rows.append(
            {
                "method": name,
                "ppl": r.ppl,
                "ppl_ratio": r.ppl / full_ppl,
                "mean_rank": r.mean_rank if name != "full" else float(d),
                "planned_score_flops_reduction": red["planned_score_flops_reduction"],
                "score_flops_reduction": red["score_flops_reduction"],
                "attn_flops_reduction": red["attention_flops_reduction"],
                "attn_time_ratio": t["attn_time_ratio"],
                "decode_time_ratio": t["decode_time_ratio"],
                "cache_bytes_ratio": cache_bytes_per_token(model, cache_rank) / full_cache,
                "policy_train_seconds": r.train_seconds,
            }
        )
    return rows
