"""Sentence classification with a pretrained encoder and swappable attention (``drrl classify CONFIG``).

For each method (an attention by name with its settings) and seed: load the encoder (embedded
all-MiniLM-L6-v2 by default) with that attention, calibrate drrl/static bases on training batches, fine-tune
on the training split, and measure test accuracy, attention FLOPs per sentence and CPU time per batch.
Batches group sentences of equal token length, so no padding mask is ever needed (efficient attentions
treat masks differently or not at all). Writes ``DIR/results.json`` (``{"rows": [{"method",
"accuracy_mean", "accuracy_std", "seeds", "attn_flops", ...}]}``) and ``DIR/report.md``.
"""

from __future__ import annotations

import inspect
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from drrl import flops
from drrl.attention import available_attentions, calibrating, get_attention_class
from drrl.config import FieldError, apply_overrides, from_dict, load_yaml, require
from drrl.data.sentences import SHUFFLE_SEED, encode_sentences, length_batches
from drrl.errors import ConfigError, DrrlError
from drrl.models.encoder import EncoderClassifier, minilm_dir
from drrl.progress import progress
from drrl.rl import PolicyTrainer, RLConfig
from drrl.train.distributed import gather_objects, setup, teardown
from drrl.utils import resolve_device, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class MethodSpec:
    method: str  # the row's name, e.g. "full", "drrl", "performer"
    attention: str = ""  # registered attention (default: the method's name)
    attention_kwargs: dict[str, Any] = field(default_factory=dict)
    # the rank policy's PPO and reward (attention drrl with controller: rl): it learns beside the fine-tuning,
    # one episode per batch (a bidirectional layer decides once per batch of equal-length sentences)
    rollout: int = 4  # training batches (one episode each) per PPO update of the rank policy
    rl: RLConfig = field(
        default_factory=lambda: RLConfig(
            lr=1e-3, loss_weight=1.0, discount=0.0, gae_lambda=0.0, eps_start=0.3, eps_end=0.05, eps_decay_steps=40
        )
    )

    def __post_init__(self):
        require(bool(self.method), "method", "must be a non-empty name")
        require(self.rollout > 0, "rollout", f"must be a positive number of batches, got {self.rollout}")
        self.attention = self.attention or self.method
        names = available_attentions(causal=False)  # the settings are checked when the encoder is built
        require(self.attention in names, "attention", f"must be one of {', '.join(names)}, got {self.attention!r}")


@dataclass
class ClassifyConfig:
    data: str = "rt-polarity"  # rt-polarity | tsv:PATH | sst2 | sst2:DIR
    model: str | None = None  # BERT folder; None: the embedded all-MiniLM-L6-v2
    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec("full")])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 1
    train_limit: int | None = None  # use only the first N training sentences (after the seeded split)
    eval_limit: int | None = None
    max_len: int = 64  # tokens per sentence, [CLS] and [SEP] included
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    dropout: float = 0.1
    calib_batches: int = 8  # training batches that fit drrl/static bases
    device: str = "cpu"
    quick: bool = False  # smoke run: 64 training and 64 test sentences, one seed, max_len 32

    def __post_init__(self):
        for name in ("epochs", "max_len", "batch_size", "calib_batches"):
            require(getattr(self, name) > 0, name, f"must be a positive integer, got {getattr(self, name)}")
        for name in ("train_limit", "eval_limit"):
            v = getattr(self, name)
            require(v is None or v > 0, name, f"must be a positive integer or null, got {v}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.warmup_frac < 1, "warmup_frac", f"must be in [0, 1), got {self.warmup_frac}")
        require(bool(self.seeds), "seeds", "must list at least one seed")
        require(bool(self.methods), "methods", "must list at least one method")
        names = [m.method for m in self.methods]
        require(len(set(names)) == len(names), "methods", f"names must be distinct, got {names}")
        if self.quick:
            self.train_limit, self.eval_limit, self.seeds, self.max_len = 64, 64, self.seeds[:1], 32
        try:
            resolve_device(self.device)
        except ConfigError as e:
            raise FieldError("device", f"is not usable: {e}") from None

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Sequence[str] = ()) -> ClassifyConfig:
        data = load_yaml(path) if path is not None else {}
        return from_dict(cls, apply_overrides(data, overrides))


# ------------------------------------------------------------------------------------------ one run


def _attention_flops(model: EncoderClassifier, batch: int, length: int) -> int:
    """Attention FLOPs of one batch for attentions with a closed form (drrl/static are read from their plans)."""
    return sum(
        sum(flops.attention_module(layer.attn, batch, length).values())
        for layer in model.layers
        if not hasattr(layer.attn, "pop_stats")
    )


