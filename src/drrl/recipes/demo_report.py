"""The demo's report: the table, report.md, and the Pareto and rank plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from drrl.utils import atomic_path


def render_table(rows: list[dict]) -> str:
    head = (
        "| method | ppl | Δ ppl % | mean rank | score-FLOPs red. planned | executed | attn-FLOPs red. | attn time × "
        "| decode time × | cache bytes × |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['method']} | {r['ppl']:.2f} | {100 * (r['ppl_ratio'] - 1):+.1f} | {r['mean_rank']:.1f} "
        f"| {100 * r.get('planned_score_flops_reduction', r['score_flops_reduction']):.1f}% "
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
DR-RL policies: {c["policy_steps"]} PPO updates each (language model frozen) on training windows disjoint from the
calibration's, reward fidelity {", ".join(c["fidelities"])}, α={c["alpha"]}, γ={c["gamma"]} (0 for fisher: the
bound is a proxy of the error the Fisher term measures). {_sweep(rep)}
Machine: {rep["machine"]}; the whole job took {rep["seconds"]:.0f} s.

{render_table(rep["rows"])}
- FLOPs are counted by `drrl.flops` for the attention layers only (scores, softmax, PV, rank-r maps, Grams and
  statistics, the policy); "score" counts Q·Kᵀ alone: "planned" at the ranks decided, "executed" at the widths the
  products run at (each segment runs at its own rank, so the two agree; the CPU kernel's zero padding of narrow
  q/k to d_head is not counted in either). Times are the attention layers on one window's captured
  queries/keys/values (prefill) and one decode step per layer against the window's cache, as ratios to full
  attention (SDPA; for decode the same kernel on full-width keys), median of {c["timing_repeats"]} interleaved repeats.
- Cache bytes: keys at width r once per KV head plus full-width values. Dynamic methods keep r_max columns.
- Input adaptivity (the share of (layer, segment) cells whose rank differs between evaluation windows; 0 is a
  fixed table): {_adaptivity(rep)}. `drrl-frozen…` replays its policy's mean rank per cell, rounded to the nearest
  bucket, as a fixed table (the ablation: what the policy's input-dependence buys). What the policies read
  (greedy decisions that change when a state-feature group is replaced by its mean over the windows at the same
  layer and segment): {_feature_use(rep)}.
- Planning (state features, policy forward, rank bookkeeping) took {100 * po["plan_fraction"]:.1f}% of the model's
  forward time during the `{po.get("method", "drrl")}` evaluation (policy forward alone {100 * po["controller_fraction"]:.1f}%).

{_budgets(rep)}
{_comparisons(rep)}
![pareto](pareto.png)

![ranks](ranks.png)
"""


def _sweep(rep: dict) -> str:
    c = rep["config"]
    parts = []
    if c["betas"]:
        parts.append(f"β sweep {list(c['betas'])}: `drrl` is β={c['betas'][0]}, `static` the bucket nearest its mean "
                     f"rank ({rep['matched_static_rank']}).")  # fmt: skip
    if c["taus"]:
        parts.append(f"`energy` is the energy rule at τ={c['taus'][0]}.")
    if c["budgets"]:
        parts.append(f"Budgets (score-FLOPs cuts): {', '.join(f'{100 * b:g}%' for b in c['budgets'])}, each "
                     f"policy's cost multiplier starting at {c['lagrange_init']}.")  # fmt: skip
    return " ".join(parts)


