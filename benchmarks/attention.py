"""drrl dynamic low-rank attention against SDPA full attention: prefill layer time and decode steps.

    python benchmarks/attention.py --quick --json runs/bench/attention.json     # < 5 min on 2 CPU cores
    python benchmarks/attention.py --device cuda --json attention-gpu.json     # L up to 32768

Prefill (B=1, H=8, d=64, causal): one attention layer (qkv projection, RoPE, attention, output projection)
with the same weights, ``full`` = SDPA, against drrl variants: ``calibrated/fixed-r`` (calibrated maps,
fixed rank r: the cost of the rank-r path alone) and ``online/energy T=...`` (prefix-statistics bases
refreshed by subspace iteration, the energy controller deciding every T tokens: the whole dynamic system).
Inputs have a decaying spectrum so the energy rule has something to find. The variants run interleaved
in rounds (median of rounds; ``torch.utils.benchmark`` on CPU, CUDA events on GPU), so machine noise hits
all of them. ``overhead_fraction`` is the time of drrl's planning (statistics, staleness tests, basis
refreshes, controller) over the drrl layer time, measured in the same rounds.

Decode: one query against a cache of L tokens (B=1, H=8, d=64 on CPU; B=8, H=32, d=128 on GPU), the
low-rank key cache (keys of width r, stored transposed and pre-scaled, written-out step) against the
faster of SDPA and the same written-out step at full width; ``bytes_limit`` = 2d/(r+d). Several distinct
caches rotate so that timings do not come from the CPU cache.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from drrl import flops
from drrl.attention import DynamicLowRankAttention, FullAttention, RotaryEmbedding, calibrating
from drrl.attention.drrl import LowRankKVCache
from drrl.eval.machine import machine
from drrl.utils import write_json_atomic


def rope_decay(d: int, scale: float) -> torch.Tensor:
    """Coordinate scales that decay over RoPE planes: coordinates j and j + d/2 (rotated together by the
    rotate-half RoPE) share exp(-j/scale), so the low-rank structure survives the position rotation."""
    half = torch.exp(-torch.arange(d // 2) / scale)
    return torch.cat([half, half])


def spectrum_inputs(B, H, L, d, *, device, dtype, seed, scale=6.0):
    """q, k, v (B, H, L, d) with query/key energy decaying over RoPE planes (see rope_decay)."""
    g = torch.Generator().manual_seed(seed)
    decay = rope_decay(d, scale)
    q = torch.randn(B, H, L, d, generator=g) * decay
    k = torch.randn(B, H, L, d, generator=g) * decay
    v = torch.randn(B, H, L, d, generator=g)
    return tuple(x.to(device, dtype) for x in (q, k, v))


class Timer:
    """Median time (s) per call of several callables, interleaved in rounds."""

    def __init__(self, device: torch.device, rounds: int, min_time: float):
        self.device, self.rounds, self.min_time = device, rounds, min_time

    def _once(self, fn) -> float:
        if self.device.type == "cuda":
            n = 1
            while True:  # calibrate the number of calls to ~min_time
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(n):
                    fn()
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
                if ms / 1e3 >= self.min_time or n >= 1 << 14:
                    return ms / 1e3 / n
                n *= 2
        from torch.utils import benchmark

        return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=self.min_time).median

    def __call__(self, fns: dict) -> dict:
        for fn in fns.values():  # warm-up
            fn()
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        times = {name: [] for name in fns}
        for _ in range(self.rounds):
            for name, fn in fns.items():
                times[name].append(self._once(fn))
        return {name: statistics.median(v) for name, v in times.items()}


def structured_layer(d_model, n_head, device, dtype, seed=2, scale=6.0) -> FullAttention:
    """A full-attention layer whose query/key projections have the decaying spectrum of spectrum_inputs."""
    d = d_model // n_head
    g = torch.Generator().manual_seed(seed)
    full = FullAttention(d_model, n_head)
    decay = rope_decay(d, scale).repeat(n_head)
    with torch.no_grad():
        w = torch.randn(3 * d_model, d_model, generator=g)
        w[: 2 * d_model] *= decay.repeat(2)[:, None] * 2 / math.sqrt(d_model)
        w[2 * d_model :] /= math.sqrt(d_model)
        full.qkv.weight.copy_(w)
    return full.to(device, dtype).eval()


def layer_pair(d_model, n_head, L, device, dtype, **drrl_kw):
    full = structured_layer(d_model, n_head, device, dtype)
    lr = DynamicLowRankAttention(d_model, n_head, **drrl_kw).to(device, dtype).eval()
    lr.load_state_dict(full.state_dict(), strict=False)
    return full, lr


@torch.no_grad()
def _prefill_at(args, L, device, dtype, timer) -> list[dict]:
    B, H, d = 1, 8, 64
    D = H * d
    rows = []
    rope = RotaryEmbedding(d, L).to(device)
    q, k, v = spectrum_inputs(B, H, L, d, device=device, dtype=dtype, seed=0)
    cal = spectrum_inputs(B, H, min(L, 4096), d, device=device, dtype=dtype, seed=1)
    # layer input; the layer's q/k projections have the same decaying spectrum (structured_layer)
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    variants = {f"calibrated/fixed-{r}": {"basis": "calibrated", "controller": "fixed", "rank": r} for r in args.ranks}
    for seg in args.segments:
        variants[f"online/energy T={seg}"] = {
            "basis": "online",
            "controller": "energy",
            "tau": args.tau,
            "segment": seg,
        }
    full = structured_layer(D, H, device, dtype)
    fns = {"full": lambda: full.attend(q, k, v), "full-layer": lambda: full(x, rope)}
    mods = {}
    for name, kw in variants.items():
        _, m = layer_pair(D, H, L, device, dtype, **{"segment": args.segments[0], **kw})
        m.load_state_dict(full.state_dict(), strict=False)
        if kw["basis"] == "calibrated":
            with calibrating(m):
                m.attend(*cal)
        else:  # warm start the online basis as a running model would (state from the previous call)
            m.train()
            m.attend(*cal)
            m.eval()
        mods[name] = m
        fns[name] = lambda m=m: m.attend(q, k, v)
        fns[name + " layer"] = lambda m=m: m(x, rope)
        fns[name + " plan"] = lambda m=m: m.plan(q, k, v)
    t = timer(fns)
    full_flops = flops.full_attention(B, H, L, d)
    for name, m in mods.items():
        m.attend(q, k, v)
        plan = m.last_plan
        counted = dict(plan.flops)
        red = flops.reductions({**{k_: 0 for k_ in full_flops}, **counted}, full_flops)
        mean_rank = sum(r * min(m.segment, L - i * m.segment) for i, r in enumerate(plan.ranks)) / L
        rows.append(
            {
                "L": L,
                "variant": name,
                "rank": round(mean_rank, 2),
                "time_ratio_vs_sdpa": t[name + " layer"] / t["full-layer"],
                "core_time_ratio_vs_sdpa": t[name] / t["full"],
                "score_flops_reduction": red["score_flops_reduction"],
                "kernel_score_flops_reduction": 1 - plan.kernel_score_flops / full_flops["scores"],
                "attention_flops_reduction": red["attention_flops_reduction"],
                "overhead_fraction": t[name + " plan"] / t[name + " layer"],
                "refreshes": plan.refreshes,
                "path": plan.path,
                "ms": {"full": t["full"] * 1e3, "drrl": t[name] * 1e3, "full_layer": t["full-layer"] * 1e3,
                       "drrl_layer": t[name + " layer"] * 1e3, "plan": t[name + " plan"] * 1e3},
            }
        )  # fmt: skip
        print(_fmt_prefill(rows[-1]), flush=True)
    return rows


def _fmt_prefill(r):
    return (
        f"prefill L={r['L']:>6} {r['variant']:<24} rank {r['rank']:>5.1f}  layer x{r['time_ratio_vs_sdpa']:.3f}  "
        f"core x{r['core_time_ratio_vs_sdpa']:.3f}  score FLOPs -{100 * r['score_flops_reduction']:.1f}%  "
        f"attn FLOPs -{100 * r['attention_flops_reduction']:.1f}%  overhead {100 * r['overhead_fraction']:.1f}%  "
        f"({r['ms']['full_layer']:.2f} vs {r['ms']['drrl_layer']:.2f} ms)"
    )


@torch.no_grad()
def _decode_at(args, L, device, dtype, timer) -> list[dict]:
    B, H, d = (8, 32, 128) if device.type == "cuda" else (1, 8, 64)
    scale = 1 / math.sqrt(d)
    rows = []
    per_cache = B * H * L * 2 * d * torch.finfo(dtype).bits // 8
    n_caches = 1 if device.type == "cuda" else max(2, math.ceil(256e6 / per_cache))
    full_caches = []
    for _ in range(n_caches):
        c = LowRankKVCache(B, H, L, d, d, dtype, device)
        c.append(
            torch.randn(B, H, L, d, device=device, dtype=dtype) * scale,
            torch.randn(B, H, L, d, device=device, dtype=dtype),
        )
        full_caches.append(c)
    q = torch.randn(B, H, 1, d, device=device, dtype=dtype)
    sd = [(c.kt.transpose(-2, -1).contiguous() / scale, c.v) for c in full_caches]
    it = {"i": 0}

    def pick(lst):
        it["i"] = (it["i"] + 1) % len(lst)
        return lst[it["i"]]

    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, *pick(sd), scale=scale),
        "written-full": lambda: pick(full_caches).attend(q, d),
    }
    low = {}
    for r in args.decode_ranks:
        caches = []
        for _ in range(n_caches):
            c = LowRankKVCache(B, H, L, r, d, dtype, device)
            c.append(
                torch.randn(B, H, L, r, device=device, dtype=dtype),
                torch.randn(B, H, L, d, device=device, dtype=dtype),
            )
            caches.append(c)
        low[r] = caches
        fns[f"written-r{r}"] = lambda caches=caches, r=r: pick(caches).attend(q[..., :r], r)
    t = timer(fns)
    base = min(t["sdpa"], t["written-full"])
    for r in args.decode_ranks:
        rows.append(
            {
                "L": L,
                "rank": r,
                "d": d,
                "speedup_vs_sdpa": base / t[f"written-r{r}"],
                "bytes_limit": flops.decode_bytes_limit(d, r),
                "us": {"sdpa": t["sdpa"] * 1e6, "written_full": t["written-full"] * 1e6, "lowrank": t[f"written-r{r}"] * 1e6},
                "B": B,
                "H": H,
            }
        )  # fmt: skip
        r_ = rows[-1]
        print(
            f"decode  L={L:>6} r={r:>3}/{d}  speed-up x{r_['speedup_vs_sdpa']:.3f} (limit x{r_['bytes_limit']:.3f}, "
            f"{r_['speedup_vs_sdpa'] / r_['bytes_limit']:.0%})  sdpa {r_['us']['sdpa']:.0f} us, written full "
            f"{r_['us']['written_full']:.0f} us, rank-r {r_['us']['lowrank']:.0f} us",
            flush=True,
        )
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="fewer lengths and rounds (< 5 min on 2 CPU cores)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--lengths", type=int, nargs="+", help="prefill lengths")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 32], help="fixed ranks (default 16 32)")
    p.add_argument("--decode-lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--decode-ranks", type=int, nargs="+", help="default 16 32 (CPU, d=64) or 32 64 (GPU, d=128)")
    p.add_argument(
        "--segments", type=int, nargs="+", default=[128, 256], help="segment lengths T of the online variants"
    )
    p.add_argument("--tau", type=float, default=0.97, help="energy threshold of the online variant")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 7, quick 3)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--min-time", type=float, help="seconds per measurement (default 1.0, quick 0.2)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py: error: --device cuda but no GPU is visible; run on CPU")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.lengths is None:
        if device.type == "cuda":
            args.lengths = [1024, 4096, 8192, 16384, 32768] if not args.quick else [4096, 32768]
        else:
            args.lengths = [1024, 2048, 4096, 8192] if not args.quick else [1024, 4096]
    args.decode_ranks = args.decode_ranks or ([32, 64] if device.type == "cuda" else [16, 32])
    timer = Timer(device, args.rounds or (3 if args.quick else 7), args.min_time or (0.2 if args.quick else 1.0))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    result = {
        "device": machine(device),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "commit": commit,
        "prefill": [row for L in args.lengths for row in _prefill_at(args, L, device, dtype, timer)],
        "decode": [row for L in args.decode_lengths for row in _decode_at(args, L, device, dtype, timer)],
    }
    if args.json:
        write_json_atomic(args.json, result)  # creates the parent folder
    return result


if __name__ == "__main__":
    main()
