"""``drrl prune --model``: Q/K channel pruning of a Hugging Face model's Gated DeltaNet layers (Qwen3-Next,
Qwen3.5), one standard checkpoint per selector and ratio, and the table that says what each one costs and buys.

The model is a Hugging Face folder or hub name, or a drrl run of ``model.kind: hf`` (``drrl prune RUN_DIR``). For
each selector and ratio p, a copy of it keeps ⌊d_k (1 − p)⌋ query/key channels per key head
(:func:`drrl.integrations.gated_deltanet.prune_hf`, calibrated once on windows of the calibration corpus's train
split; default: the run's corpus, else the embedded plays) and is measured on held-out windows (``split``) of the
run's corpus, or of the calibration corpus for a Hugging Face model:

- ``ppl`` and ``ppl_ratio`` (over the unpruned model's, same windows);
- ``state_bytes`` / ``state_bytes_ratio``: the recurrent states the model's own cache holds after a prefill
  (summed from its tensors), over the unpruned model's;
- ``decode_tps_b1`` / ``decode_tps_bN`` and their ratios to the unpruned model: greedy ``generate()`` tokens/s
  after the first new token at batch 1 and ``decode_batch``, the two models alternating ``timing_repeats`` times
  (medians), one pruned model per ratio (the first selector that slices);
- ``ppl_scale_kernel`` (or ``ppl_scale_eps``; with ``compare_scales``): the perplexity of the same pruned model at
  the other readout scale (:mod:`drrl.integrations.gated_deltanet`: ``scale="eps"``, the default, keeps the unpruned
  scale through the norms' ε; ``"kernel"`` takes transformers' 1/√d'), what the choice costs;
- ``reload_max_abs_diff``: the saved folder loaded back by plain ``AutoModelForCausalLM.from_pretrained``, the
  largest logit difference from the in-memory pruned model on one held-out window;
- with ``recover``: the same perplexity after LoRA recovery on the fused input projection (``ppl_recovered``).

Writes ``DIR/report.json``, ``DIR/report.md`` and, with ``save``, ``DIR/models/<selector>-<p>``: a Hugging Face folder
(config with ``linear_key_head_dim = d'``, weights, tokenizer) that transformers loads as it loads the original.
"""

from __future__ import annotations

import copy
import logging
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from drrl.data.tokenizer import get_tokenizer
from drrl.data.tokens import load_tokens, spread_windows
from drrl.errors import ConfigError
from drrl.eval.perplexity import evaluate_lm
from drrl.integrations import load_causal_lm
from drrl.integrations.gated_deltanet import (
    LAYOUTS,
    calibrate_hf,
    delta_layers,
    prune_hf,
    recurrent_state_bytes,
    scaled_eps,
)
from drrl.pruning import get_selector, kept_width
from drrl.recipes.generate import TokenClock
from drrl.recipes.prune import PruneConfig
from drrl.train.recovery import lora_recover
from drrl.utils import atomic_dir, check_out_dir, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


def is_hf_run(path: str | Path | None) -> bool:
    """Whether ``path`` is a drrl run (or checkpoint) of a transformers architecture (``model.kind: hf``)."""
    from drrl.train.checkpoint import resolve_checkpoint
    from drrl.train.config import RunConfig

    if not path:
        return False
    try:
        return RunConfig.from_dict(resolve_checkpoint(path).config).model.kind == "hf"
    except Exception:  # not a run at all: the caller's own loader says why
        return False


def load_hf_delta_model(source: str, cfg: PruneConfig) -> dict:
    """The model to prune and where it came from: ``{"model", "tok", "label", "corpus", "context"}`` (the corpus and
    context a drrl run was trained on, else None). ``source`` is a drrl run of ``model.kind: hf`` or a Hugging Face
    folder or hub name; a one-line error when it cannot be loaded, has no Gated DeltaNet layers, or a ratio would
    leave a head no channel."""
    if is_hf_run(source):
        from drrl.api import load
        from drrl.train.config import RunConfig

        wrapped, tok, ckpt = load(source, "cpu")
        run_cfg = RunConfig.from_dict(ckpt.config)
        found = {"model": wrapped.lm, "tok": tok, "label": str(ckpt.path), "context": run_cfg.model.context,
                 "corpus": run_cfg.eval.corpus or run_cfg.data.corpus}  # fmt: skip
    else:
        model, path = load_causal_lm(source, attention_surgery=False)
        found = {"model": model, "tok": get_tokenizer("hf:" + path), "label": path, "context": None, "corpus": None}
    try:
        layers = delta_layers(found["model"])
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    for r in cfg.ratios:  # prune_hf's rule, checked before any work
        try:
            kept_width([m.head_k_dim for m in layers], r)
        except ValueError as e:
            raise ConfigError(f"--ratio: {e}") from None
    found["model"].eval()
    return found


