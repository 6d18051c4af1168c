"""The three-line Python API: train a run, load it, evaluate it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from drrl.data.tokenizer import Tokenizer, check_vocab, get_tokenizer
from drrl.data.tokens import load_tokens
from drrl.errors import DataError
from drrl.eval.perplexity import evaluate_lm
from drrl.models.gpt import build_model
from drrl.models.lm import CausalLM
from drrl.train.checkpoint import Checkpoint, resolve_checkpoint
from drrl.train.config import RunConfig
from drrl.train.loop import train as _train
from drrl.utils import resolve_device, use_bf16, write_json_atomic


def fit(config: str | Path | RunConfig | None, out: str | Path, overrides: Sequence[str] = (), **kwargs) -> dict:
    """Train from a YAML path (or a :class:`RunConfig`) into ``out``; returns the final evaluation."""
    cfg = config if isinstance(config, RunConfig) else RunConfig.load(config, overrides)
    return _train(cfg, out, **kwargs)


def load(run_or_checkpoint: str | Path, device: str = "cpu") -> tuple[CausalLM, Tokenizer, Checkpoint]:
    """Model (in eval mode), its tokenizer and the checkpoint record of a run or checkpoint folder."""
    ckpt = resolve_checkpoint(run_or_checkpoint)
    cfg = RunConfig.from_dict(ckpt.config)
    tok = get_tokenizer(cfg.data.tokenizer)
    check_vocab(tok, cfg.model.vocab_size)
    model = build_model(cfg.model)
    ckpt.load_model(model)
    return model.to(resolve_device(device)).eval(), tok, ckpt


def evaluate(
    run_or_checkpoint: str | Path,
    *,
    corpus: str | None = None,
    split: str | None = None,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    out: str | Path | None = None,
) -> dict:
    """Perplexity of a trained run; on the kind of device it was trained on, the defaults reproduce the
    run's own final evaluation (``eval.json``)."""
    for name, value in (("--context", context), ("--stride", stride), ("--batch-size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    if out is not None and (Path(out).is_dir() or not Path(out).parent.is_dir()):
        raise DataError(f"--out {out} must be a file path in an existing folder")
    model, tok, ckpt = load(run_or_checkpoint, device)
    cfg = RunConfig.from_dict(ckpt.config)
    max_context = cfg.model.context
    context = context if context is not None else cfg.eval.context or max_context
    if context > max_context:
        raise DataError(
            f"--context {context} exceeds the model's maximum context {max_context}; pass --context <= {max_context}"
        )
    if context < 1:
        raise DataError(f"--context must be a positive integer, got {context}")
    source = "--stride" if stride is not None else "the run's eval.stride"
    stride = stride if stride is not None else cfg.eval.stride
    if stride is not None and not 0 < stride <= context:
        raise DataError(f"{source} must be in 1..context ({context}), got {stride}; pass --stride <= {context}")
    corpus = corpus or cfg.eval.corpus or cfg.data.corpus
    split = split or cfg.eval.split
    tokens = load_tokens(corpus, split, tok)
    if len(tokens) < 2:
        raise DataError(f"corpus {corpus} split {split} has fewer than 2 tokens; nothing to evaluate")
    dev = next(model.parameters()).device
    batch_size = batch_size if batch_size is not None else cfg.eval.batch_size
    if batch_size < 1:
        raise DataError(f"--batch-size must be a positive integer, got {batch_size}")
    result = evaluate_lm(
        model,
        tokens,
        context,
        stride=stride,
        batch_size=batch_size,
        device=dev,
        bf16=use_bf16(cfg.train.precision, dev),
    )
    result.update(corpus=corpus, split=split, step=ckpt.step, checkpoint=str(ckpt.path))
    if out is not None:
        write_json_atomic(out, result)
    return result
