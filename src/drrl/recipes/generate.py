"""``drrl generate``: text from a pretrained model whose keys are cached at rank, streamed as it is produced.

The model (default: the embedded SmolLM2-135M) gets DR-RL attention with calibrated bases (a few windows of the
first half of a corpus's training split, each as long as the prompt and the new tokens unless ``calib_context`` says
otherwise: post-RoPE keys at positions the calibration never saw are poorly served by its basis; on SmolLM2 at
rank 48, bases calibrated on 512-token windows cost a KL of 0.69 nats/token at positions 1792–2048, against 0.07
with 2048-token windows) and a :class:`~drrl.integrations.cache.LowRankCache`:

- ``rank R``: every layer's keys at width R (every query at rank R);
- ``budget B``: a rank per layer that cuts the key-cache bytes by B (keys only; values stay full width), the least
  summed Fisher KL estimate under that cut (:func:`drrl.eval.allocation.cell_allocation` on one cell per layer: each
  layer's output Fisher from one calibration window, its KL at every bucket from one forward pass per bucket);
- neither: full width (the dense model's tokens, through the low-rank cache's code path).

``adapters`` (``--adapters DIR``, a model ``drrl compress`` saved: ``OUT/models/METHOD-RATIO``) puts its RaNA, CATS
or SVD adapters into the model first, with their decode path on (:mod:`drrl.kernels`: a step reads only the rows its
tokens keep).

It ends with one line: prompt tokens, new tokens, decode tokens/s (after the first new token), prefill seconds, and
the cache's bytes (measured from its tensors) against a dense cache of the same tokens.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from drrl.config import require
from drrl.errors import DataError, DrrlError

log = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    prompt: str = ""
    model: str | None = None  # Hugging Face causal LM folder or hub name; None: the embedded SmolLM2-135M
    max_new_tokens: int = 64
    rank: int | None = None  # every layer's key width and query rank
    budget: float | None = None  # key-cache bytes cut, a rank per layer from the Fisher estimates
    temperature: float = 0.0  # 0: greedy
    seed: int = 0
    corpus: str = "shakespeare"  # calibration text (its training split)
    calib_windows: int = 2
    calib_context: int | None = None  # tokens per calibration window; None: the prompt's and new tokens' (≥ 512)
    bucket: int = 8
    adapters: str | None = None  # a `drrl compress` output folder: its adapters replace the model's linears

    def __post_init__(self):
        require(bool(self.prompt.strip()), "prompt", "is empty; pass --prompt TEXT or --prompt-file FILE")
        require(self.max_new_tokens > 0, "max_new_tokens", f"must be a positive integer, got {self.max_new_tokens}")
        require(self.rank is None or self.budget is None, "rank", "and budget exclude each other; pass one")
        require(self.budget is None or 0 <= self.budget < 1, "budget", f"must be in [0, 1), got {self.budget}")
        require(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        for name in ("calib_windows", "bucket"):
            require(getattr(self, name) > 0, name, f"must be a positive integer, got {getattr(self, name)}")
        require(self.calib_context is None or self.calib_context > 0, "calib_context",
                f"must be a positive integer, got {self.calib_context}")  # fmt: skip


class TokenClock:
    """A ``generate`` streamer that records when each new token came (``times``; the first ``put`` is the prompt) and
    passes every ``put`` on to ``out`` (e.g. a TextStreamer that prints them), if given."""

    def __init__(self, out=None):
        self.out, self.times, self.prompt_seen = out, [], False

    def put(self, value):
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
        else:
            self.times.append(time.perf_counter())
        if self.out is not None:
            self.out.put(value)

    def end(self):
        if self.out is not None:
            self.out.end()


def build(cfg: GenerateConfig, context: int):
    """The model calibrated on windows of ``context`` tokens with its rank setting, its tokenizer and the cache
    widths: (model, tokenizer, widths)."""
    from transformers import AutoTokenizer

    from drrl.controllers import TableController, attach_controller
    from drrl.recipes.demo_methods import calibrated_llm

    llm = calibrated_llm(cfg.model, corpus=cfg.corpus, context=context, calib_windows=cfg.calib_windows,
                         test_windows=1, bucket=cfg.bucket, adapters=cfg.adapters)  # fmt: skip
    model, layers = llm.model, llm.layers
    d = layers[0].d_head
    if cfg.rank is not None and not 0 < cfg.rank <= d:
        raise DrrlError(f"rank must be in 1..{d} (the model's head dimension), got {cfg.rank}")
    if cfg.budget is not None:
        table = key_budget_table(model, layers, llm.calib[:1], cfg.budget)
    else:
        table = [[cfg.rank or d]] * len(layers)
    attach_controller(layers, TableController(table))
    tok = AutoTokenizer.from_pretrained(llm.path)
    return model, tok, {i: row[0] for i, row in enumerate(table)}


def key_budget_table(model, layers, windows, budget: float) -> list[list[int]]:
    """One rank per layer (a table row each) cutting Σ_l r_l, i.e. the key-cache bytes, by ``budget``, with the least
    summed Fisher KL estimate: the layers' per-segment estimates pooled into one cell per layer. The Fisher and the
    per-rank passes read (at most) the first 2048 tokens of each window."""
    from drrl.eval.allocation import CellErrors, cell_allocation, fisher_errors, output_fisher

    windows = [w[:2049] for w in windows]
    output_fisher(model, layers, windows)
    errs = fisher_errors(model, layers, windows, layers[0].buckets.tolist())
    total = sum(errs.pairs)
    pooled = [
        [[sum(p * cell[j] for p, cell in zip(errs.pairs, row, strict=True) if math.isfinite(cell[j])) / total
          for j in range(len(errs.ranks))]]
        for row in errs.error
    ]  # fmt: skip
    return cell_allocation(CellErrors(errs.ranks, pooled, [total], errs.forwards), budget)


def rank_tables(model, layers, windows, ranks, budget: float) -> dict[str, list[list[int]]]:
    """The generation benchmarks' rows: ``rank R`` (every layer at R) per rank, and ``alloc@B`` (:func:`key_budget_table`
    on ``windows``) when ``budget`` > 0."""
    tables = {f"rank {r}": [[int(r)]] * len(layers) for r in ranks}
    if budget > 0:
        tables[f"alloc@{100 * budget:g}%"] = key_budget_table(model, layers, windows, budget)
    return tables


def run_generate(cfg: GenerateConfig, *, stream: bool = True) -> dict:
    """Generate from ``cfg.prompt``, printing tokens as they come when ``stream``; returns the text and the
    measurements (``prompt_tokens``, ``new_tokens``, ``decode_tokens_per_s``, ``prefill_s``, ``cache_bytes``,
    ``dense_cache_bytes``, ``widths``, ``calib_context``)."""
    from transformers import AutoConfig, AutoTokenizer, TextStreamer

    from drrl.integrations.cache import LowRankCache
    from drrl.integrations.hf import cache_bytes_per_token, cache_kwarg
    from drrl.integrations.hub import max_positions, resolve_model

    path = resolve_model(cfg.model)
    try:
        tok, mcfg = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DrrlError(f"cannot load the tokenizer of {path!r} ({str(e).splitlines()[0][:120]})") from None
    ids = tok(cfg.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise DataError("the prompt has no tokens; pass some text")
    limit = max_positions(mcfg)
    if limit and ids.shape[1] + cfg.max_new_tokens > limit:
        raise DataError(
            f"the prompt ({ids.shape[1]} tokens) and {cfg.max_new_tokens} new tokens exceed the model's {limit} "
            "positions; shorten the prompt or lower --max-new-tokens"
        )
    heads = getattr(mcfg, "num_attention_heads", None) or getattr(mcfg, "n_head", None)
    width = getattr(mcfg, "hidden_size", None) or getattr(mcfg, "n_embd", None)
    d = getattr(mcfg, "head_dim", None) or (width // heads if width and heads else None)
    if cfg.rank is not None and d and not 0 < cfg.rank <= d:  # before the calibration's forward passes
        raise DrrlError(f"rank must be in 1..{d} (the model's head dimension), got {cfg.rank}")
    context = cfg.calib_context or min(max(512, ids.shape[1] + cfg.max_new_tokens), limit or 10**9)
    model, tok, widths = build(cfg, context)
    cache = LowRankCache(model, widths)
    clock = TokenClock(TextStreamer(tok, skip_prompt=True) if stream else None)
    torch.manual_seed(cfg.seed)
    sample = cfg.temperature > 0
    extra = {"do_sample": True, "temperature": cfg.temperature, "top_k": 0} if sample else {"do_sample": False}
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                             streamer=clock, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                             **{cache_kwarg(): cache}, **extra)  # fmt: skip
    new = out.shape[1] - ids.shape[1]
    times = clock.times
    decode_s = times[-1] - times[0] if len(times) > 1 else 0.0
    n_tokens = out.shape[1] - 1  # the last token is never fed back, so never cached
    bpv = cache.layers[0].keys.element_size()
    return {
        "text": tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True),
        "prompt_tokens": ids.shape[1],
        "new_tokens": new,
        "prefill_s": (times[0] - t0) if times else 0.0,
        "decode_tokens_per_s": (len(times) - 1) / decode_s if decode_s > 0 else float("nan"),
        "cache_bytes": cache.nbytes(),
        "dense_cache_bytes": cache_bytes_per_token(model, None, bpv) * n_tokens,
        "widths": widths,
        "calib_context": context,
    }


def summary(res: dict) -> str:
    """The one line ``drrl generate`` ends with."""
    mb = 2**20
    return (
        f"prompt {res['prompt_tokens']} tokens, {res['new_tokens']} new; decode {res['decode_tokens_per_s']:.1f} "
        f"tokens/s; prefill {res['prefill_s']:.2f} s; cache {res['cache_bytes'] / mb:.2f} MB against "
        f"{res['dense_cache_bytes'] / mb:.2f} MB dense ({res['cache_bytes'] / max(res['dense_cache_bytes'], 1):.2f}×)"
    )
