"""What a masked decode step costs on this CPU: reading k scattered rows of a (r, d_out) matrix against k
contiguous rows and against all r rows, out of cache (a pool of distinct matrices larger than the L3).

    python benchmarks/gather_rows.py [--rows 414] [--width 1536] [--active 170] [--pool 60] [--repeats 7]

The shapes default to a RaNA gate adapter of SmolLM2-135M at 44% fewer FLOPs (n_B 414 components of
1,536 outputs, 170 active). One thread; the variants are interleaved; medians of per-repeat means, µs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=414)
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--active", type=int, default=170)
    ap.add_argument("--pool", type=int, default=60, help="distinct matrices cycled through (defeats the cache)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(args.rows, args.width, generator=g) for _ in range(args.pool)]
    idx = torch.randperm(args.rows, generator=g)[: args.active].sort().values
    w = torch.randn(args.active, generator=g)
    zeros = torch.zeros(args.rows)
    variants = {
        "scattered rows, embedding_bag (no copy)": lambda a: F.embedding_bag(
            idx[None], a, per_sample_weights=w[None], mode="sum"
        ),  # fmt: skip
        "scattered rows, index_select + matmul": lambda a: w @ a.index_select(0, idx),
        "contiguous rows (same count)": lambda a: torch.mv(a[: args.active].t(), w),
        "all rows (dense)": lambda a: torch.mv(a.t(), zeros),
    }
    times = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(args.repeats):
            for k, fn in variants.items():
                t0 = time.perf_counter()
                for a in mats:
                    fn(a)
                times[k].append(1e6 * (time.perf_counter() - t0) / len(mats))
    mb = args.active * args.width * 4 / 1e6
    print(f"{args.active} of {args.rows} rows of {args.width} floats ({mb:.2f} MB active), pool {args.pool}, 1 thread")
    for k, v in times.items():
        print(f"{k:42s} {statistics.median(v):8.1f} µs")


if __name__ == "__main__":
    main()