def _budgets(rep: dict) -> str:
    """The budget rows' settings: the loss search behind alloc@B, each policy's multiplier and cost shift."""
    info = rep.get("budgets") or {}
    if not info:
        return ""
    sens = info["sensitivity"]
    lines = [
        f"Budgets: `alloc@B` is a rank per layer from ranks {sens['ranks']}, chosen by an exact knapsack on each "
        f"layer's measured loss at each rank ({sens['forwards']} forward passes, {sens['seconds']:.0f} s); "
        "`static@B` the largest uniform bucket within the budget; `drrl@B` a policy trained with a Lagrange "
        "multiplier λ on its score FLOPs, then greedy with a cost shift tuned on training windows (tune_windows); "
        "`drrl-frozen@B` its mean ranks as a table; `energy@B` the energy rule at the largest τ that meets the "
        "budget on those windows; `random@B` random ranks whose expectation is the budget's rank."
    ]
    if cells := info.get("cell_errors"):
        lines[0] += (
            " `alloc-cells@B` is a rank per (layer, segment) cell, the least summed KL under the budget, with each "
            "cell's KL at every bucket estimated from the layers' output Fisher (the fisher reward's signal) in "
            f"{cells['forwards']} forward passes ({cells['seconds']:.0f} s); `alloc-heads@B` the same with a rank "
            "per (layer, segment, key/value head) cell, from the same passes (the estimate is additive over heads)."
        )
    for tag, b in info.items():
        if tag in ("sensitivity", "cell_errors"):
            continue
        lines.append(f"- {tag}: allocation {b['allocation']}, uniform {b['uniform_rank']}, energy τ = "
                     f"{b['energy_tau']:.6g} (executed fraction {b['energy_tuned_fraction']:.3f} on the tuning "
                     f"windows), random mean rank {b['random_mean_rank']:.1f}")  # fmt: skip
        for name, p in b["policies"].items():
            lines.append(
                f"  - `{name}`: λ = {p['lagrange']:.3g}, cost shift {p['cost_shift']:.3g} (executed fraction "
                f"{p['tuned_fraction']:.3f} on the tuning windows)"
            )
    return "\n".join(lines) + "\n"


def _comparisons(rep: dict) -> str:
    """DR-RL's perplexity over each reference's, with the paired bootstrap interval over windows."""
    rows = rep.get("comparisons") or []
    if not rows:
        return ""
    lines = [
        "Perplexity of DR-RL over each method's on the same windows (below 1: DR-RL better), with a paired "
        f"bootstrap {100 * rows[0]['level']:g}% interval over the {rows[0]['windows']} windows "
        f"({rows[0]['resamples']} resamples); an interval that holds 1 is no evidence either way.\n",
        "| DR-RL | against | ppl ratio | interval |",
        "|---|---|---:|---|",
    ]
    lines += [f"| {r['method']} | {r['reference']} | {r['ratio']:.4f} | [{r['low']:.4f}, {r['high']:.4f}] |"
              for r in rows]  # fmt: skip
    return "\n".join(lines) + "\n"


def _feature_use(rep: dict) -> str:
    parts = []
    for name, use in rep.get("feature_use", {}).items():
        groups = ", ".join(f"{k} {100 * v:.1f}%" for k, v in use.items() if k != "replayed")
        parts.append(f"`{name}` {groups}")
    return "; ".join(parts) or "not measured (one window)"


def _adaptivity(rep: dict) -> str:
    items = [(n, a) for n, a in rep.get("input_adaptivity", {}).items() if n.startswith("drrl") or n == "energy"]
    return ", ".join(f"`{n}` {100 * a:.1f}%" for n, a in items) or "not measured (one window)"


def plots(rep: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["method"]: r for r in rep["rows"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    groups = [
        ("static", "s-", "static rank"),
        ("energy", "^-", "energy rule"),
        ("drrl", "o-", "DR-RL"),
        ("alloc@", "d-", "static per-layer allocation"),
        ("alloc-cells", "v-", "static per-cell allocation"),
        ("alloc-heads", "<-", "static per-cell, per-KV-head allocation"),
    ]
    for ax, key, what in zip(axes, ("score_flops_reduction", "attn_flops_reduction"),
                             ("score (Q·Kᵀ) FLOPs", "attention FLOPs, every overhead counted"), strict=True):  # fmt: skip
        for prefix, style, label in groups:
            pts = sorted(
                (1 - r[key], r["ppl"])
                for n, r in rows.items()
                if n.startswith(prefix) and not n.startswith("drrl-frozen")
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label)
        for n, marker in (("random", "x"), ("full", "*"), ("drrl-frozen", "D")):
            if n in rows:
                ax.plot(1 - rows[n][key], rows[n]["ppl"], marker, ms=10 if marker != "D" else 6, label=n)
        for n, r in rows.items():
            if n.startswith("drrl") and not n.startswith("drrl-frozen"):
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

    name = "drrl" if "drrl" in rep["rank_grids"] else next((n for n in rep["rank_grids"] if n.startswith("drrl@")), "")
    grid = rep["rank_grids"].get(name)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if grid:
        im = ax.imshow(np.array(grid), aspect="auto", cmap="viridis", origin="lower")
        fig.colorbar(im, ax=ax, label="mean executed rank")
    ax.set_xlabel(f"segment ({rep['config']['segment']} tokens)")
    ax.set_ylabel("layer")
    ax.set_title(f"{name or 'DR-RL'}: rank per layer and segment (evaluation windows)")
    fig.tight_layout()
    with atomic_path(out / "ranks.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
