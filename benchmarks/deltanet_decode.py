"""Recurrent decode step of a DeltaNet LM with fewer query/key channels, against the unpruned model.

    python benchmarks/deltanet_decode.py [--config configs/shakespeare-deltanet-tiny.yaml] [--batches 1,8,32,128]
                                         [--ratios 0.25,0.5,0.75] [--repeats 5] [--out FILE]

For each batch size (sequences decoded together) the unpruned model and one pruned copy per ratio (channels
kept: the first d' of every head; time does not depend on which, nor on the weights) decode after a 16-token
prompt; `drrl.pruning.decode_times` times the step of the DeltaNet layers alone (q/k/v/β projections, short
convolutions, state update and readout, output norm and projection) and the whole model step (embedding,
MLPs, LM head too), all models interleaved, medians of the repeats. Prints a table of µs per step and
speed-ups over the unpruned model.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from drrl.eval.machine import machine
from drrl.models import build_model
from drrl.pruning import decode_times
from drrl.train.config import RunConfig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/shakespeare-deltanet-tiny.yaml")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    cfg = RunConfig.load(args.config).model
    dense = build_model(cfg).eval()
    d_k = dense.mixers()[0].head_k_dim
    models = {"unpruned": dense}
    for r in (float(x) for x in args.ratios.split(",")):
        m = copy.deepcopy(dense)
        d_keep = int(d_k * (1 - r) + 1e-9)
        for layer in m.mixers():
            layer.slice_qk(torch.arange(d_keep).expand(layer.n_head, -1))
        models[f"{r:g}"] = m
    print(f"{machine()}; d_k {d_k}, "
          f"{cfg.n_layer} layers × {cfg.n_head} heads, d_model {cfg.d_model}, vocab {cfg.vocab_size}")  # fmt: skip
    print("| batch | removed | d' | DeltaNet layers µs/step | speed-up | model µs/step | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for b in (int(x) for x in args.batches.split(",")):
        t = decode_times(models, b, args.repeats)
        base = t["unpruned"]
        for name, tt in t.items():
            removed = 0.0 if name == "unpruned" else float(name)
            d_keep = models[name].mixers()[0].head_k_dim
            row = {"batch": b, "removed": removed, "d_keep": d_keep, "mixers_us": 1e6 * tt["mixers"],
                   "mixers_speedup": base["mixers"] / tt["mixers"], "model_us": 1e6 * tt["model"],
                   "model_speedup": base["model"] / tt["model"]}  # fmt: skip
            results.append(row)
            print(f"| {b} | {removed:.0%} | {d_keep} | {row['mixers_us']:.0f} | {row['mixers_speedup']:.2f}× | "
                  f"{row['model_us']:.0f} | {row['model_speedup']:.2f}× |")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "repeats": args.repeats, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
