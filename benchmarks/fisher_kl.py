"""How well the output Fisher predicts what a rank costs: the estimated KL (½ Σ F·Δo² per token, summed over layers,
drrl.attention.drrl.sensitivity) against the exact KL of the model's next-token distributions, and against the
change of the next-token loss, on held-out windows.

    python benchmarks/fisher_kl.py [--model DIR] [--context 1024] [--ranks 32,48] [--layers 0,5,10,15,20,25,29]
                                   [--json OUT]

Rows: every layer at each of ``--ranks`` (uniform), and each of ``--layers`` alone at the lowest of them (the others
at r_max). Calibration and the Fisher come from training windows (first half of the training split), the KL from
evenly spread test windows. The Spearman correlation is over the single-layer rows (the ranking a per-layer
allocation relies on).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from drrl.controllers import TableController, attach_controller
from drrl.eval.allocation import ErrorProbe, output_fisher
from drrl.eval.machine import machine
from drrl.recipes.demo_methods import add_llm_arguments, calibrated_llm
from drrl.utils import write_json_atomic


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_llm_arguments(ap, calib_windows=2)
    ap.add_argument("--fisher-windows", type=int, default=1)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--ranks", type=_ints, default=[32, 48], help="uniform ranks (the lowest is the per-layer probe)")
    ap.add_argument("--layers", type=_ints, default=[0, 5, 10, 15, 20, 25, 29], help="layers probed alone")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    llm = calibrated_llm(args.model, corpus=args.corpus, context=args.context,
                         calib_windows=args.calib_windows + args.fisher_windows, calibrate=args.calib_windows,
                         test_windows=args.eval_windows, segment=args.segment, bucket=args.bucket)  # fmt: skip
    model, path, layers, cal, ev = llm.model, llm.path, llm.layers, llm.calib, llm.test
    output_fisher(model, layers, cal[args.calib_windows :])
    n_layers, top = len(layers), layers[0].buckets[-1].item()
    layers_probed = [i for i in args.layers if 0 <= i < n_layers]

    def measure(table) -> dict:
        """Exact KL, estimated KL and the loss change per token, averaged over the evaluation windows."""
        exact = dnll = 0.0
        probe = ErrorProbe(table)  # the estimate, from the same forward passes as the exact KL
        for w in ev:
            ids, target = w[None, :-1], w[1:]
            attach_controller(layers, TableController([[top]] * n_layers))
            with torch.no_grad():
                t = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float()[0], -1)
                attach_controller(layers, probe)
                s = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float()[0], -1)
            exact += float((t.exp() * (t - s)).sum(-1).mean())
            dnll += float(F.nll_loss(s, target) - F.nll_loss(t, target))
        k = len(ev)
        return {"exact_kl": exact / k, "estimated_kl": probe.estimate(), "dnll": dnll / k}

    rows = []
    for r in args.ranks:
        rows.append({"config": f"every layer at {r}", "layer": None, "rank": r, **measure([[r]] * n_layers)})
    low = min(args.ranks)
    for i in layers_probed:
        table = [[top]] * n_layers
        table[i] = [low]
        rows.append({"config": f"layer {i} alone at {low}", "layer": i, "rank": low, **measure(table)})
    single = [r for r in rows if r["layer"] is not None]
    out = {
        "model": path,
        "machine": machine(torch.device("cpu")),
        "context": args.context,
        "rows": rows,
        "spearman_estimated_vs_exact": _spearman([r["estimated_kl"] for r in single], [r["exact_kl"] for r in single])
        if len(single) > 1
        else None,
        "spearman_dnll_vs_exact": _spearman([r["dnll"] for r in single], [r["exact_kl"] for r in single])
        if len(single) > 1
        else None,
        "seconds": time.perf_counter() - t0,
    }
    print("| probe | exact KL | estimated KL | estimate / exact | Δ loss |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["estimated_kl"] / r["exact_kl"] if r["exact_kl"] > 0 else float("nan")
        print(f"| {r['config']} | {r['exact_kl']:.5f} | {r['estimated_kl']:.5f} | {ratio:.2f} | {r['dnll']:+.5f} |")
    print(
        f"Spearman over single layers: estimate {out['spearman_estimated_vs_exact']}, "
        f"loss change {out['spearman_dnll_vs_exact']}; {out['seconds']:.0f} s"
    )
    if args.json:
        write_json_atomic(args.json, out)
    return out


if __name__ == "__main__":
    main()
