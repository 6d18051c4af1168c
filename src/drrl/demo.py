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
5. Time: each method's attention layers on one window's captured queries, keys and values against SDPA,
   interleaved, median of repeats; one decode step of every layer against a full-width cache.

Writes ``report.md``, ``results.json``, ``pareto.png`` and ``ranks.png`` into the output folder.
"""

from __future__ import annotations

import logging
import math
import platform
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from drrl import flops
from drrl.attention.drrl import LowRankKVCache, calibrating
from drrl.attention.full import grouped_sdpa
from drrl.data.tokenizer import get_tokenizer
from drrl.data.tokens import load_tokens, spread_windows
from drrl.errors import ConfigError
from drrl.integrations.hf import (
    EMBEDDED_MODEL,
    apply_dynamic_rank,
    cache_bytes_per_token,
    load_causal_lm,
)
from drrl.rl.controllers import RLController, build_controller
from drrl.rl.policy import EpsilonSchedule, RankPolicy
from drrl.rl.ppo import PPO, PPOConfig
from drrl.rl.reward import RewardConfig
from drrl.utils import atomic_path, check_out_dir, resolve_device, write_json_atomic, write_text_atomic

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


# ------------------------------------------------------------------------------------------ data


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


@torch.no_grad()
def perplexity(model, windows, layers=(), desc: str = "eval", quiet: bool = False) -> MethodResult:
    """Perplexity over ``windows`` (batch 1), with the executed ranks and FLOPs of the drrl ``layers``."""
    device = next(model.parameters()).device
    nll, n_tok, fwd_s = 0.0, 0, 0.0
    grid = None
    for m in layers:
        m.pop_stats()
    bar = tqdm(windows, desc=desc, unit="win", disable=quiet, leave=False)
    for w in bar:
        ids = w.to(device)[None]
        t0 = time.perf_counter()
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        fwd_s += time.perf_counter() - t0
        nll += F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="sum").item()
        n_tok += ids.shape[1] - 1
        bar.set_postfix(tok_s=f"{n_tok / fwd_s:.0f}")
        if layers:
            g = np.array([m.last_plan.ranks for m in layers], dtype=float)
            grid = g if grid is None else grid + g
    mean_rank, fl, full, plan_s, ctrl_s = _layer_stats(layers)
    return MethodResult(
        desc, math.exp(nll / n_tok), mean_rank, dict(fl), dict(full), plan_s, ctrl_s, fwd_s,
        None if grid is None else (grid / len(windows)).tolist(),
    )  # fmt: skip


def train_policy(model, layers, windows, cfg: DemoConfig, beta: float, quiet: bool = False):
    """Fit a fresh rank policy for reward weight β with PPO on ``windows``, the LM frozen (``policy`` mode)."""
    nb = len(layers[0].buckets)
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    ctrl = RLController(RankPolicy(RLController.n_features(nb), nb, len(layers)), seed=cfg.seed).to(device)
    ctrl.reward_cfg = RewardConfig(cfg.alpha, beta, cfg.gamma)
    ctrl.epsilon = EpsilonSchedule(0.2, 0.0, max(cfg.policy_steps, 1))
    for m in layers:
        m.set_controller(ctrl)
    ppo = PPO(ctrl.policy, PPOConfig(lr=cfg.policy_lr, discount=cfg.discount, gae_lambda=0.95 if cfg.discount else 0.0))
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.policy_steps), desc=f"policy β={beta:g}", unit="step", disable=quiet, leave=False)
    history = []
    for step in bar:
        ctrl.train()
        ctrl.begin()
        ids = windows[step % len(windows)].to(device)[None]
        with torch.no_grad():
            model(input_ids=ids[:, :-1], use_cache=False)
        episodes = ctrl.collect()
        stats = ppo.update(episodes)
        ctrl.updates += 1
        mean_r = float(torch.cat([e.rewards for e in episodes]).mean()) if episodes else float("nan")
        history.append(mean_r)
        bar.set_postfix(reward=f"{mean_r:.4f}", tok_s=f"{(step + 1) * ids.shape[1] / (time.perf_counter() - t0):.0f}")
        for m in layers:
            m.pop_stats()
        log.debug("policy β=%g step %d: %s", beta, step, stats)
    ctrl.eval()
    return ctrl, time.perf_counter() - t0, history


# ------------------------------------------------------------------------------------------ timing


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def capture_qkv(model, layers, window) -> list[tuple]:
    """Post-RoPE (q, k, v) of every layer on one window (full-rank pass through the drrl hook)."""
    store, originals = [], []
    for m in layers:
        orig = m.attend
        originals.append(orig)
        m.attend = lambda q, k, v, orig=orig: (store.append((q.clone(), k.clone(), v.clone())), orig(q, k, v))[1]
    try:
        model(input_ids=window[None, :-1].to(next(model.parameters()).device), use_cache=False)
    finally:
        for m in layers:
            del m.attend  # back to the class method
    for m in layers:
        m.pop_stats()
    return store


@torch.no_grad()
def time_methods(layers, qkv, setups: dict, repeats: int) -> dict:
    """Attention-layer prefill time and one decode step per method, relative to full attention.

    ``setups`` maps a method to a callable installing its controllers on ``layers``. Each repeat runs every
    method once over all layers (interleaved so machine noise hits all), after one warm-up round. Returns
    {method: {"attn_time_ratio", "decode_time_ratio", "attn_ms", "decode_ms"}}.
    """
    d = qkv[0][0].shape[-1]
    scale = 1 / math.sqrt(d)
    # decode: keys of the window in each layer's cache, one new query per layer
    full_caches, queries = [], []
    for q, k, v in qkv:
        c = LowRankKVCache(1, k.shape[1], k.shape[2], d, d, k.dtype, k.device)
        c.append(k * scale, v)
        full_caches.append(c)
        queries.append(q[:, :, -1:])

    def run_full():
        for q, k, v in qkv:
            grouped_sdpa(q, k, v, causal=True)

    def run_full_decode():
        for c, q in zip(full_caches, queries, strict=True):
            c.attend(q, d)

    def runner(name):
        def prefill():
            setups[name]()
            for m, (q, k, v) in zip(layers, qkv, strict=True):
                m.attend(q, k, v)

        return prefill

    # each method's decode: its caches hold keys in the calibrated basis, read at the rank of the last segment
    decode = {}
    for name in setups:
        setups[name]()
        ranks = []
        for m, (q, k, v) in zip(layers, qkv, strict=True):
            m.attend(q, k, v)
            ranks.append(m.last_plan.ranks[-1])
        caches = []
        for m, (_q, k, v) in zip(layers, qkv, strict=True):
            c = m.new_cache(1, k.shape[2], dtype=k.dtype, device=k.device)
            m.append_to_cache(c, k, v)
            caches.append(c)
        decode[name] = (
            lambda caches=caches, ranks=ranks: [
                m.decode_step(q, c, r) for m, c, q, r in zip(layers, caches, queries, ranks, strict=True)
            ]
        )  # fmt: skip
    fns = {"full": (run_full, run_full_decode)} | {n: (runner(n), decode[n]) for n in setups}
    for pre, dec in fns.values():  # warm-up
        pre(), dec()
    times = {n: ([], []) for n in fns}
    for _ in range(repeats):
        for n, (pre, dec) in fns.items():
            times[n][0].append(_median_time(pre, 1))
            times[n][1].append(_median_time(dec, 25))  # a decode step is ~50 µs per layer: many calls
    for m in layers:
        m.pop_stats()
    base_p, base_d = statistics.median(times["full"][0]), statistics.median(times["full"][1])
    out = {}
    for n, (tp, td) in times.items():
        p, dd = statistics.median(tp), statistics.median(td)
        out[n] = {
            "attn_time_ratio": p / base_p,
            "decode_time_ratio": dd / base_d,
            "attn_ms": 1e3 * p,
            "decode_ms": 1e3 * dd,
        }
    return out


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
        for w in tqdm(calib_w, desc="calibrate", unit="win", disable=quiet, leave=False):
            model(input_ids=w[None, :-1].to(device), use_cache=False)
    n_cal = sum(bool(m.calibrated) for m in layers)
    if n_cal < len(layers):
        log.warning("%d of %d layers failed to calibrate and run at full rank", len(layers) - n_cal, len(layers))
    buckets = layers[0].buckets.tolist()

    def install(ctrl_factory):
        def setup():
            ctrl = ctrl_factory()
            for m in layers:
                m.set_controller(ctrl)

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

    for m in layers:  # capture the queries, keys and values of a full-rank pass
        m.set_controller(build_controller("fixed", rank=buckets[-1]))
    qkv = capture_qkv(model, layers, eval_w[0])
    timing = time_methods(layers, qkv, setups, cfg.timing_repeats)
    rows = _rows(results, timing, model, cfg)
    report = {
        "config": asdict(cfg),
        "model": path if cfg.model else EMBEDDED_MODEL,
        "machine": _machine(device),
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
    _plots(report, out)
    write_json_atomic(out / "results.json", report)
    write_text_atomic(out / "report.md", render_report(report))
    return report


def _r_max(model) -> int:
    from drrl.integrations.hf import _geometry

    return _geometry(model)[3]


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


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


# ------------------------------------------------------------------------------------------ report


def render_table(rows: list[dict]) -> str:
    head = (
        "| method | ppl | Δ ppl % | mean rank | score-FLOPs red. | attn-FLOPs red. | attn time × | decode time × "
        "| cache bytes × |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['method']} | {r['ppl']:.2f} | {100 * (r['ppl_ratio'] - 1):+.1f} | {r['mean_rank']:.1f} "
        f"| {100 * r['score_flops_reduction']:.1f}% | {100 * r['attn_flops_reduction']:.1f}% "
        f"| {r['attn_time_ratio']:.2f} | {r['decode_time_ratio']:.2f} | {r['cache_bytes_ratio']:.2f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def render_report(rep: dict) -> str:
    c = rep["config"]
    po = rep["policy_overhead"]
    return f"""# drrl demo: dynamic low-rank attention on {rep["model"]}

