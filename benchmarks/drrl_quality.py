"""Perplexity against rank: a trained full-attention GPT evaluated with drrl attention swapped in.

    drrl train configs/shakespeare-gpt-tiny.yaml --out runs/shakespeare-gpt-tiny
    python benchmarks/drrl_quality.py runs/shakespeare-gpt-tiny --json runs/bench/drrl-quality.json

The trained weights are loaded into a GPT whose attention is ``drrl`` (same parameters; the bases are
buffers), the calibrated maps are fitted on training windows, and validation perplexity is measured
for fixed ranks, the energy rule at several thresholds (calibrated and online bases) and random ranks,
beside full attention. No fine-tuning: this measures what rank reduction costs a model that was not
trained for it. FLOPs are the attention core's (QKᵀ, softmax, PV and every overhead drrl runs),
summed over the evaluation, from each layer's plan.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from drrl import flops
from drrl.api import load
from drrl.attention import calibrating
from drrl.attention.drrl import lowrank_modules
from drrl.data.tokens import load_tokens, sample_batch
from drrl.eval.perplexity import evaluate_lm
from drrl.models import GPT
from drrl.utils import write_json_atomic


def swap_attention(model: GPT, **kwargs) -> GPT:
    cfg = replace(model.cfg, attention="drrl", attention_kwargs=kwargs)
    new = GPT(cfg)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".attn." in k for k in missing), (missing, unexpected)
    return new.eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run folder or checkpoint of a full-attention GPT")
    p.add_argument("--json", type=Path)
    p.add_argument("--segment", type=int, default=64, help="tokens per rank decision (default 64)")
    p.add_argument("--calibration-batches", type=int, default=16, help="training windows for the calibrated maps")
    p.add_argument("--max-tokens", type=int, default=None, help="validation tokens scored (default all)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok, ckpt = load(args.run)
    cfg = ckpt.config
    corpus, ctx = cfg["data"]["corpus"], base.cfg.context
    val = load_tokens(cfg["eval"].get("corpus") or corpus, "validation", tok)
    train = load_tokens(corpus, "train", tok)
    cal_x, _ = sample_batch(train, args.calibration_batches, ctx, seed=1234, step=0)
    d = base.cfg.d_head

    def run(name: str, model: GPT) -> dict:
        t0 = time.perf_counter()
        r = evaluate_lm(model, val, ctx, batch_size=16, max_tokens=args.max_tokens)
        row = {
            "method": name,
            "ppl": r["ppl"],
            "loss": r["loss"],
            "tokens": r["tokens"],
            "seconds": time.perf_counter() - t0,
        }
        mods = lowrank_modules(model)
        if mods:
            fl, tokens, rank_sum = Counter(), 0, 0.0
            for m in mods:
                t = m.pop_stats(with_flops=True)
                fl.update(t.get("flops", {}))
                tokens, rank_sum = tokens + t["tokens"], rank_sum + t["mean_rank"] * t["tokens"]
            full = flops.full_attention(1, 1, 1, 1)  # only the category names
            full = {k: fl["full_" + k] for k in full}
            red = flops.reductions({k: fl[k] for k in fl if not k.startswith("full_")}, full)
            row.update(
                mean_rank=rank_sum / tokens,
                **red,
                overheads={k: fl[k] / full["scores"] for k in ("grams", "basis", "stats", "maps")},
            )
        else:
            row.update(mean_rank=d, score_flops_reduction=0.0, attention_flops_reduction=0.0)
        print(
            f"{name:<28} ppl {row['ppl']:8.2f}  mean rank {row['mean_rank']:5.1f}  score FLOPs -{100 * row['score_flops_reduction']:4.1f}%"
            f"  attention FLOPs -{100 * row['attention_flops_reduction']:5.1f}%  ({row['seconds']:.0f} s)",
            flush=True,
        )
        return row

    rows = [run("full (SDPA)", base)]
    variants = [
        (f"calibrated fixed r={r}", {"basis": "calibrated", "controller": "fixed", "rank": r})
        for r in (8, 16, 24, 32, 48, 64)
    ]
    variants += [
        (f"calibrated energy tau={t}", {"basis": "calibrated", "controller": "energy", "tau": t})
        for t in (0.9, 0.95, 0.99)
    ]
    variants += [
        (f"online energy tau={t}", {"basis": "online", "controller": "energy", "tau": t}) for t in (0.9, 0.95, 0.99)
    ]
    variants += [("online fixed r=32", {"basis": "online", "controller": "fixed", "rank": 32})]
    variants += [("calibrated random", {"basis": "calibrated", "controller": "random", "seed": 0})]
    for name, kw in variants:
        model = swap_attention(base, segment=args.segment, **kw)
        with calibrating(model):
            for x in cal_x.split(4):
                model(x)
        for m in lowrank_modules(model):
            m.pop_stats()
        rows.append(run(name, model))
    result = {"run": str(args.run), "segment": args.segment, "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        write_json_atomic(args.json, result)  # creates the parent folder
    return result


if __name__ == "__main__":
    main()
