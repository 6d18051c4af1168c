"""How long the calibration windows must be: the KL of a fixed-rank model against dense, by position, for bases
calibrated on windows of different lengths (post-RoPE keys at positions the calibration never saw).

    python benchmarks/calibration_length.py [--rank 48] [--calib-lengths 512,2048] [--length 2048] [--json OUT]

SmolLM2-135M (embedded), bases from 2 windows of the first half of the training split at each calibration length,
every layer at ``--rank``; one held-out test window of ``--length`` tokens; KL(dense ‖ low rank) of the next-token
distributions averaged over bins of 256 positions.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from drrl.controllers import TableController, attach_controller
from drrl.data.tokenizer import get_tokenizer
from drrl.data.tokens import load_tokens, spread_windows
from drrl.eval.machine import machine
from drrl.recipes.demo_methods import calibrated_llm
from drrl.utils import write_json_atomic


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face folder or name (default: embedded SmolLM2-135M)")
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--rank", type=int, default=48)
    ap.add_argument("--calib-lengths", default="512,2048", help="calibration window lengths")
    ap.add_argument("--length", type=int, default=2048, help="tokens of the held-out window")
    ap.add_argument("--bin", type=int, default=256, help="positions per reported bin")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows, dense_lp, ids = [], None, None
    for calib in (int(x) for x in args.calib_lengths.split(",")):
        llm = calibrated_llm(args.model, corpus=args.corpus, context=calib, calib_windows=2, test_windows=1)
        model, layers = llm.model, llm.layers
        if ids is None:
            test = load_tokens(args.corpus, "test", get_tokenizer("hf:" + llm.path))
            ids = spread_windows(test, 1, args.length)[0][None].long()
            attach_controller(layers, TableController([[layers[0].r_max]] * len(layers)))  # full rank: dense
            with torch.no_grad():
                dense_lp = F.log_softmax(model(ids).logits.float(), -1)
        attach_controller(layers, TableController([[args.rank]] * len(layers)))
        with torch.no_grad():
            lp = F.log_softmax(model(ids).logits.float(), -1)
        kl = (dense_lp.exp() * (dense_lp - lp)).sum(-1)[0]
        bins = [kl[i : i + args.bin].mean().item() for i in range(0, len(kl), args.bin)]
        rows.append({"calib_length": calib, "rank": args.rank, "kl_by_bin": bins, "kl": kl.mean().item()})
    print("| calibration windows | " + " | ".join(f"{i}–{i + args.bin}" for i in range(0, args.length, args.bin))
          + " | all |")  # fmt: skip
    print("|---:|" + "---:|" * (len(rows[0]["kl_by_bin"]) + 1))
    for r in rows:
        print(f"| {r['calib_length']} | " + " | ".join(f"{b:.3f}" for b in r["kl_by_bin"]) + f" | {r['kl']:.3f} |")
    out = {"machine": machine(), "rows": rows, "seconds": time.perf_counter() - t0, "args": vars(args)}
    if args.json:
        write_json_atomic(args.json, out)
    return out


if __name__ == "__main__":
    main()
