"""The demo's timing: each method's attention layers on one window's captured queries, keys and values against
SDPA (prefill), and one decode step per layer against its cache, interleaved so machine noise hits all."""

from __future__ import annotations

import math
import statistics
import time

import torch

from drrl.attention.drrl import LowRankKVCache
from drrl.attention.full import grouped_sdpa


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