def _plan_flops(model: EncoderClassifier, ranks: list | None = None) -> int:
    """FLOPs the drrl/static layers counted since the last call (their mean executed ranks appended to ``ranks``)."""
    total = 0
    for layer in model.layers:
        if hasattr(layer.attn, "pop_stats"):
            st = layer.attn.pop_stats(with_flops=True)
            # per-call work only: "calibration" (statistics of the calibration Grams) is a one-time cost
            total += sum(v for k, v in st.get("flops", {}).items() if not k.startswith("full_") and k != "calibration")
            if ranks is not None and "mean_rank" in st:
                ranks.append(st["mean_rank"])
    return total


@torch.no_grad()
def evaluate(model, ids, labels, batch_size, device) -> dict:
    """Accuracy, attention FLOPs per sentence and mean forward time per batch (ms) on (ids, labels)."""
    model.eval()
    _plan_flops(model)  # drop counters of earlier calls
    correct, attn_flops, times = 0, 0, []
    for b in length_batches(ids, batch_size):
        x = torch.tensor([ids[i] for i in b], device=device)
        t0 = time.perf_counter()
        pred = model(x).argmax(-1)
        times.append(time.perf_counter() - t0)
        correct += int((pred.cpu() == torch.tensor([labels[i] for i in b])).sum())
        attn_flops += _attention_flops(model, len(b), x.shape[1])
    ranks = []
    attn_flops += _plan_flops(model, ranks)
    return {
        "mean_ranks": ranks,  # per drrl/static layer, token-weighted (empty for other attentions)
        "accuracy": correct / len(ids),
        "attn_flops": attn_flops / len(ids),
        "ms_per_batch": 1e3 * statistics.mean(times),
    }


