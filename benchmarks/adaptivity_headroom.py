"""How much an input-adaptive rank choice could gain over a static table, at most: per-window oracle tables against
the best static one, all chosen from the output Fisher's KL estimates at the same score-FLOPs budget.

    python benchmarks/adaptivity_headroom.py [--budget 0.4] [--context 1024] [--windows 6] [--json OUT]

Rows (perplexity over the held-out windows, each table at the budget):
  * ``static (calibration)``: the table from one calibration window (what ``alloc-cells@B`` of ``drrl demo`` runs);
  * ``static (test average)``: the table from the estimates averaged over the test windows themselves (the best
    static table, with knowledge of the test data);
  * ``oracle per window``: each test window run with the table from its own estimates. No causal policy can see
    a window's estimates before deciding, so this bounds what input adaptivity at window granularity can buy.
Calibration as in ``drrl demo`` (6 windows of the first half of the training split, the Fisher from the first).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from drrl.controllers import TableController, attach_controller
from drrl.eval.allocation import CellErrors, cell_allocation, fisher_errors, output_fisher
from drrl.eval.machine import machine
from drrl.recipes.demo_methods import add_llm_arguments, calibrated_llm
from drrl.utils import write_json_atomic


def _mean(errs: list[CellErrors]) -> CellErrors:
    """Cell estimates averaged over several measurements of the same shape."""
    first = errs[0]
    error = [
        [[sum(e.error[i][s][j] for e in errs) / len(errs) for j in range(len(first.ranks))] for s in range(len(row))]
        for i, row in enumerate(first.error)
    ]
    return CellErrors(first.ranks, error, first.pairs, sum(e.forwards for e in errs))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_llm_arguments(ap, calib_windows=6)
    ap.add_argument("--windows", type=int, default=6, help="held-out test windows")
    ap.add_argument("--budget", type=float, default=0.4, help="score-FLOPs cut")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    llm = calibrated_llm(args.model, corpus=args.corpus, context=args.context, calib_windows=args.calib_windows,
                         test_windows=args.windows, segment=args.segment, bucket=args.bucket)  # fmt: skip
    model, path, layers, cal, ev = llm.model, llm.path, llm.layers, llm.calib, llm.test
    output_fisher(model, layers, cal[:1])
    buckets = layers[0].buckets.tolist()
    per_window = [fisher_errors(model, layers, [w], buckets) for w in ev]
    tables = {
        "static (calibration)": [cell_allocation(fisher_errors(model, layers, cal[:1], buckets), args.budget)]
        * len(ev),
        "static (test average)": [cell_allocation(_mean(per_window), args.budget)] * len(ev),
        "oracle per window": [cell_allocation(e, args.budget) for e in per_window],
    }

    def nll(table, w) -> tuple[float, float]:
        """Summed next-token NLL of window ``w`` under ``table`` and its executed score-FLOPs fraction."""
        attach_controller(layers, TableController(table))
        for m in layers:
            m.pop_stats()
        with torch.no_grad():
            logits = model(input_ids=w[None, :-1], use_cache=False).logits.float()[0]
        fl = [m.pop_stats(with_flops=True)["flops"] for m in layers]
        frac = sum(f["scores"] for f in fl) / sum(f["full_scores"] for f in fl)
        return float(F.cross_entropy(logits, w[1:], reduction="sum")), frac

    full = sum(nll([[buckets[-1]]] * len(layers), w)[0] for w in ev)
    tokens = len(ev) * args.context
    rows = [{"method": "full", "ppl": math.exp(full / tokens), "score_fraction": 1.0, "estimated_kl": 0.0}]
    for name, tabs in tables.items():
        runs = [nll(t, w) for t, w in zip(tabs, ev, strict=True)]
        # the estimate each window's own measurement gives its table (Σ over layers of the mean over segments)
        est = sum(
            sum(e.error[i][s][e.ranks.index(t[i][s])] for i in range(len(t)) for s in range(len(t[i]))) / len(t[0])
            for t, e in zip(tabs, per_window, strict=True)
        ) / len(ev)
        rows.append({
            "method": name,
            "ppl": math.exp(sum(r[0] for r in runs) / tokens),
            "score_fraction": sum(r[1] for r in runs) / len(runs),
            "estimated_kl": est,
        })  # fmt: skip
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / rows[0]["ppl"]
    out = {"model": path, "machine": machine(torch.device("cpu")), "context": args.context, "budget": args.budget,
           "windows": len(ev), "rows": rows, "seconds": time.perf_counter() - t0}  # fmt: skip
    print("| table | ppl | Δ ppl | score-FLOPs fraction | estimated KL (nats/token) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['ppl']:.2f} | {100 * (r['ppl_ratio'] - 1):+.1f}% | {r['score_fraction']:.3f} "
              f"| {r['estimated_kl']:.4f} |")  # fmt: skip
    print(f"{out['seconds']:.0f} s")
    if args.json:
        write_json_atomic(args.json, out)
    return out


if __name__ == "__main__":
    main()