Corpus `{c["corpus"]}` (test split), {c["eval_windows"]} evenly spread windows of {c["context"]} tokens; calibration
on {c["calib_windows"]} training windows; rank decisions every {c["segment"]} tokens per layer, buckets {rep["buckets"]}.
DR-RL policies: {c["policy_steps"]} PPO updates each (language model frozen), reward α={c["alpha"]}, γ={c["gamma"]},
β ∈ {list(c["betas"])} (`drrl` is β={c["betas"][0]}; `energy` is τ={c["taus"][0]}). `static` is the bucket nearest DR-RL's mean rank
({rep["matched_static_rank"]}). Machine: {rep["machine"]}; the whole job took {rep["seconds"]:.0f} s.

{render_table(rep["rows"])}
- FLOPs are counted by `drrl.flops` for the attention layers only (scores, softmax, PV, rank-r maps, Grams and
  statistics, the policy); "score" counts Q·Kᵀ alone. Times are the attention layers on one window's captured
  queries/keys/values (prefill) and one decode step per layer against the window's cache, as ratios to full
  attention (SDPA; for decode the same kernel on full-width keys), median of {c["timing_repeats"]} interleaved repeats.
- Cache bytes: keys at width r once per KV head plus full-width values. Dynamic methods keep r_max columns.
- Planning (state features, policy forward, rank bookkeeping) took {100 * po["plan_fraction"]:.1f}% of the model's
  forward time during the `drrl` evaluation (policy forward alone {100 * po["controller_fraction"]:.1f}%).