def run_one(spec: MethodSpec, seed: int, data: dict, cfg: ClassifyConfig, path: Path, quiet: bool = False) -> dict:
    """Fine-tune and evaluate one (method, seed); ``data`` holds tokenised splits."""
    torch.manual_seed(seed)
    device = resolve_device(cfg.device)
    model = EncoderClassifier.from_bert(
        path, attention=spec.attention, attention_kwargs=spec.attention_kwargs, n_classes=data["n_classes"],
        dropout=cfg.dropout,
    ).to(device)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    tr_ids, tr_y = data["train"]
    if spec.attention in ("drrl", "static"):  # calibrated bases from training batches
        with torch.no_grad(), calibrating(model):
            for b in length_batches(tr_ids, cfg.batch_size, g)[: cfg.calib_batches]:
                model.encode(torch.tensor([tr_ids[i] for i in b], device=device))
    rl, rl_stats = model.rank_controller, {}
    policy_ids = {id(p) for p in rl.parameters()} if rl is not None else set()
    trainer = PolicyTrainer(rl, spec.rl, seed=seed) if rl is not None else None
    params = [p for p in model.parameters() if id(p) not in policy_ids]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = [b for _ in range(cfg.epochs) for b in length_batches(tr_ids, cfg.batch_size, g)]
    warm = max(1, int(cfg.warmup_frac * len(batches)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (len(batches) - s) / max(1, len(batches) - warm)))
    )
    model.train()
    t0, n_tok = time.perf_counter(), 0
    bar = progress(batches, desc=f"{spec.method} seed {seed}", unit="batch", disable=quiet, leave=False)
    for step, b in enumerate(bar):
        x = torch.tensor([tr_ids[i] for i in b], device=device)
        if trainer is not None:
            trainer.begin()
        loss = F.cross_entropy(model(x), torch.tensor([tr_y[i] for i in b], device=device))
        if not torch.isfinite(loss):
            raise DrrlError(f"{spec.method} seed {seed}: loss became {loss.item()} at step {step + 1}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        # the policy learns from its decisions' rewards (the encoder's loss is not one)
        if trainer is not None and (trainer.collect() >= spec.rollout or step == len(batches) - 1):
            rl_stats = trainer.update(scale=spec.rl.loss_weight)
        n_tok += x.numel()
        post = {"loss": f"{loss.item():.3f}", "tok_s": f"{n_tok / (time.perf_counter() - t0):.0f}"}
        if rl_stats:
            post["reward"] = f"{rl_stats['mean_reward']:.3f}"
        bar.set_postfix(post)
    train_s = time.perf_counter() - t0
    out = evaluate(model, *data["test"], cfg.batch_size, device)
    out["validation_accuracy"] = evaluate(model, *data["validation"], cfg.batch_size, device)["accuracy"]
    out.update(method=spec.method, seed=seed, train_seconds=train_s)
    return out


# ------------------------------------------------------------------------------------------ the table


def run_table(cfg: ClassifyConfig, out: str | Path, quiet: bool = False) -> dict:
    from transformers import AutoTokenizer

    from drrl.data.sentiment import load_sentences

    out = Path(out)
    path = Path(cfg.model) if cfg.model else minilm_dir()
    if not path.is_dir():
        raise DrrlError(f"model {path} is not a folder; pass a local BERT folder (with its tokenizer) or no model")
    tok = AutoTokenizer.from_pretrained(path)
    ds = load_sentences(cfg.data)
    data = {"n_classes": ds.n_classes}
    for split, limit in (("train", cfg.train_limit), ("validation", cfg.eval_limit), ("test", cfg.eval_limit)):
        texts, labels = ds.split(split)
        # splits keep the source order (rt-polarity's is not random): a fixed shuffle before any limit
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(SHUFFLE_SEED)).tolist()
        texts, labels = [texts[i] for i in order][:limit], [labels[i] for i in order][:limit]
        data[split] = (encode_sentences(tok, texts, cfg.max_len), list(labels))
    longest = max((len(x) for split in ("train", "validation", "test") for x in data[split][0]), default=0)
    for spec in cfg.methods:  # an attention with a length limit (linformer) must take every sentence: check now
        limit = inspect.signature(get_attention_class(spec.attention).__init__).parameters.get("max_len")
        max_len = spec.attention_kwargs.get("max_len", limit.default if limit is not None else None)
        if isinstance(max_len, int) and max_len < longest:
            raise ConfigError(
                f"method {spec.method}: attention_kwargs.max_len {max_len} is shorter than the longest sentence "
                f"({longest} tokens); raise it to >= {longest} or lower the config's max_len (tokens per sentence)"
            )
    t_start = time.perf_counter()
    # Under torchrun the (method, seed) fine-tunes are shared round-robin among the processes (each a
    # whole run, the cheapest way to parallelise a table of small fine-tunes); rank 0 gathers and writes.
    world, _ = setup(cfg.device, timeout_minutes=24 * 60)  # early finishers wait for the slowest share
    try:
        jobs = [(spec, seed) for spec in cfg.methods for seed in cfg.seeds]
        mine = {}
        for k, (spec, seed) in enumerate(jobs):
            if k % world.size == world.rank:
                mine[k] = run_one(spec, seed, data, cfg, path, quiet or not world.is_main)
                log.info("%s seed %d: accuracy %.4f", spec.method, seed, mine[k]["accuracy"])
        done = {k: r for part in gather_objects(mine, world) for k, r in part.items()}
    finally:
        teardown(world)
    runs = [done[k] for k in range(len(jobs))]
    rows = []
    for spec in cfg.methods:
        rs = [r for r in runs if r["method"] == spec.method]
        accs = [r["accuracy"] for r in rs]
        rows.append({
            "method": spec.method,
            "attention": spec.attention,
            "attention_kwargs": spec.attention_kwargs,
            "accuracy_mean": statistics.mean(accs),
            "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "seeds": [r["seed"] for r in rs],
            "accuracies": accs,
            "attn_flops": statistics.mean(r["attn_flops"] for r in rs),
            "cpu_ms_per_batch": statistics.median(r["ms_per_batch"] for r in rs),
            "train_seconds": statistics.mean(r["train_seconds"] for r in rs),
            "mean_ranks": [statistics.mean(x) for x in zip(*(r["mean_ranks"] for r in rs), strict=True)],
        })  # fmt: skip
    lens = Counter(len(x) for x in data["test"][0])
    report = {
        "config": asdict(cfg),
        "model": str(path),
        "sizes": {s: len(data[s][0]) for s in ("train", "validation", "test")},
        "mean_test_tokens": sum(n * c for n, c in lens.items()) / max(1, sum(lens.values())),
        "seconds": time.perf_counter() - t_start,
        "processes": world.size,  # > 1: runs shared the machine, so their CPU timings include contention
        "rows": rows,
        "runs": runs,
    }
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "results.json", report)
        write_text_atomic(out / "report.md", render_report(report))
    return report


def render_table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["method"] == "full"), None)
    head = "| method | accuracy (mean ± std) | seeds | attention FLOPs / sentence | × full | CPU ms / batch |\n"
    head += "|---|---:|---:|---:|---:|---:|\n"
    lines = []
    for r in rows:
        rel = r["attn_flops"] / full["attn_flops"] if full and full["attn_flops"] else math.nan
        lines.append(
            f"| {r['method']} | {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} | {len(r['seeds'])} "
            f"| {r['attn_flops'] / 1e6:.2f} M | {rel:.2f} | {r['cpu_ms_per_batch']:.1f} |"
        )
    return head + "\n".join(lines) + "\n"


def render_report(rep: dict) -> str:
    c = rep["config"]
    return f"""# drrl classify: {c["data"]} with {rep["model"]}

Sizes {rep["sizes"]}, mean test length {rep["mean_test_tokens"]:.1f} tokens; {c["epochs"]} epoch(s), batch
{c["batch_size"]} (sentences of equal length), lr {c["lr"]}, max_len {c["max_len"]}; {rep["seconds"]:.0f} s in all.

{render_table(rep["rows"])}
Attention FLOPs per test sentence from `drrl.flops` (every attention layer; drrl/static from their plans).
"""
