"""Forward time per test batch of every method of a `drrl classify` config, side by side in one process.

    python benchmarks/classify_time.py [--config configs/rt-polarity-table.yaml] [--repeats 5] [--out FILE]

Each method's encoder (the embedded all-MiniLM-L6-v2 with that attention) is built and, for drrl/static,
calibrated on 8 training batches as `drrl classify` does; weights are not fine-tuned (time does not depend
on them; an RL controller's policy is untrained, so its decisions cost the same but its ranks differ
from a trained one's). Then, interleaved (A B C ... A B C ...), each method runs every test batch once per
repeat (batches of 32 sentences of equal length), timed with torch.utils.benchmark after a warm-up pass;
the table gives the median of the per-repeat mean ms per batch, and its ratio to full attention.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.utils import benchmark
from transformers import AutoTokenizer

from drrl.attention import calibrating
from drrl.data.sentences import SHUFFLE_SEED, encode_sentences, length_batches
from drrl.data.sentiment import load_sentences
from drrl.eval.machine import machine
from drrl.models.encoder import EncoderClassifier, minilm_dir
from drrl.recipes.classify import ClassifyConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/rt-polarity-table.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = ClassifyConfig.load(args.config)
    path = minilm_dir() if cfg.model is None else cfg.model
    tok = AutoTokenizer.from_pretrained(path)
    ds = load_sentences(cfg.data)
    ids = {}
    for split in ("train", "test"):
        texts, _ = ds.split(split)
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(SHUFFLE_SEED)).tolist()
        ids[split] = encode_sentences(tok, [texts[i] for i in order], cfg.max_len)
    test = [torch.tensor([ids["test"][i] for i in b]) for b in length_batches(ids["test"], cfg.batch_size)]
    calib = length_batches(ids["train"], cfg.batch_size, torch.Generator().manual_seed(0))[: cfg.calib_batches]

    models = {}
    for spec in cfg.methods:
        m = EncoderClassifier.from_bert(path, attention=spec.attention, attention_kwargs=spec.attention_kwargs)
        if spec.attention in ("drrl", "static"):
            with torch.no_grad(), calibrating(m):
                for b in calib:
                    m.encode(torch.tensor([ids["train"][i] for i in b]))
        models[spec.method] = m.eval()

    def run(m):
        def fn():
            for x in test:
                m(x)

        return fn

    fns = {k: run(m) for k, m in models.items()}
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for k, fn in fns.items():
                t = benchmark.Timer("fn()", globals={"fn": fn}).timeit(1).median
                times[k].append(1e3 * t / len(test))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med.get("full", next(iter(med.values())))
    print(f"{machine()}; "
          f"{len(test)} test batches, {args.repeats} interleaved repeats")  # fmt: skip
    print("| method | CPU ms / batch (median) | × full |\n|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {v / base:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "repeats": args.repeats, "ms_per_batch": med, "all": times}, f, indent=1)


if __name__ == "__main__":
    main()
