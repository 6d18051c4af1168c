"""Generation with keys cached at rank against the dense cache: decode tokens/s, prefill time, cache bytes and quality,
through Hugging Face ``generate()``.

    python benchmarks/generate.py [--lengths 2048,4096,8192] [--batches 1,8] [--new-tokens 128] [--replicate]
                                  [--repeats N] [--json OUT]

A prompt length whose prompt and new tokens exceed the model's positions is shortened to fit. Model: SmolLM2-135M
(embedded) with DR-RL attention calibrated as in ``drrl generate``: 2 windows of the first half of the training split,
as long as the longest prompt and its new tokens (bases calibrated on shorter windows serve later positions badly). Prompts: windows of the held-out test plays, a different one per sequence of a
batch. Rows, each timed with its own cache: ``dense`` (the unpatched model, transformers' DynamicCache), ``rank R``
(every layer's keys at width R, a fixed rank) and ``alloc@B`` (a rank per layer cutting the key bytes by B, from the
Fisher estimates: ``drrl generate --budget B``). Per row:
  * ``prefill_s`` (the prompt's forward, to the first new token) and ``decode_tokens_per_s`` (batch × steps after the
    first new token over their time; greedy);
  * ``cache_bytes`` measured from the cache's tensors at the end (the cached tokens; ``cache_allocated_bytes``
    with the room LowRankCache keeps for up to 256 more);
  * ``bytes_limit``: (weights + dense cache bytes read per step) / (weights + this row's cache bytes read per step),
    at the mean cached length of the decode steps: the speed-up a memory-bound step could reach, and ``of_limit``,
    the measured speed-up (decode tokens/s over dense's) as a share of it;
  * ``vs_full_width`` and ``of_limit_vs_full_width``: the same against the row whose rank equals head_dim (our
    cache and attention at full width, the control: dense's own step is not at its bytes limit, since
    transformers' DynamicCache copies the whole cache at every step and CPU SDPA reads one query's keys slower
    than a matmul does, so a speed-up over dense can exceed the bytes limit);
  * quality against dense: ``greedy_agreement`` (share of the new tokens equal to dense's, position by position: one
    early divergence sends the rest apart), and, teacher-forced on dense's tokens, ``top1_agreement`` (share of
    steps whose argmax is dense's token) and ``mean_kl`` (KL(dense ‖ row) of the next-token distributions).
The variants run one after another per (length, batch); ``--repeats`` alternates them that many times and keeps the
median times. ``--replicate``: a batch above 1 prefills one prompt at batch 1 and repeats its cache along the batch
before ``generate`` decodes the copies, so the decode reads a batch's cache without a batch's prefill (eight 8k
prefills take most of an hour on 2 cores); the decode's bytes and time do not depend on which tokens are cached, and
those rows leave the quality columns to batch 1.
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


def _generate(model, ids, new: int, cache, batch: int | None = None, keep_logits: bool = False) -> dict:
    """Greedy generation of ``new`` tokens into ``cache``; with ``batch``, ``ids`` (one prompt) is prefilled at batch 1
    and its cache repeated ``batch`` times before ``generate`` decodes the copies (prefill time: that forward and the
    first new token). Returns the tokens, dense logits if asked, the times and the cache's bytes (the cache itself
    is dropped: at 8k tokens and batch 8 a dense cache is 3 GB)."""
    clock = TokenClock()
    kw = {cache_kwarg(): cache}
    t0 = time.perf_counter()
    with torch.no_grad():
        if batch is not None:
            model(ids[:, :-1], use_cache=True, logits_to_keep=1, **kw)
            cache.batch_repeat_interleave(batch)
            ids = ids.expand(batch, -1)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, streamer=clock, pad_token_id=0, return_dict_in_generate=True,
                             output_logits=keep_logits, **kw)  # fmt: skip
    steps = len(clock.times) - 1
    decode = clock.times[-1] - clock.times[0] if steps > 0 else float("nan")
    return {
        "sequences": out.sequences, "logits": out.logits if keep_logits else None,
        "prefill_s": clock.times[0] - t0, "tokens_per_s": ids.shape[0] * steps / decode,
        "cache_bytes": _cache_nbytes(cache), "widths": getattr(cache, "widths", None),
        "cache_allocated_bytes": cache.allocated_bytes() if isinstance(cache, LowRankCache) else _cache_nbytes(cache),
    }  # fmt: skip


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
        logits = model(ids, use_cache=True, logits_to_keep=1, **kw).logits[:, -1]
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
    ap.add_argument("--ranks", default="32,48,64",
                    help="fixed key widths (one equal to head_dim is the full-width control)")  # fmt: skip
    ap.add_argument("--budget", type=float, default=0.4, help="key-bytes cut of the per-layer allocation (0: none)")
    ap.add_argument("--calib-context", type=int, default=None,
                    help="tokens per calibration window (default: the longest prompt and its new tokens)")  # fmt: skip
    ap.add_argument("--calib-windows", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="alternations of the variants (median times)")
    ap.add_argument("--replicate", action="store_true",
                    help="a batch above 1 decodes copies of one prompt prefilled at batch 1 (decode timing and bytes; "
                         "quality columns come from batch 1): batch 8 at 8k tokens without eight 8k prefills")  # fmt: skip
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
            replicate = args.replicate and batch > 1
            ids = torch.stack(spread_windows(test, 1 if replicate else batch, length)).long()
            runs: dict[str, list[dict]] = {name: [] for name in ["dense", *tables]}
            for _ in range(max(args.repeats, 1)):  # alternate the variants so machine noise hits all of them
                for name in runs:
                    if name == "dense":
                        m, cache = dense_model, DynamicCache(config=dense_model.config)
                    else:
                        attach_controller(layers, TableController(tables[name]))
                        m, cache = model, LowRankCache(model)
                    keep = name == "dense" and not runs[name] and not replicate
                    runs[name].append(_generate(m, ids, args.new_tokens, cache, batch if replicate else None, keep))
                    del cache
            dense = runs["dense"][0]
            mean_len = length + (args.new_tokens - 1) / 2  # cached tokens a decode step reads, on average
            dense_read = cache_bytes_per_token(model, None, 4) * mean_len * batch
            dense_tps = statistics.median(r["tokens_per_s"] for r in runs["dense"])
            for name, rs in runs.items():
                row = {
                    "length": length, "batch": batch, "method": name, "replicated": replicate,
                    "prefill_s": statistics.median(r["prefill_s"] for r in rs),
                    "decode_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                    "cache_bytes": rs[0]["cache_bytes"], "cache_ratio": rs[0]["cache_bytes"] / dense["cache_bytes"],
                    "cache_allocated_bytes": rs[0]["cache_allocated_bytes"],
                }  # fmt: skip
                row["speedup"] = row["decode_tokens_per_s"] / dense_tps
                if name == "dense":
                    row.update(bytes_limit=1.0)
                    if not replicate:
                        row.update(greedy_agreement=1.0, top1_agreement=1.0, mean_kl=0.0)
                else:
                    read = cache_bytes_per_token(model, rs[0]["widths"], 4) * mean_len * batch
                    row.update(bytes_limit=(weights + dense_read) / (weights + read), widths=rs[0]["widths"])
                    if not replicate:  # copies of one prompt: the quality is batch 1's
                        attach_controller(layers, TableController(tables[name]))
                        dense_new = dense["sequences"][:, length:]
                        kl, top1 = _teacher_forced(model, ids, dense_new, dense["logits"], LowRankCache(model))
                        row.update(greedy_agreement=(rs[0]["sequences"][:, length:] == dense_new).float().mean().item(),
                                   top1_agreement=top1, mean_kl=kl)  # fmt: skip
                row["of_limit"] = row["speedup"] / row["bytes_limit"]
                rows.append(row)
            full = next((r for r in rows[-len(runs) :] if r["method"] == f"rank {d}"), None)
            for r in rows[-len(runs) :] if full else []:  # against our own cache and attention at full width
                r["vs_full_width"] = r["decode_tokens_per_s"] / full["decode_tokens_per_s"]
                r["of_limit_vs_full_width"] = r["vs_full_width"] / r["bytes_limit"]
    print("| prompt | batch | method | prefill s | decode tok/s | × dense | × full width | bytes limit | of limit "
          "| of limit (full width) | cache × | greedy agreement | top-1 agreement | KL |")  # fmt: skip
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        q = [f"{r[k]:.4f}" if k in r else "—" for k in ("greedy_agreement", "top1_agreement", "mean_kl")]
        f = [f"{r[k]:.2f}" if k in r else "—" for k in ("vs_full_width", "of_limit_vs_full_width")]
        print(f"| {r['length']} | {r['batch']}{' (copies)' if r['replicated'] else ''} | {r['method']} "
              f"| {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.1f} | {r['speedup']:.2f} | {f[0]} "
              f"| {r['bytes_limit']:.2f} | {r['of_limit']:.2f} | {f[1]} | {r['cache_ratio']:.3f} | {' | '.join(q)} |")  # fmt: skip
    out = {"machine": machine(), "weights_bytes": weights, "rows": rows, "seconds": time.perf_counter() - t_start,
           "args": vars(args), "head_dim": d}  # fmt: skip
    if args.json:
        write_json_atomic(args.json, out)
    return out


if __name__ == "__main__":
    main()
