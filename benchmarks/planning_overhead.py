"""What DR-RL's planning costs at run time: the per-segment statistics and the rank policy, as a share of the model's
forward time, on a calibrated SmolLM2 (the demo's setup) at one or more context lengths.

    python benchmarks/planning_overhead.py [--contexts 1024,4096] [--windows 2] [--json OUT]

Per context, on held-out windows, interleaved (median over windows):
  * ``drrl``: the rank policy (the demo's size; greedy; its weights do not change what planning costs) deciding every
    (layer, segment) from the segment statistics: forward time, and the layers' own clocks for planning (statistics
    and policy) and for the policy alone; ``plan fraction`` = planning / forward, what ``drrl demo`` reports;
  * ``table``: the same model with the policy's ranks on the first window as a fixed table (the same execution,
    no planning): forward time;
  * the policy's own passes over one forward's decision sequence, layer by layer: extending its cached keys and
    values (what the controller runs) against re-encoding the whole sequence at every layer (what it ran before),
    each timed with ``torch.utils.benchmark``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils import benchmark

from drrl.controllers import TableController, attach_controller
from drrl.eval.machine import machine
from drrl.recipes.demo_methods import add_llm_arguments, calibrated_llm
from drrl.rl.policy import PolicyCache
from drrl.utils import write_json_atomic


def _forward(model, layers, window) -> dict:
    for m in layers:
        m.pop_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=window[None, :-1], use_cache=False)
    seconds = time.perf_counter() - t0
    st = [m.pop_stats(with_flops=True) for m in layers]
    return {
        "seconds": seconds,
        "plan": sum(s["time"].get("plan", 0.0) for s in st),
        "controller": sum(s["time"].get("controller", 0.0) for s in st),
        "ranks": [m.last_plan.ranks for m in layers],
    }


def _policy_passes(ctrl, record: dict) -> dict:
    """Median seconds of the policy's passes over one recorded forward's decisions, layer by layer."""
    policy = ctrl.policy
    keys = ("feats", "layers", "segments", "prev", "allowed")
    rows = [record[k] for k in keys]
    bounds = torch.nonzero(torch.diff(record["layers"], prepend=record["layers"][:1] - 1)).flatten().tolist()
    bounds.append(len(record["layers"]))

    def extend():
        cache = PolicyCache()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            policy.extend(cache, *(t[a:b] for t in rows))

    def reencode():
        with torch.no_grad():
            for b in bounds[1:]:
                policy(*(t[:b] for t in rows))

    out = {}
    for name, fn in (("extend", extend), ("re-encode", reencode)):
        fn()  # warm-up
        out[name] = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median
    return out


def run(args, context: int) -> dict:
    llm = calibrated_llm(args.model, corpus=args.corpus, context=context, calib_windows=args.calib_windows,
                         test_windows=args.windows, segment=args.segment, bucket=args.bucket)  # fmt: skip
    model, layers = llm.model, llm.layers
    torch.manual_seed(0)
    ctrl = attach_controller(layers, "rl", seed=0)
    ctrl.eval()
    first = _forward(model, layers, llm.test[0])  # warm-up, and the policy's ranks for the table
    table = TableController(first["ranks"])  # the same ranks per (layer, segment): the same execution, no planning
    rec = ctrl.decisions(0)
    _forward(model, layers, llm.test[0])
    drrl, static = [], []
    for w in llm.test:  # interleaved: the policy, then the table, on each window
        attach_controller(layers, ctrl)
        drrl.append(_forward(model, layers, w))
        attach_controller(layers, table)
        static.append(_forward(model, layers, w))
    attach_controller(layers, ctrl)
    med = statistics.median
    fwd = med(r["seconds"] for r in drrl)
    row = {
        "context": context,
        "decisions": len(rec["layers"]),
        "drrl_forward_s": fwd,
        "table_forward_s": med(r["seconds"] for r in static),
        "plan_s": med(r["plan"] for r in drrl),
        "policy_s": med(r["controller"] for r in drrl),
        "plan_fraction": med(r["plan"] / r["seconds"] for r in drrl),
        "policy_fraction": med(r["controller"] / r["seconds"] for r in drrl),
        "policy_passes_s": _policy_passes(ctrl, rec),
    }
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_llm_arguments(ap, calib_windows=2)
    ap.add_argument("--contexts", default="1024,4096", help="comma-separated context lengths")
    ap.add_argument("--windows", type=int, default=2, help="held-out windows per context")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = [run(args, int(c)) for c in args.contexts.split(",")]
    print("| context | decisions | forward s (drrl / table) | planning | policy | policy passes: extend / re-encode |")
    print("|---:|---:|---|---:|---:|---|")
    for r in rows:
        p = r["policy_passes_s"]
        print(f"| {r['context']} | {r['decisions']} | {r['drrl_forward_s']:.2f} / {r['table_forward_s']:.2f} | "
              f"{100 * r['plan_fraction']:.1f}% | {100 * r['policy_fraction']:.1f}% | "
              f"{1e3 * p['extend']:.1f} ms / {1e3 * p['re-encode']:.1f} ms |")  # fmt: skip
    out = {"machine": machine(), "rows": rows, "seconds": time.perf_counter() - t0, "args": vars(args)}
    if args.json:
        write_json_atomic(args.json, out)
    return out


if __name__ == "__main__":
    main()
