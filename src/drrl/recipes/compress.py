"""``drrl compress``: fit RaNA adapters or a baseline to a pretrained model at FLOP budgets and report.

Causal LMs (default: the embedded SmolLM2-135M) are scored by perplexity; encoders (``minilm``: the
embedded all-MiniLM-L6-v2, or a BERT folder) by the cosine of their mean-pooled sentence embeddings to
the dense model's (``cosine`` instead of ``ppl``).

For each method (rana, cats, svd) and kept FLOPs fraction F of the adapted layers (0.56 = 44% fewer):
fit on calibration windows of the training split, then measure on held-out windows of the test split

- ``ppl``: perplexity (batch 1 windows, the same windows for every row);
- ``flops_reduction``: 1 − the adapted layers' executed FLOPs over dense, counted during that evaluation;
- ``mlp_rel_error``: mean over layers of ‖MLP(x) − MLP̂(x)‖² / ‖MLP(x)‖² on held-out MLP inputs of the dense
  model (each layer fed the dense model's activations);
- ``decode_speedup``: batch-1, one-token time of every layer's dense MLP over the adapted MLP (decode fast
  paths on), on held-out tokens, medians of interleaved ``torch.utils.benchmark`` measurements.

Writes ``DIR/report.json`` (``{"rows": [{"method", "flops_ratio", "flops_reduction", "mlp_rel_error", "ppl",
"decode_speedup", ...}]}``), ``DIR/report.md`` and, with ``save``, each adapted model under
``DIR/models/<method>-<F>`` (reload with :func:`drrl.adapters.export.load_adapted`).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from drrl.adapters import METHODS, apply_rana, find_sites, measured_flops, prepare_decode, reset_counts
from drrl.adapters.export import save_adapted
from drrl.config import FieldError, require
from drrl.errors import ConfigError
from drrl.eval.machine import machine
from drrl.eval.perplexity import evaluate_lm
from drrl.utils import check_out_dir, resolve_device, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class CompressConfig:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    flops_ratios: list[float] = field(default_factory=lambda: [0.56])  # kept fraction of the adapted layers' FLOPs
    model: str | None = None  # Hugging Face causal LM folder or hub name; None: the embedded SmolLM2-135M
    trust_remote_code: bool = False  # let a hub model run its own Python code (only for models you trust)
    targets: str = "mlp+qkv"  # mlp | mlp+qkv
    calibration: str | None = None  # train split fits the adapters (default: shakespeare; encoders: rt-polarity)
    corpus: str | None = None  # test split evaluates them (default: as calibration)
    context: int = 512  # tokens per window (encoders: maximum sentence length)
    calib_windows: int = 16
    eval_windows: int = 8
    calib_sentences: int = 2048  # encoders: calibration sentences (batches of 32 of equal length)
    eval_sentences: int = 1024  # encoders: test sentences for the embedding cosine
    sample_tokens: int = 2048  # input rows per linear for thresholds and allocations (Grams use every token)
    score_tokens: int = 512  # of those, rows that score the MLP budget splits
    error_tokens: int = 512  # held-out tokens per layer for mlp_rel_error
    decode_tokens: int = 16  # held-out tokens per layer in the decode timing
    timing_repeats: int = 5
    recover_steps: int = 0  # > 0: LoRA recovery (peft) of each adapted LM's remaining linear layers, then ppl again
    recover_lr: float = 2.5e-4
    save: bool = True
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        require(bool(self.methods), "methods", "must list at least one method")
        for m in self.methods:
            require(m in METHODS, "methods", f"must be among {', '.join(METHODS)}, got {m!r}")
        require(bool(self.flops_ratios), "flops_ratios", "must list at least one ratio")
        for f in self.flops_ratios:
            require(0 < f <= 1, "flops_ratios", f"are kept fractions of the adapted layers' FLOPs in (0, 1], got {f}")
        require(self.targets in ("mlp", "mlp+qkv"), "targets", f"must be mlp or mlp+qkv, got {self.targets!r}")
        if self.calibration is None:
            self.calibration = "rt-polarity" if is_encoder(self.model) else "shakespeare"
        if self.corpus is None:
            self.corpus = self.calibration
        for name in ("context", "calib_windows", "eval_windows", "calib_sentences", "eval_sentences", "sample_tokens",
                     "score_tokens", "error_tokens", "decode_tokens", "timing_repeats"):  # fmt: skip
            require(getattr(self, name) > 0, name, f"must be a positive integer, got {getattr(self, name)}")
        require(self.recover_steps >= 0, "recover_steps", f"must be >= 0, got {self.recover_steps}")
        require(self.recover_lr > 0, "recover_lr", f"must be > 0, got {self.recover_lr}")
        require(
            not (self.recover_steps and is_encoder(self.model)),
            "recover_steps",
            "applies to causal LMs only (recovery trains on next-token loss); drop it for encoders",
        )
        try:
            resolve_device(self.device)
        except ConfigError as e:
            raise FieldError("device", f"is not usable: {e}") from None


# ------------------------------------------------------------------------------------------ measurements


@dataclass
class MLPProbe:
    """One MLP's held-out inputs ``x`` and dense outputs ``y``, and how to run it in a (possibly adapted) model."""

    name: str
    kind: str
    paths: tuple[str, ...]  # plain MLPs: (fc, out) module paths
    act: object
    x: torch.Tensor
    y: torch.Tensor

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gated":  # the whole MLP module (a neuron adapter replaces it wholesale)
            return model.get_submodule(self.name)(x)
        fc, out = (model.get_submodule(p) for p in self.paths)
        return out(self.act(fc(x)))


