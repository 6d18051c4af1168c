"""RaNA's decode path against dense MLPs: every MLP of SmolLM2-135M, one decode step at batch 1, 4 and 8.

    python benchmarks/rana_decode.py [--flops-ratios 0.7,0.56,0.5] [--batches 1,4,8] [--threads 2] [--json OUT]

The model's MLPs are adapted (``apply_rana``, targets ``mlp``) on 8 windows of 512 tokens of the first half of the
Shakespeare training plays; the inputs the timed MLPs see are the dense model's MLP inputs on held-out tokens of the
test plays. A step runs every layer's MLP on one token per sequence (token-major: each layer's weights leave the
cache before their next use, as in decoding). Rows per (ratio, batch), all timed side by side (interleaved rounds,
medians; :func:`drrl.eval.timing.interleaved_medians`):
  * ``dense``: the model's own MLPs;
  * ``rana``: the adapters' decode path (:func:`drrl.kernels.masked_rows`: each kept row of Aᵀ and W_downᵀ read
    once for the step's tokens, the mask decided in the kernel);
  * ``rana, masked matmul``: the same adapters without the decode path (B x, the mask, a dense matmul with A);
  * ``cats``: the neuron adapter at the same ratio (its own decode path: gathered rows of W_up, ``embedding_bag``
    on W_downᵀ);
  * ``svd``: static low rank at the same ratio (two dense GEMVs per matrix).
``bytes`` is what a step reads from the MLP weights (B in full; of A and W_down, on a path that skips rows, the rows
some token of the step keeps, otherwise all; dense: the three weights), ``bytes_limit`` dense's bytes over the
row's, and ``of_limit`` the measured speed-up as a share of it.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from drrl.adapters import apply_rana, prepare_decode
from drrl.adapters.layers import NeuronAdapterMLP, NeuronMaskedLinear, RankAdapter
from drrl.data.tokenizer import get_tokenizer
from drrl.data.tokens import load_tokens, spread_windows
from drrl.eval.machine import machine
from drrl.eval.timing import interleaved_medians
from drrl.integrations import load_causal_lm
from drrl.utils import write_json_atomic


def mlp_modules(model) -> list:
    return [layer.mlp for layer in model.model.layers]


def mlp_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's MLP input on ``ids`` (1, L): a list of (L, d) tensors."""
    got: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: got.append(a[0].detach()[0])) for m in mlp_modules(model)]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return got


def step_fn(model, xs: list[torch.Tensor], batch: int, steps: int):
    mlps = mlp_modules(model)
    toks = [[x[i * batch : (i + 1) * batch].reshape(batch, 1, -1).contiguous() for i in range(steps)] for x in xs]

    def run():
        with torch.no_grad():
            for i in range(steps):
                for m, t in zip(mlps, toks, strict=True):
                    m(t[i])

    return run


def bytes_read(model, xs: list[torch.Tensor], batch: int, steps: int) -> float:
    """Mean bytes of adapted (or dense) MLP weights one step must read: every matrix read in full except the rows a
    mask leaves out for every token of the step."""
    total = []

    def hook(mod, args, _out):
        x = args[0].reshape(-1, args[0].shape[-1])
        size = next(mod.parameters()).element_size()
        skips = getattr(mod, "fast", False)  # a path that reads only the kept rows (otherwise: all of them)
        if isinstance(mod, RankAdapter):
            c = x @ mod.b.t()
            kept = int((c.square() >= mod.tau).any(0).sum()) if skips and float(mod.tau) > 0 else mod.n_b
            total.append(size * (mod.b.numel() + kept * mod.out_features))
        elif isinstance(mod, NeuronMaskedLinear):
            kept = int((mod.scores(x) >= mod.tau).any(0).sum()) if skips else mod.in_features
            total.append(size * kept * mod.out_features)
        elif isinstance(mod, NeuronAdapterMLP):
            a = mod.act(mod.gate(x))
            kept = int((a.abs() >= mod.t).any(0).sum()) if skips else mod.gate.out_features
            up = mod.up.in_features if mod.up is not None else 0
            total.append(size * (mod.gate.weight.numel() + kept * (up + mod.down.out_features)))
        elif isinstance(mod, torch.nn.Linear):
            total.append(size * mod.weight.numel())

    watched = []
    for mlp in mlp_modules(model):
        if isinstance(mlp, NeuronAdapterMLP):
            watched.append(mlp)
            continue
        watched += [m for m in mlp.children() if isinstance(m, RankAdapter | NeuronMaskedLinear | torch.nn.Linear)]
    hooks = [m.register_forward_hook(hook) for m in watched]
    step_fn(model, xs, batch, steps)()
    for h in hooks:
        h.remove()
    return sum(total) / steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face folder or name (default: embedded SmolLM2-135M)")
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--flops-ratios", default="0.7,0.56,0.5", help="kept MLP FLOPs")
    ap.add_argument("--methods", default="rana,cats,svd")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timed call")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--calib-context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dense, path = load_causal_lm(args.model)
    dense.eval()
    tok = get_tokenizer("hf:" + path)
    train, test = load_tokens(args.corpus, "train", tok), load_tokens(args.corpus, "test", tok)
    calib = [w[None] for w in spread_windows(train[: len(train) // 2], args.calib_windows, args.calib_context)]
    batches = [int(b) for b in args.batches.split(",")]
    n_tok = max(batches) * args.steps
    xs = mlp_inputs(dense, spread_windows(test, 1, n_tok)[0][None].long())
    cache: dict = {}
    rows = []
    for ratio in (float(r) for r in args.flops_ratios.split(",")):
        models = {"dense": dense}
        for method in args.methods.split(","):
            m = copy.deepcopy(dense)
            apply_rana(m, ratio, calib, method=method, targets="mlp", cache=cache)
            prepare_decode(m)
            models[method] = m
            if method == "rana":  # the same adapters without the decode path
                off = copy.deepcopy(m)
                for mod in off.modules():
                    if hasattr(mod, "fast"):
                        mod.fast = False
                models["rana, masked matmul"] = off
        for batch in batches:
            fns = {name: step_fn(m, xs, batch, args.steps) for name, m in models.items()}
            med = interleaved_medians(fns, args.repeats, 0.3)
            dense_bytes = bytes_read(dense, xs, batch, args.steps)
            for name, m in models.items():
                b = bytes_read(m, xs, batch, args.steps)
                row = {"flops_ratio": ratio, "batch": batch, "method": name,
                       "step_us": 1e6 * med[name] / args.steps, "speedup": med["dense"] / med[name],
                       "bytes": b, "bytes_limit": dense_bytes / b}  # fmt: skip
                row["of_limit"] = row["speedup"] / row["bytes_limit"]
                rows.append(row)
    print("| kept FLOPs | batch | method | step µs (30 MLPs) | × dense | MB read | bytes limit | of limit |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['flops_ratio']:.2f} | {r['batch']} | {r['method']} | {r['step_us']:.0f} | {r['speedup']:.2f} "
              f"| {r['bytes'] / 1e6:.1f} | {r['bytes_limit']:.2f} | {r['of_limit']:.2f} |")  # fmt: skip
    out = {"machine": machine(), "threads": args.threads, "rows": rows, "args": vars(args),
           "seconds": time.perf_counter() - t_start}  # fmt: skip
    if args.json:
        write_json_atomic(args.json, out)
    return out


if __name__ == "__main__":
    main()
