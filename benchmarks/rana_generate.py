"""End-to-end decode with RaNA adapters against the dense model: SmolLM2-135M through Hugging Face ``generate()``.

    python benchmarks/rana_generate.py [--flops-ratios 0.7,0.56,0.5] [--targets mlp,mlp+qkv] [--batches 1]
                                       [--prompt-tokens 128] [--new-tokens 64] [--repeats 3] [--json OUT]

The adapters are fitted as in ``benchmarks/rana_decode.py`` (``apply_rana`` on 8 windows of 512 training tokens),
their decode path on (:mod:`drrl.kernels`); attention stays the model's own (SDPA, transformers' cache). Prompts are
windows of the held-out test plays, one per sequence. Rows per (targets, ratio, batch), the variants alternating
``--repeats`` times (median times): decode tokens/s after the first new token, greedy; ``bytes_limit`` is the dense
model's weight bytes over the bytes of weights a step reads with the adapters (every weight outside the adapted
linears, B in full, and the rows of A and W_down the step's tokens keep, measured on the generated tokens), the
speed-up a weight-bound step could reach (at 128 + 64 cached tokens the KV cache is under 2% of the bytes); and
``of_limit``, the measured speed-up as a share of it. Two speeds per row: tokens/s over the whole run (what a user
waits for, every stall of a shared machine included) and the median step (``median_step_ms``, ``step_speedup``,
``step_of_limit``: the typical step, robust to those stalls); both are medians over the repeats.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time

import torch

from drrl.adapters import apply_rana, prepare_decode
from drrl.adapters.layers import NeuronAdapterMLP, NeuronMaskedLinear, RankAdapter, SharedRankSlice
from drrl.data.tokenizer import get_tokenizer
from drrl.data.tokens import load_tokens, spread_windows
from drrl.eval.machine import machine
from drrl.integrations import load_causal_lm
from drrl.integrations.hf import cache_kwarg
from drrl.recipes.generate import TokenClock
from drrl.utils import write_json_atomic


def decode(model, ids: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """(tokens/s over the run, the median step's seconds, the output) of one greedy ``generate()``."""
    clock = TokenClock()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, streamer=clock, pad_token_id=0)  # fmt: skip
    steps = [b - a for a, b in itertools.pairwise(clock.times)]
    return ids.shape[0] * len(steps) / (clock.times[-1] - clock.times[0]), statistics.median(steps), out