def _state_bytes(model, ids: torch.Tensor) -> int:
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    return recurrent_state_bytes(getattr(out, "past_key_values", None) or out.get("cache"))


def _decode_rate(model, ids: torch.Tensor, new: int) -> float:
    clock = TokenClock()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, streamer=clock, pad_token_id=0)  # fmt: skip
    return ids.shape[0] * (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def _time_decode(dense, pruned, prompts: dict[int, torch.Tensor], new: int, repeats: int) -> dict:
    """{batch: (dense tokens/s, pruned tokens/s)}, medians of ``repeats`` alternating runs (one warm-up each)."""
    out = {}
    for batch, ids in prompts.items():
        runs: dict[str, list[float]] = {"dense": [], "pruned": []}
        for m in (dense, pruned):
            _decode_rate(m, ids, 2)
        for _ in range(repeats):
            for name, m in (("dense", dense), ("pruned", pruned)):
                runs[name].append(_decode_rate(m, ids, new))
        out[batch] = (statistics.median(runs["dense"]), statistics.median(runs["pruned"]))
    return out


def save_hf(model, tok, out: Path) -> Path:
    """``model.save_pretrained`` + the tokenizer into ``out``, all or nothing (a temporary folder renamed)."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if getattr(tok, "hf", None) is not None:  # a transformers tokenizer (drrl.data.tokenizer.HFTokenizer)
            tok.hf.save_pretrained(tmp)
    return out


def _reload_diff(path: Path, model, ids: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return float((back(input_ids=ids).logits - model(input_ids=ids).logits).abs().max())


def run_prune_hf(name_or_dir: str, cfg: PruneConfig, out: str | Path, *, progress: bool = True) -> dict:
    """Prune the Hugging Face model (or drrl run of ``model.kind: hf``) ``name_or_dir`` for every selector × ratio of
    ``cfg``; see the module doc."""
    t0 = time.perf_counter()
    out = Path(out)
    src = load_hf_delta_model(name_or_dir, cfg)
    dense, tok, path = src["model"], src["tok"], src["label"]
    check_out_dir(out)
    corpus = src["corpus"] or cfg.calibration or "shakespeare"  # evaluated on: a run's own corpus, else calibration's
    calib_corpus = cfg.calibration or corpus
    context = cfg.context or src["context"] or 512
    calib_tokens = load_tokens(calib_corpus, "train", tok)
    eval_tokens = load_tokens(corpus, cfg.split, tok)
    if cfg.eval_tokens:
        eval_tokens = eval_tokens[: cfg.eval_tokens + 1]
    train_tokens = None
    if cfg.recover:  # recovery trains on the evaluated corpus's training split (the calibration's, unless told)
        train_tokens = calib_tokens if calib_corpus == corpus else load_tokens(corpus, "train", tok)
    batches = [w.view(1, -1) for w in spread_windows(calib_tokens, cfg.calib_windows, context + 1)]
    window = spread_windows(eval_tokens, 1, context)[0].long()[None]
    prompts = {b: torch.stack(spread_windows(eval_tokens, b, cfg.prompt_tokens)).long() for b in (1, cfg.decode_batch)}

    def ppl(model) -> float:
        return evaluate_lm(model, eval_tokens, context, batch_size=8)["ppl"]

    base_ppl, base_bytes = ppl(dense), _state_bytes(dense, window)
    cal = calibrate_hf(dense, batches, ("acts", "rms", "grads"), rows=cfg.rows, seed=cfg.seed)
    layers = delta_layers(dense)
    log.info("unpruned: ppl %.3f, recurrent state %d bytes per sequence", base_ppl, base_bytes)
    fused = sorted({LAYOUTS[type(m).__name__][0] for m in layers})
    rows, timed = [], {}
    timing_sel = next((s for s in cfg.selectors if not get_selector(s).rotates), cfg.selectors[0])
    for sel in cfg.selectors:
        for ratio in cfg.ratios:
            model = copy.deepcopy(dense)
            info = prune_hf(model, ratio, sel, cal, seed=cfg.seed, rows=cfg.rows, scale=cfg.scale)
            p, nbytes = ppl(model), _state_bytes(model, window)
            row: dict[str, Any] = {"selector": sel, "ratio": ratio, "d_k": info.d_k, "d_keep": info.d_keep, "ppl": p,
                                   "ppl_ratio": p / base_ppl, "state_bytes": nbytes,
                                   "state_bytes_ratio": nbytes / base_bytes}  # fmt: skip
            if cfg.compare_scales and info.d_keep < info.d_k:  # the same model at the other readout scale
                factor = info.d_keep / info.d_k if cfg.scale == "eps" else info.d_k / info.d_keep
                with scaled_eps(model, factor):
                    row[f"ppl_scale_{'kernel' if cfg.scale == 'eps' else 'eps'}"] = ppl(model)
            if cfg.save:
                where = save_hf(model, tok, out / "models" / f"{sel}-{ratio:g}")
                row["reload_max_abs_diff"] = _reload_diff(where, model, window)
            if cfg.recover:
                rec = copy.deepcopy(model)
                rcfg = copy.deepcopy(cfg.recovery)
                rcfg.targets, rcfg.context = tuple(fused), rcfg.context or context
                stats = lora_recover(rec, train_tokens, rcfg, teacher=dense, progress=progress)
                pr = ppl(rec)
                row.update(ppl_recovered=pr, ppl_ratio_recovered=pr / base_ppl, recovery_seconds=stats["seconds"])
                if cfg.save:
                    save_hf(rec, tok, out / "models" / f"{sel}-{ratio:g}-recovered")
            log.info("%s p=%.2f: ppl %.3f (x%.3f), state x%.3f", sel, ratio, p, p / base_ppl, nbytes / base_bytes)
            rows.append(row)
            if sel == timing_sel:
                timed[ratio] = model
    for ratio, model in timed.items():
        t = _time_decode(dense, model, prompts, cfg.new_tokens, cfg.timing_repeats)
        for row in rows:
            if row["ratio"] == ratio:
                for b, (d, p) in t.items():
                    key = "b1" if b == 1 else f"b{b}"
                    row[f"decode_tps_{key}"], row[f"decode_speedup_{key}"] = p, p / d
    result = {
        "model": path, "corpus": corpus, "calibration": calib_corpus, "config": asdict(cfg), "seconds": time.perf_counter() - t0,
        "unpruned": {"ppl": base_ppl, "state_bytes": base_bytes, "d_k": layers[0].head_k_dim,
                     "delta_layers": len(layers), "fused_projection": fused},
        "rows": rows,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", result)
    write_text_atomic(out / "report.md", report_markdown(result))
    return result


def report_markdown(result: dict) -> str:
    base, cfg = result["unpruned"], result["config"]
    rec, b = cfg["recover"], cfg["decode_batch"]
    other = "kernel" if cfg["scale"] == "eps" else "eps"
    nan = float("nan")
    lines = [
        f"# Q/K channel pruning of {result['model']} ({base['delta_layers']} Gated DeltaNet layers)",
        "",
        f"Unpruned: ppl {base['ppl']:.3f} on {result['corpus']} ({cfg['split']}), d_k {base['d_k']}, recurrent state "
        f"{base['state_bytes']:,} bytes per sequence (measured from the cache). {result['machine']}.",
        "",
        f"Readout scale: {cfg['scale']} (`--scale`); the other scale's perplexity beside it.",
        "",
        f"| selector | removed | d' | ppl | × unpruned | ppl, {other} scale |"
        + (" recovered ppl | × unpruned |" if rec else "")
        + f" state bytes | decode b1 tok/s (× unpruned) | decode b{b} tok/s (× unpruned) | reload max abs Δlogit |",
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if rec else "") + "---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        line = (
            f"| {r['selector']} | {r['ratio']:.0%} | {r['d_keep']} | {r['ppl']:.3f} | {r['ppl_ratio']:.3f} "
            f"| {r.get(f'ppl_scale_{other}', r['ppl'] if r['d_keep'] == r['d_k'] else nan):.3f} |"
        )
        if rec:
            line += f" {r['ppl_recovered']:.3f} | {r['ppl_ratio_recovered']:.3f} |"
        line += (
            f" {r['state_bytes_ratio']:.3f}× | {r.get('decode_tps_b1', nan):.1f} ({r.get('decode_speedup_b1', nan):.2f}×)"
            f" | {r.get(f'decode_tps_b{b}', nan):.1f} ({r.get(f'decode_speedup_b{b}', nan):.2f}×)"
            f" | {r.get('reload_max_abs_diff', nan):.1e} |"
        )
        lines.append(line)
    return "\n".join(lines) + "\n"