@torch.no_grad()
def mlp_probes(model: nn.Module, batch, n: int) -> list[MLPProbe]:
    """Inputs and outputs (first ``n`` tokens) of every MLP of the dense ``model`` on one batch."""
    from drrl.adapters.sites import _forward

    mlps, _ = find_sites(model)
    names = {id(m): k for k, m in model.named_modules()}
    probes, hooks = [], []
    for s in mlps:
        paths = tuple(f"{names[id(p)]}.{a}".lstrip(".") for p, a in s.linears.values())
        probe = MLPProbe(s.name, s.kind, paths, s.act, torch.empty(0), torch.empty(0))
        probes.append(probe)
        if s.kind == "gated":
            mods = (model.get_submodule(s.name),) * 2
        else:
            mods = (model.get_submodule(paths[0]), model.get_submodule(paths[-1]))

        def grab_x(m, a, p=probe):
            p.x = a[0].reshape(-1, a[0].shape[-1])[:n].clone()

        def grab_y(m, a, o, p=probe):
            p.y = o.reshape(-1, o.shape[-1])[:n].clone()

        hooks += [mods[0].register_forward_pre_hook(grab_x), mods[1].register_forward_hook(grab_y)]
    try:
        _forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return probes


@torch.no_grad()
def mlp_rel_error(model: nn.Module, probes: list[MLPProbe]) -> float:
    """Mean over layers of ‖MLP(x) − MLP̂(x)‖² / ‖MLP(x)‖² on the probes' dense inputs."""
    return statistics.mean(
        float((p.run(model, p.x[None])[0] - p.y).square().sum() / p.y.square().sum()) for p in probes
    )


@torch.no_grad()
def decode_speedup(dense: nn.Module, adapted: nn.Module, probes: list[MLPProbe], n_tokens: int, repeats: int) -> dict:
    """Batch-1 one-token MLP time, dense over adapted, every layer, interleaved repeats (medians)."""
    from drrl.eval.timing import interleaved_medians

    prepare_decode(adapted)
    toks = [[p.x[i].view(1, 1, -1).contiguous() for i in range(min(n_tokens, len(p.x)))] for p in probes]

    def run(model):
        def step():  # token-major, as decoding runs: every layer's weights leave the cache before their next use
            for i in range(max(len(xs) for xs in toks)):
                for p, xs in zip(probes, toks, strict=True):
                    p.run(model, xs[i])

        return step

    fns = {"dense": run(dense), "adapted": run(adapted)}
    med = interleaved_medians(fns, repeats, 0.3)
    reset_counts(adapted)
    n_calls = sum(len(xs) for xs in toks)
    d, a = med["dense"], med["adapted"]
    return {"dense_us": 1e6 * d / n_calls, "adapted_us": 1e6 * a / n_calls, "speedup": d / a}


