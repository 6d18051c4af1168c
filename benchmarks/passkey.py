"""Passkey retrieval with keys cached at rank: a number hidden at several depths of long filler text, answered greedily
through ``generate()``, for the dense model and each low-rank row (the check users of KV-cache compression run).

    python benchmarks/passkey.py [--lengths 2048,4096,8192] [--depths 0.1,0.5,0.9] [--keys 2] [--json OUT]

The prompt is the classic one: repeated filler sentences ("The grass is green. The sky is blue. ..."), with "The pass
key is N. Remember it. N is the pass key." inserted at a depth (a fraction of the filler), then "What is the pass
key? The pass key is" (a prompt is shortened so that it and the 8 answer tokens fit the model's positions). A trial
passes when the first 8 greedy tokens contain N. Rows as in ``benchmarks/generate.py`` (dense, a fixed key width per
``--ranks``, the per-layer allocation at ``--budget``), calibrated the same way (windows as long as the longest prompt).
Beside the scores, each row's perplexity on one held-out window of the calibration's length (the test plays), through
the same ranks (a forward pass runs each segment at the rank a cached decode reads it at).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from drrl.controllers import TableController, attach_controller
from drrl.eval.machine import machine
from drrl.eval.perplexity import evaluate_lm
from drrl.integrations import LowRankCache
from drrl.integrations.hf import cache_kwarg
from drrl.recipes.demo_methods import calibrated_llm
from drrl.recipes.generate import rank_tables
from drrl.utils import write_json_atomic

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


def prompt_ids(tok, length: int, depth: float, key: int) -> torch.Tensor:
    """Token ids of about ``length`` tokens with the pass key at ``depth`` of the filler."""
    needle = tok(f" The pass key is {key}. Remember it. {key} is the pass key. ").input_ids
    question = tok(" " + QUESTION).input_ids
    unit = tok(FILLER).input_ids
    n_fill = max(length - len(needle) - len(question), len(unit))
    filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
    at = int(depth * n_fill)
    return torch.tensor([filler[:at] + needle + filler[at:] + question])


def answer(model, ids, cache, tok) -> str:
    kw = {cache_kwarg(): cache} if cache is not None else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.eos_token_id, **kw)  # fmt: skip
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face folder or name (default: embedded SmolLM2-135M)")
    ap.add_argument("--corpus", default="shakespeare", help="calibration corpus")
    ap.add_argument("--lengths", default="2048,4096,8192", help="prompt lengths in tokens")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="where the key sits, as fractions of the filler")
    ap.add_argument("--keys", type=int, default=2, help="random 5-digit keys per (length, depth)")
    ap.add_argument("--ranks", default="32,48", help="fixed key widths")
    ap.add_argument("--budget", type=float, default=0.4, help="key-bytes cut of the per-layer allocation (0: none)")
    ap.add_argument("--calib-context", type=int, default=None,
                    help="tokens per calibration window (default: the longest prompt and its answer)")  # fmt: skip
    ap.add_argument("--calib-windows", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    from transformers import AutoConfig

    from drrl.integrations.hub import max_positions, resolve_model

    limit = max_positions(AutoConfig.from_pretrained(resolve_model(args.model))) or 10**9
    lengths = [min(int(x), limit - 8) for x in args.lengths.split(",")]  # the 8 answer tokens within the positions
    context = args.calib_context or max(lengths) + 8  # bases that have seen every position the answer reaches
    llm = calibrated_llm(args.model, corpus=args.corpus, context=context, calib_windows=args.calib_windows,
                         test_windows=1)  # fmt: skip
    model, layers = llm.model, llm.layers
    tables = rank_tables(model, layers, llm.calib[:1], [r for r in args.ranks.split(",") if r], args.budget)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm.path)
    dense = AutoModelForCausalLM.from_pretrained(llm.path, dtype=torch.float32, attn_implementation="sdpa").eval()
    rng = random.Random(0)
    trials = []
    for length in lengths:
        for depth in (float(x) for x in args.depths.split(",")):
            for _ in range(args.keys):
                key = rng.randint(10000, 99999)
                ids = prompt_ids(tok, length, depth, key)
                got = {"dense": answer(dense, ids, None, tok)}
                for name, table in tables.items():
                    attach_controller(layers, TableController(table))
                    got[name] = answer(model, ids, LowRankCache(model), tok)
                trials.append({"length": length, "depth": depth, "key": key, "tokens": ids.shape[1],
                               "answers": got, "passed": {n: str(key) in a for n, a in got.items()}})  # fmt: skip
    methods = ["dense", *tables]
    ppl = {"dense": evaluate_lm(dense, llm.test[:1], batch_size=1)["ppl"]}
    for name, table in tables.items():
        attach_controller(layers, TableController(table))
        ppl[name] = evaluate_lm(model, llm.test[:1], batch_size=1)["ppl"]
    rows = []
    for length in sorted({t["length"] for t in trials}):
        at = [t for t in trials if t["length"] == length]
        rows.append({"length": length, "trials": len(at),
                     **{m: sum(t["passed"][m] for t in at) / len(at) for m in methods}})  # fmt: skip
    print("| prompt tokens | trials | " + " | ".join(methods) + " |")
    print("|---:|---:|" + "---:|" * len(methods))
    for r in rows:
        print(f"| {r['length']} | {r['trials']} | " + " | ".join(f"{r[m]:.2f}" for m in methods) + " |")
    print(f"| perplexity ({len(llm.test[0]) - 1} tokens) | | " + " | ".join(f"{ppl[m]:.2f}" for m in methods) + " |")
    out = {"machine": machine(), "rows": rows, "perplexity": ppl, "trials": trials, "seconds": time.perf_counter() - t_start,
           "args": vars(args)}  # fmt: skip
    if args.json:
        write_json_atomic(args.json, out)
    return out


if __name__ == "__main__":
    main()
