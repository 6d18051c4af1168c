"""Training throughput of `drrl train` in one process against torchrun data parallelism, same machine.

    python benchmarks/ddp_throughput.py [--config configs/shakespeare-gpt-tiny.yaml] [--steps 40]
                                        [--procs 2] [--repeats 3] [--out FILE] [--set KEY=VALUE ...]

Variants, each a fresh `drrl train` run of the same config and global batch:
  single   1 process with `--procs` threads (train.threads)
  ddp      `torchrun --nproc_per_node PROCS`, 1 thread per process (OMP_NUM_THREADS=1, train.threads=1)
On a GPU machine add `--device cuda`: `single` uses one GPU, `ddp` one GPU per process (NCCL), so the
ratio is the scaling over GPUs.

Throughput is the training tokens/s that `drrl train` logs in metrics.jsonl (time inside training steps
only: start-up, evaluation and checkpoints excluded), over the log intervals after the first (warm-up).
The variants alternate (single, ddp, single, ddp, ...) so machine noise hits both; medians of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from drrl.eval.machine import cpu_name


def run(variant: str, args, out: Path) -> dict:
    sets = [
        f"train.max_steps={args.steps}", f"train.log_every={args.log_every}", "train.eval_every=0",
        "train.checkpoint_every=0", f"train.device={args.device}",
        f"train.threads={1 if variant == 'ddp' else args.procs}", *args.overrides,
    ]  # fmt: skip
    drrl = ["-m", "drrl", "-q", "train", args.config, "--out", str(out), *(a for s in sets for a in ("--set", s))]
    env = dict(os.environ, OMP_NUM_THREADS=str(1 if variant == "ddp" else args.procs))
    if variant == "ddp":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.procs}", *drrl]
    else:
        cmd = [sys.executable, *drrl]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in lines if "tokens_per_s" in r][1:]  # drop the warm-up interval
    final = json.loads((out / "eval.json").read_text())
    return {"tokens_per_s": statistics.mean(tps), "intervals": tps, "val_loss": final["loss"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/shakespeare-gpt-tiny.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--procs", type=int, default=2, help="processes for ddp, threads for single (default: 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    runs: dict[str, list[dict]] = {"single": [], "ddp": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for variant in runs:
                res = run(variant, args, Path(tmp) / f"{variant}-{r}")
                runs[variant].append(res)
                print(f"repeat {r} {variant:6s}: {res['tokens_per_s']:9,.0f} tok/s  val loss {res['val_loss']:.4f}")
    med = {v: statistics.median(x["tokens_per_s"] for x in rs) for v, rs in runs.items()}
    ratio = med["ddp"] / med["single"]
    cuda = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "steps": args.steps,
        "procs": args.procs,
        "device": cuda or f"cpu ({cpu_name()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "runs": runs,
        "median_tokens_per_s": med,
        "ddp_over_single": ratio,
    }
    label = f"{args.procs} GPUs" if cuda else f"{args.procs} procs x 1 thread"
    print(f"median: single {med['single']:,.0f} tok/s, ddp {med['ddp']:,.0f} tok/s ({label}): ratio {ratio:.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