@torch.no_grad()
def embedding_cosine(dense: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean cosine similarity of mean-pooled sentence embeddings, adapted against dense (encoders)."""
    import torch.nn.functional as F

    cos = [F.cosine_similarity(model.embed(b), dense.embed(b), dim=-1) for b in batches]
    return float(torch.cat(cos).mean())


def perplexity(model: nn.Module, windows: list[torch.Tensor], device) -> float:
    """Perplexity over ``windows`` (batch 1): :func:`drrl.eval.perplexity.evaluate_lm`."""
    return evaluate_lm(model, windows, batch_size=1, device=device, set_eval=False)["ppl"]


# ------------------------------------------------------------------------------------------ the job


ENCODER_ALIASES = ("minilm", "all-minilm-l6-v2")


def is_encoder(model: str | None) -> bool:
    """``minilm`` (the embedded all-MiniLM-L6-v2) or a local BERT folder: sentence-embedding mode."""
    if model is None:
        return False
    if model in ENCODER_ALIASES:
        return True
    cfg = Path(model) / "config.json"
    if cfg.is_file():
        import json

        return json.loads(cfg.read_text()).get("model_type") == "bert"
    return False


def _encoder_data(cfg: CompressConfig, path: Path, device):
    from transformers import AutoTokenizer

    from drrl.data.sentences import encode_sentences, length_batches
    from drrl.data.sentiment import load_sentences

    tok = AutoTokenizer.from_pretrained(path)

    def batches(spec: str, split: str, n: int) -> list[torch.Tensor]:
        texts, _ = load_sentences(spec).split(split)
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        ids = encode_sentences(tok, [texts[i] for i in order[:n]], cfg.context)
        return [torch.tensor([ids[i] for i in b], device=device) for b in length_batches(ids, 32)]

    return batches(cfg.calibration, "train", cfg.calib_sentences), batches(cfg.corpus, "test", cfg.eval_sentences)


def run_compress(cfg: CompressConfig, out: str | Path, quiet: bool = False) -> dict:
    """Fit every (method, ratio) of ``cfg`` on a fresh copy of the model and measure it; writes the report."""
    from drrl.data import get_tokenizer, load_tokens, spread_windows
    from drrl.progress import progress

    out = Path(out)
    check_out_dir(out)  # a bad --out fails now, not after minutes of work
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    encoder = is_encoder(cfg.model)
    rec_tokens = None  # LoRA recovery data (causal LMs)
    if encoder:
        from drrl.models.encoder import EncoderClassifier, minilm_dir

        path = minilm_dir() if cfg.model in ENCODER_ALIASES else Path(cfg.model)
        dense = EncoderClassifier.from_bert(path, dropout=0.0).eval().to(device)
        calib, evalb = _encoder_data(cfg, path, device)
        probes = mlp_probes(dense, evalb[0], cfg.error_tokens)

        def quality(model) -> dict:
            return {"cosine": embedding_cosine(dense, model, evalb)}

    else:
        from drrl.integrations.hub import load_causal_lm

        dense, path = load_causal_lm(cfg.model, trust_remote_code=cfg.trust_remote_code)
        dense.to(device)
        tok = get_tokenizer("hf:" + path, trust_remote_code=cfg.trust_remote_code)
        L = cfg.context + 1
        calib = [w[None, :-1] for w in spread_windows(load_tokens(cfg.calibration, "train", tok), cfg.calib_windows, L)]
        evalw = spread_windows(load_tokens(cfg.corpus, "test", tok), cfg.eval_windows, L)
        probes = mlp_probes(dense, evalw[0][None, :-1].to(device), cfg.error_tokens)
        dense_ppl = perplexity(dense, evalw, device)
        rec_tokens = load_tokens(cfg.calibration, "train", tok) if cfg.recover_steps else None

        def quality(model) -> dict:
            ppl = perplexity(model, evalw, device)
            return {"ppl": ppl, "ppl_ratio": ppl / dense_ppl}

    rows = [{"method": "dense", "flops_ratio": 1.0, "flops_reduction": 0.0, "mlp_rel_error": 0.0,
             "decode_speedup": 1.0, **quality(dense)}]  # fmt: skip
    jobs = [(m, f) for f in cfg.flops_ratios for m in cfg.methods]
    cache: dict = {}  # calibration statistics and bases: shared by every job (copies of one model, same data)
    for method, ratio in progress(jobs, desc="compress", unit="model", disable=quiet):
        rows.append(_compress_one(dense, method, ratio, calib, probes, quality, cache, rec_tokens, cfg, out, quiet))
    report = {
        "config": asdict(cfg),
        "model": str(path),
        "kind": "encoder" if encoder else "causal-lm",
        "machine": machine(device),
        "seconds": time.perf_counter() - t_start,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_report(report))
    return report


def _compress_one(dense, method, ratio, calib, probes, quality, cache, rec_tokens, cfg: CompressConfig, out: Path,
                  quiet: bool) -> dict:  # fmt: skip
    """One report row: fit ``method`` at ``ratio`` on a fresh copy of ``dense``, then measure (and recover, save)."""
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    try:
        rep = apply_rana(model, ratio, calib, method=method, targets=cfg.targets, sample_tokens=cfg.sample_tokens,
                         score_tokens=cfg.score_tokens, seed=cfg.seed, progress=not quiet, cache=cache)  # fmt: skip
    except ValueError as e:
        log.warning("%s at %.2f: %s", method, ratio, e)
        return {"method": method, "flops_ratio": ratio, "error": str(e)}
    fit_s = time.perf_counter() - t0
    q = quality(model)
    fl = measured_flops(model, rep)  # counted on the held-out data
    err = mlp_rel_error(model, probes)
    reset_counts(model)
    dec = decode_speedup(dense, model, probes, cfg.decode_tokens, cfg.timing_repeats)
    row = {
        "method": method, "flops_ratio": ratio, "flops_reduction": 1 - fl["ratio"], "mlp_rel_error": err,
        **q, "decode_speedup": dec["speedup"], "decode_dense_us": dec["dense_us"],
        "decode_adapted_us": dec["adapted_us"], "fit_seconds": fit_s, "targets": cfg.targets,
    }  # fmt: skip
    if cfg.recover_steps:
        row.update(recover(model, rec_tokens, cfg, quality))
    if cfg.save:
        row["saved"] = str(save_adapted(model, rep, out / "models" / f"{method}-{ratio:g}"))
    log.info("%s %.2f: %s, MLP error %.4f", method, ratio, q, err)
    return row


def recover(model: nn.Module, tokens, cfg: CompressConfig, quality) -> dict:
    """LoRA recovery (``drrl.train.recovery``) of the linear layers an adapter left dense (attention output,
    and q/k/v when only MLPs are adapted), on windows of the calibration corpus's train split; merged, so the
    adapted layers and the FLOPs are unchanged. Returns the held-out quality after it, suffixed ``_recovered``."""
    from drrl.train.recovery import RecoveryConfig, lora_recover, lora_targets

    names = [n for n in lora_targets(model) if n.endswith("proj") or n in ("query", "key", "value", "dense")]
    rc = RecoveryConfig(steps=cfg.recover_steps, batch_size=4, context=cfg.context, lr=cfg.recover_lr,
                        lora_r=64, lora_alpha=16, targets=tuple(names), seed=cfg.seed)  # fmt: skip
    stats = lora_recover(model, tokens, rc)
    model.eval()
    q = {f"{k}_recovered": v for k, v in quality(model).items()}
    return {**q, "recovery_targets": names, "recovery_seconds": stats["seconds"]}


def render_table(rows: list[dict]) -> str:
    lm = "ppl" in rows[0]
    quality = "perplexity | × dense" if lm else "embedding cosine to dense"
    head = (f"| method | kept FLOPs (target) | FLOPs cut (measured) | MLP rel. error | {quality} "
            f"| MLP batch-1 speed-up |\n|---|---:|---:|---:|---:|{'---:|' if lm else ''}---:|\n")  # fmt: skip
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['flops_ratio']:.2f} | — | — | {'— | ' if lm else ''}— | {r['error']} |")
            continue
        q = f"{r['ppl']:.3f} | {r['ppl_ratio']:.3f}" if lm else f"{r['cosine']:.4f}"
        lines.append(
            f"| {r['method']} | {r['flops_ratio']:.2f} | {100 * r['flops_reduction']:.1f}% "
            f"| {100 * r['mlp_rel_error']:.2f}% | {q} | {r['decode_speedup']:.2f}× |"
        )
    recovered = [r for r in rows if "ppl_recovered" in r]
    if recovered:  # LoRA recovery: perplexity before and after
        lines += [
            "",
            "| method | kept FLOPs | perplexity | after LoRA recovery | × dense | LoRA on |",
            "|---|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| {r['method']} | {r['flops_ratio']:.2f} | {r['ppl']:.3f} | {r['ppl_recovered']:.3f} "
            f"| {r['ppl_ratio_recovered']:.3f} | {', '.join(r['recovery_targets'])} |"
            for r in recovered
        ]
    return head + "\n".join(lines) + "\n"


def render_report(rep: dict) -> str:
    c = rep["config"]
    if rep["kind"] == "encoder":
        data = (f"Calibration: {c['calib_sentences']} sentences of {c['calibration']}/train; evaluation: "
                f"{c['eval_sentences']} sentences of {c['corpus']}/test (mean-pooled embeddings).")  # fmt: skip
    else:
        data = (f"Calibration: {c['calib_windows']} windows of {c['context']} tokens from {c['calibration']}/train; "
                f"evaluation: {c['eval_windows']} windows from {c['corpus']}/test.")  # fmt: skip
    return f"""# drrl compress: {rep["model"]}

Adapted layers: {c["targets"]} (every layer; the attention output projection, attention itself and
embeddings stay dense). {data} Machine: {rep["machine"]}; {rep["seconds"]:.0f} s in all.

{render_table(rep["rows"])}
FLOPs cut: 1 − executed FLOPs of the adapted layers over dense, counted during the evaluation (masks
differ per token, so it is measured, not set). MLP rel. error: ‖MLP(x) − MLP̂(x)‖²/‖MLP(x)‖², mean over
layers, on {c["error_tokens"]} held-out tokens of the dense model's activations. Decode speed-up: one token at
batch 1 through every layer's MLP, dense time over adapted time (gather fast paths), median of
{c["timing_repeats"]} interleaved repeats.
"""
