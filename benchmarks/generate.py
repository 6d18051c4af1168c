"""Generation with keys cached at rank against the dense cache: decode tokens/s, prefill time, cache bytes and quality,
through Hugging Face ``generate()``.

    python benchmarks/generate.py [--lengths 2048,4096,8192] [--batches 1,8] [--new-tokens 128] [--json OUT]

A prompt length whose prompt and new tokens exceed the model's positions is shortened to fit. Model: SmolLM2-135M
(embedded) with DR-RL attention calibrated as in ``drrl generate``: 2 windows of the first half of the training split,
as long as the longest prompt and its new tokens (bases calibrated on shorter windows serve later positions badly). Prompts: windows of the held-out test plays, a different one per sequence of a
batch. Rows, each timed with its own cache: ``dense`` (the unpatched model, transformers' DynamicCache), ``rank R``
(every layer's keys at width R, a fixed rank) and ``alloc@B`` (a rank per layer cutting the key bytes by B, from the
Fisher estimates: ``drrl generate --budget B``). Per row:
  * ``prefill_s`` (the prompt's forward, to the first new token) and ``decode_tokens_per_s`` (batch × steps after the
    first new token over their time; greedy);
  * ``cache_bytes`` measured from the cache's tensors at the end;
  * ``bytes_limit``: (weights + dense cache bytes read per step) / (weights + this row's cache bytes read per step),
    at the mean cached length of the decode steps: the speed-up a memory-bound step could reach;
  * quality against dense: ``greedy_agreement`` (share of the new tokens equal to dense's, position by position: one
    early divergence sends the rest apart), and, teacher-forced on dense's tokens, ``top1_agreement`` (share of
    steps whose argmax is dense's token) and ``mean_kl`` (KL(dense ‖ row) of the next-token distributions).
The variants run one after another per (length, batch); ``--repeats`` alternates them that many times and keeps the
median times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from drrl.controllers import TableController, attach_controller
from drrl.data.tokens import load_tokens, spread_windows
from drrl.eval.machine import machine
from drrl.integrations import LowRankCache, cache_bytes_per_token
from drrl.integrations.hf import cache_kwarg
from drrl.recipes.demo_methods import calibrated_llm
from drrl.recipes.generate import TokenClock, rank_tables
from drrl.utils import write_json_atomic


def _generate(model, ids, new: int, cache):
    clock = TokenClock()
    kw = {cache_kwarg(): cache} if cache is not None else {}
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, streamer=clock, pad_token_id=0, return_dict_in_generate=True,
                             output_logits=True, **kw)  # fmt: skip
    steps = len(clock.times) - 1
    decode = clock.times[-1] - clock.times[0] if steps > 0 else float("nan")
    return out, clock.times[0] - t0, ids.shape[0] * steps / decode


def _cache_nbytes(cache) -> int:
    if isinstance(cache, LowRankCache):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _teacher_forced(model, ids, dense_tokens, dense_logits, cache) -> tuple[float, float]:
    """Along dense's greedy tokens: the mean KL(dense ‖ model) of the next-token distributions, and the share of
    steps whose argmax equals dense's token."""
    kw = {cache_kwarg(): cache}
    kls, hits = [], []
    with torch.no_grad():
        logits = model(ids, use_cache=True, **kw).logits[:, -1]
        for i, dense in enumerate(dense_logits):
            p = F.log_softmax(dense.float(), -1)
            kls.append((p.exp() * (p - F.log_softmax(logits.float(), -1))).sum(-1).mean().item())
            hits.append((logits.argmax(-1) == dense_tokens[:, i]).float().mean().item())
            if i + 1 < len(dense_logits):
                logits = model(dense_tokens[:, i : i + 1], use_cache=True, **kw).logits[:, -1]
    return sum(kls) / len(kls), sum(hits) / len(hits)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face folder or name (default: embedded SmolLM2-135M)")
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--lengths", default="2048,4096,8192", help="prompt lengths in tokens")
    ap.add_argument("--batches", default="1,8", help="batch sizes")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ranks", default="32,48", help="fixed key widths")
    ap.add_argument("--budget", type=float, default=0.4, help="key-bytes cut of the per-layer allocation (0: none)")
    ap.add_argument("--calib-context", type=int, default=None,
                    help="tokens per calibration window (default: the longest prompt and its new tokens)")  # fmt: skip
    ap.add_argument("--calib-windows", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="alternations of the variants (median times)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    from transformers import AutoConfig

    from drrl.integrations.hub import max_positions, resolve_model

    limit = max_positions(AutoConfig.from_pretrained(resolve_model(args.model))) or 10**9
    lengths = [min(int(x), limit - args.new_tokens) for x in args.lengths.split(",")]  # within the model's positions
    context = args.calib_context or max(lengths) + args.new_tokens  # bases that have seen every position generated
    llm = calibrated_llm(args.model, corpus=args.corpus, context=context, calib_windows=args.calib_windows,
                         test_windows=1)  # fmt: skip
    model, layers = llm.model, llm.layers
    d = layers[0].d_head
    tables = rank_tables(model, layers, llm.calib[:1], [r for r in args.ranks.split(",") if r], args.budget)
    from transformers import AutoModelForCausalLM, DynamicCache

    dense_model = AutoModelForCausalLM.from_pretrained(llm.path, dtype=torch.float32, attn_implementation="sdpa").eval()
    weights = sum(p.numel() * p.element_size() for p in dense_model.parameters())
    from drrl.data.tokenizer import get_tokenizer

    test = load_tokens(args.corpus, "test", get_tokenizer("hf:" + llm.path))
    rows = []
    for length in lengths:
        for batch in (int(x) for x in args.batches.split(",")):
            ids = torch.stack(spread_windows(test, batch, length)).long()
            runs: dict[str, list] = {name: [] for name in ["dense", *tables]}
            for _ in range(max(args.repeats, 1)):  # alternate the variants so machine noise hits all of them
                runs["dense"].append((*_generate(dense_model, ids, args.new_tokens, None), None))
                for name, table in tables.items():
                    attach_controller(layers, TableController(table))
                    cache = LowRankCache(model)
                    runs[name].append((*_generate(model, ids, args.new_tokens, cache), cache))
            dense_out = runs["dense"][0][0]
            dense_new = dense_out.sequences[:, length:]
            dense_cache = DynamicCache(config=dense_model.config)
            with torch.no_grad():  # the dense cache's bytes after the same tokens
                dense_model(dense_out.sequences[:, :-1], use_cache=True, **{cache_kwarg(): dense_cache})
            dense_bytes = _cache_nbytes(dense_cache)
            mean_len = length + (args.new_tokens - 1) / 2  # cached tokens a decode step reads, on average
            dense_read = cache_bytes_per_token(model, None, 4) * mean_len * batch
            for name, rs in runs.items():
                out = rs[0][0]
                row = {
                    "length": length, "batch": batch, "method": name,
                    "prefill_s": statistics.median(r[1] for r in rs),
                    "decode_tokens_per_s": statistics.median(r[2] for r in rs),
                }  # fmt: skip
                if name == "dense":
                    row.update(cache_bytes=dense_bytes, cache_ratio=1.0, bytes_limit=1.0, greedy_agreement=1.0,
                               top1_agreement=1.0, mean_kl=0.0)  # fmt: skip
                else:
                    cache = rs[0][3]
                    attach_controller(layers, TableController(tables[name]))
                    read = cache_bytes_per_token(model, cache.widths, 4) * mean_len * batch
                    new = out.sequences[:, length:]
                    kl, top1 = _teacher_forced(model, ids, dense_new, dense_out.logits, LowRankCache(model))
                    row.update(
                        cache_bytes=cache.nbytes(), cache_ratio=cache.nbytes() / dense_bytes,
                        bytes_limit=(weights + dense_read) / (weights + read),
                        greedy_agreement=(new == dense_new).float().mean().item(),
                        top1_agreement=top1, mean_kl=kl,
                        widths=cache.widths,
                    )  # fmt: skip
                row["speedup"] = row["decode_tokens_per_s"] / statistics.median(r[2] for r in runs["dense"])
                rows.append(row)
    print("| prompt | batch | method | prefill s | decode tok/s | × dense | bytes limit | cache × | greedy agreement "
          "| top-1 agreement | KL |")  # fmt: skip
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['length']} | {r['batch']} | {r['method']} | {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.1f} "
              f"| {r['speedup']:.2f} | {r['bytes_limit']:.2f} | {r['cache_ratio']:.3f} | {r['greedy_agreement']:.3f} "
              f"| {r['top1_agreement']:.3f} | {r['mean_kl']:.4f} |")  # fmt: skip
    out = {"machine": machine(), "weights_bytes": weights, "rows": rows, "seconds": time.perf_counter() - t_start,
           "args": vars(args), "head_dim": d}  # fmt: skip
    if args.json:
        write_json_atomic(args.json, out)
    return out


if __name__ == "__main__":
    main()