![pareto](pareto.png)

![ranks](ranks.png)
"""


def _plots(rep: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["method"]: r for r in rep["rows"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    groups = [("static", "s-", "static rank"), ("energy", "^-", "energy rule"), ("drrl", "o-", "DR-RL (β sweep)")]
    for ax, key, what in zip(axes, ("score_flops_reduction", "attn_flops_reduction"),
                             ("score (Q·Kᵀ) FLOPs", "attention FLOPs, every overhead counted"), strict=True):  # fmt: skip
        for prefix, style, label in groups:
            pts = sorted((1 - r[key], r["ppl"]) for n, r in rows.items() if n.startswith(prefix))
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label)
        for n in ("random", "full"):
            if n in rows:
                ax.plot(1 - rows[n][key], rows[n]["ppl"], "x" if n == "random" else "*", ms=10, label=n)
        for n, r in rows.items():
            if n.startswith("drrl"):
                ax.annotate(n.removeprefix("drrl-") if n != "drrl" else f"beta={rep['config']['betas'][0]:g}",
                            (1 - r[key], r["ppl"]), fontsize=7)  # fmt: skip
        ax.set_xlabel(f"{what} relative to full")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity")
    axes[0].legend()
    fig.suptitle(f"{rep['model']}: perplexity against FLOPs (lower left is better)")
    fig.tight_layout()
    with atomic_path(out / "pareto.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

    grid = rep["rank_grids"].get("drrl")
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if grid:
        im = ax.imshow(np.array(grid), aspect="auto", cmap="viridis", origin="lower")
        fig.colorbar(im, ax=ax, label="mean executed rank")
    ax.set_xlabel(f"segment ({rep['config']['segment']} tokens)")
    ax.set_ylabel("layer")
    ax.set_title("DR-RL rank per layer and segment (evaluation windows)")
    fig.tight_layout()
    with atomic_path(out / "ranks.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
