"""Training step of the baseline GPT with the chunked linear cross-entropy vs plain logits + F.cross_entropy.

    python benchmarks/lm_loss.py [--config configs/shakespeare-gpt-tiny.yaml] [--batch-size 8] [--repeats 5]

Both variants do the same FLOPs (logits, and the gradients of hidden states and weights); they run
in one process, interleaved (A B A B ...) after a warm-up step each, timed with
torch.utils.benchmark; the table gives medians, page faults per step and the ratio.
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from drrl.eval.machine import machine
from drrl.models import GPT
from drrl.train.config import RunConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/shakespeare-gpt-tiny.yaml")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = RunConfig.load(args.config).model
    model = GPT(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    x = torch.randint(0, 50257, (args.batch_size, cfg.context + 1))
    inp, tgt = x[:, :-1], x[:, 1:]

    def plain():
        logits = model(inp)
        F.cross_entropy(logits.flatten(0, 1), tgt.flatten()).backward()

    def chunked():
        model.loss(inp, tgt).backward()

    variants = {"logits + F.cross_entropy": plain, "chunked linear cross-entropy": chunked}
    times = {k: [] for k in variants}
    faults = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
        opt.zero_grad(set_to_none=True)
    for _ in range(args.repeats):
        for name, fn in variants.items():
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[name].append(timer.timeit(1).median)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            opt.zero_grad(set_to_none=True)

    tokens = args.batch_size * cfg.context
    print(f"# {machine()}, fp32")
    print(
        f"# forward + backward of {args.batch_size} x {cfg.context} tokens, {args.repeats} interleaved repeats, medians"
    )
    print("| loss | step (s) | tokens/s | page faults/step |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {tokens / med:,.0f} | {statistics.median(faults[name]):,.0f} |")
    a, b = (statistics.median(t) for t in times.values())
    print(f"speed-up: {a / b:.2f}x")


if __name__ == "__main__":
    main()