def step_weight_bytes(model, out: torch.Tensor, prompt: int) -> float:
    """Mean weight bytes one decode step reads: the model's parameters, with each adapter's A and W_down counted
    at the rows the step's tokens keep (measured by running the generated tokens one step at a time)."""
    size = next(model.parameters()).element_size()
    total = sum(p.numel() for p in model.parameters()) * size
    saved: list[float] = []

    def hook(mod, args, _out):
        x = args[0].reshape(-1, args[0].shape[-1])
        if isinstance(mod, RankAdapter) and float(mod.tau) > 0:
            kept = int(((x @ mod.b.t()).square() >= mod.tau).any(0).sum())
            saved.append(size * (mod.n_b - kept) * mod.out_features)
        elif isinstance(mod, NeuronMaskedLinear):
            kept = int((mod.scores(x) >= mod.tau).any(0).sum())
            saved.append(size * (mod.in_features - kept) * mod.out_features)
        elif isinstance(mod, NeuronAdapterMLP):
            kept = int((mod.act(mod.gate(x)).abs() >= mod.t).any(0).sum())
            up = mod.up.in_features if mod.up is not None else 0
            saved.append(size * (mod.gate.out_features - kept) * (up + mod.down.out_features))

    mods = [m for m in model.modules() if isinstance(m, RankAdapter | NeuronMaskedLinear | NeuronAdapterMLP)]
    hooks = [m.register_forward_hook(hook) for m in mods]
    slices = [m for m in model.modules() if isinstance(m, SharedRankSlice)]

    def slice_hook(mod, args, _out):  # q/k/v sharing one basis and mask: each slice's rows of A
        basis = mod.basis
        kept = int(((args[0].reshape(-1, args[0].shape[-1]) @ basis.b.t()).square() >= basis.tau).any(0).sum())
        saved.append(size * (basis.n_b - kept) * mod.out_features)

    hooks += [m.register_forward_hook(slice_hook) for m in slices]
    steps = out.shape[1] - prompt - 1
    with torch.no_grad():
        res = model(out[:, :prompt], use_cache=True)
        cache = res.get("cache", res.get("past_key_values"))  # named ``cache`` in recent transformers
        saved.clear()
        for i in range(steps):
            model(out[:, prompt + i : prompt + i + 1], use_cache=True, **{cache_kwarg(): cache})
    for h in hooks:
        h.remove()
    return total - sum(saved) / steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face folder or name (default: embedded SmolLM2-135M)")
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--flops-ratios", default="0.7,0.56,0.5", help="kept FLOPs of the adapted linears")
    ap.add_argument("--methods", default="rana,cats", help="adapter methods (cats: MLPs only)")
    ap.add_argument("--targets", default="mlp,mlp+qkv")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--calib-context", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    dense, path = load_causal_lm(args.model)
    dense.eval()
    tok = get_tokenizer("hf:" + path)
    train, test = load_tokens(args.corpus, "train", tok), load_tokens(args.corpus, "test", tok)
    calib = [w[None] for w in spread_windows(train[: len(train) // 2], args.calib_windows, args.calib_context)]
    cache: dict = {}
    rows = []
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    for targets in args.targets.split(","):
        for ratio in (float(r) for r in args.flops_ratios.split(",")):
            models = {"dense": dense}
            for method in args.methods.split(","):
                if method == "cats" and targets != "mlp":
                    continue
                m = copy.deepcopy(dense)
                apply_rana(m, ratio, calib, method=method, targets=targets, cache=cache)
                prepare_decode(m)
                models[method] = m
            for batch in (int(b) for b in args.batches.split(",")):
                ids = torch.stack(spread_windows(test, batch, args.prompt_tokens)).long()
                runs: dict[str, list] = {name: [] for name in models}
                steps: dict[str, list] = {name: [] for name in models}
                outs = {}
                for _ in range(args.repeats):
                    for name, m in models.items():
                        tps, step, outs[name] = decode(m, ids, args.new_tokens)
                        runs[name].append(tps)
                        steps[name].append(step)
                dense_tps, dense_step = statistics.median(runs["dense"]), statistics.median(steps["dense"])
                for name, m in models.items():
                    limit = dense_bytes / step_weight_bytes(m, outs[name], args.prompt_tokens)
                    tps, step = statistics.median(runs[name]), statistics.median(steps[name])
                    rows.append({"targets": targets, "flops_ratio": ratio, "batch": batch, "method": name,
                                 "decode_tokens_per_s": tps, "speedup": tps / dense_tps, "bytes_limit": limit,
                                 "of_limit": tps / dense_tps / limit, "median_step_ms": 1e3 * step,
                                 "step_speedup": dense_step / step, "step_of_limit": dense_step / step / limit})  # fmt: skip
    print("| targets | kept FLOPs | batch | method | decode tok/s | × dense | median step ms | × dense (step) "
          "| bytes limit | of limit | of limit (step) |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['targets']} | {r['flops_ratio']:.2f} | {r['batch']} | {r['method']} "
              f"| {r['decode_tokens_per_s']:.1f} | {r['speedup']:.2f} | {r['median_step_ms']:.1f} | {r['step_speedup']:.2f} "
              f"| {r['bytes_limit']:.2f} | {r['of_limit']:.2f} | {r['step_of_limit']:.2f} |")  # fmt: skip
    out = {"machine": machine(), "threads": torch.get_num_threads(), "rows": rows, "args": vars(args),
           "seconds": time.perf_counter() - t_start}  # fmt: skip
    if args.json:
        write_json_atomic(args.json, out)
    return out


if __name__ == "__main__":
    main()
