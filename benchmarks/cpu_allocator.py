"""Training-step time of the baseline GPT with glibc's default allocation vs heap allocation.

    python benchmarks/cpu_allocator.py [--batch-size 8] [--repeats 5]

Both variants run in one process, interleaved (A B A B ...); after each switch one untimed step lets
the allocator settle, then one step is timed. The table reports medians and the ratio. FLOPs are identical by construction: only the allocator changes.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics

import torch
from torch.utils import benchmark

from drrl.models import GPT, GPTConfig
from drrl.train.config import RunConfig
from drrl.utils import set_heap_allocation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/shakespeare-gpt-tiny.yaml")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg: GPTConfig = RunConfig.load(args.config).model
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 50257, (args.batch_size, cfg.context))

    def step():
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    times: dict[str, list[float]] = {"default": [], "heap": []}
    faults: dict[str, list[int]] = {"default": [], "heap": []}
    for _ in range(args.repeats):
        for variant in times:
            if not set_heap_allocation(variant == "heap"):
                raise SystemExit("glibc mallopt is not available on this platform")
            step()  # settle the allocator after the switch (untimed)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[variant].append(timer.timeit(1).median)
            faults[variant].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    tokens = args.batch_size * (cfg.context - 1)
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"# batch {args.batch_size} x {cfg.context - 1} tokens, {args.repeats} interleaved repeats, medians")
    print("| allocation | step (s) | tokens/s | page faults/step |")
    print("|---|---|---|---|")
    for v, ts in times.items():
        med = statistics.median(ts)
        print(f"| {v} | {med:.2f} | {tokens / med:,.0f} | {statistics.median(faults[v]):,.0f} |")
    print(f"speed-up of heap allocation: {statistics.median(times['default']) / statistics.median(times['heap']):.2f}x")


if __name__ == "__main__":
    main()
