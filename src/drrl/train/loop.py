"""The training loop: AdamW, warm-up + cosine schedule, clipping, accumulation, checkpoints, resume.

>>> from drrl.train import RunConfig, train
>>> result = train(RunConfig.load("configs/shakespeare-gpt-tiny.yaml", ["train.max_steps=50"]), "runs/tiny")
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_model
from tqdm.auto import tqdm

from drrl.data.tokenizer import check_vocab, get_tokenizer
from drrl.data.tokens import load_tokens, sample_batch
from drrl.errors import CheckpointError, ConfigError, DataError, DrrlError, Interrupted
from drrl.eval.perplexity import evaluate_lm
from drrl.models.gpt import build_model
from drrl.rl.policy import EpsilonSchedule
from drrl.rl.ppo import PPO, PPOConfig
from drrl.rl.reward import RewardConfig
from drrl.train.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from drrl.train.config import RunConfig
from drrl.utils import resolve_device, use_bf16, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

# Settings that may change when a run is resumed; every other key fixes the trajectory.
RESUMABLE_TRAIN_KEYS = {"log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "device", "threads"}


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to ``cfg.lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg, exclude: set[int] = frozenset()) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters except those whose ``id`` is in ``exclude`` (the policy's)."""
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in exclude]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def prepare_out_dir(out: Path) -> None:
    """Create ``out`` and prove it is writable before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DrrlError(f"cannot write to output directory {out} ({e.strerror}); choose a writable --out") from None


def check_resumable(ckpt: Checkpoint, cfg: RunConfig, out: Path) -> None:
    """A resumed run must follow the same trajectory: only logging/eval/checkpoint cadence and devices may change."""
    old, new = ckpt.config, cfg.to_dict()
    sections = ("model", "data", "rl") if cfg.train.mode != "lm" else ("model", "data")
    changed = [f"{s}.{k}" for s in sections for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
    changed += [
        f"train.{k}" for k in new["train"] if k not in RESUMABLE_TRAIN_KEYS and old["train"].get(k) != new["train"][k]
    ]
    if changed:
        what = "the model section" if changed[0].startswith("model.") else changed[0]
        raise ConfigError(
            f"--resume: {what} differs from the checkpoint in {out} ({', '.join(changed[:4])}); keep it unchanged "
            "or start a new run in another --out"
        )


def load_weights(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Initialise ``model`` from a checkpoint of another run (``train.init_from``). Attention extras the source
    lacks (drrl bases, the rank policy) keep their fresh values; anything else must match exactly."""
    try:
        missing, unexpected = load_model(model, ckpt.path / "model.safetensors", strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"train.init_from: {ckpt.path} does not fit the model ({e}); check model.*") from None
    missing = [k for k in missing if ".attn." not in k and not k.startswith("rank_controller.")]
    if missing or unexpected:
        raise CheckpointError(
            f"train.init_from: {ckpt.path} does not fit the model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); use a run with the same model.* sizes"
        )
    log.info("initialised the model from %s", ckpt.path)


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, keep only lines logged up to the checkpoint (a line cut by a crash is dropped)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("step", 0) <= step and not rec.get("final"):
            keep.append(line + "\n")
    write_text_atomic(path, "".join(keep))


def _catch_sigterm():
    """Turn SIGTERM into a flag the loop checks after each step (it then checkpoints and stops), in the main
    thread only. Returns the flag holder and a function that puts the previous handler back."""
    holder = {"sig": None}
    if threading.current_thread() is not threading.main_thread():
        return holder, lambda: None
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: holder.__setitem__("sig", signum))
    return holder, lambda: signal.signal(signal.SIGTERM, previous)


def train(cfg: RunConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` and evaluate it; returns the final evaluation dict.

    ``out`` receives ``metrics.jsonl``, ``checkpoints/step_*`` and ``eval.json``. With ``resume=True``
    the newest valid checkpoint in ``out`` is loaded and training continues exactly where it stopped
    (bit for bit on the same kind of device; after a CPU <-> CUDA move only up to rounding).
    """
    out = Path(out)
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)

    # Everything that can fail on bad input happens before the output folder is touched.
    tok = get_tokenizer(cfg.data.tokenizer)
    check_vocab(tok, cfg.model.vocab_size)
    train_tokens = load_tokens(cfg.data.corpus, "train", tok)
    val_tokens = load_tokens(cfg.eval.corpus or cfg.data.corpus, cfg.eval.split, tok)
    context = cfg.model.context
    eval_context = cfg.eval.context or context
    for name, toks, need in (("train", train_tokens, context + 1), (cfg.eval.split, val_tokens, 2)):
        if len(toks) < need:
            raise DataError(f"corpus split {name} has {len(toks)} tokens; it needs at least {need}")
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise CheckpointError(f"--resume: no valid checkpoint in {out}; start without --resume")
        check_resumable(ckpt, cfg, out)
    elif list_checkpoints(out):
        raise DrrlError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    init = resolve_checkpoint(tc.init_from) if tc.init_from and ckpt is None else None
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model).to(device)
    rl, ppo, rl_stats = model.rank_controller, None, {}
    policy_ids = {id(p) for p in rl.parameters()} if rl is not None else set()
    lm_params = [p for p in model.parameters() if id(p) not in policy_ids]
    if init is not None:
        load_weights(model, init)
    optimizer = build_optimizer(model, tc, exclude=policy_ids)
    if rl is not None:  # the rank policy learns beside (hybrid) or instead of (policy) the language model
        rc = cfg.rl
        rl.reward_cfg = RewardConfig(rc.alpha, rc.beta, rc.gamma)
        rl.epsilon = EpsilonSchedule(rc.eps_start, rc.eps_end, rc.eps_decay_steps)
        rl.generator.manual_seed(tc.seed)
        ppo = PPO(
            rl.policy, PPOConfig(rc.lr, rc.clip, rc.discount, rc.gae_lambda, rc.value_coef, rc.entropy_coef, rc.epochs)
        )
        if tc.mode == "policy":
            for p in lm_params:
                p.requires_grad_(False)
    prepare_out_dir(out)

    start = 0
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        ckpt.load_model(model)
        ckpt.load_optimizer(optimizer)
        ckpt.restore_rng()
        if ppo is not None:
            ckpt.load_optimizer(ppo.optimizer, "policy_optimizer")
            rl.updates = int(ckpt.state["rl"]["updates"])
            rl.generator.set_state(torch.tensor(ckpt.state["rl"]["generator"], dtype=torch.uint8))
        start = int(ckpt.state["data"]["next_step"])
        _truncate_metrics(metrics_path, start)
        log.info("resumed from %s at step %d", ckpt.path, start)
    else:
        metrics_path.write_text("")

    tokens_per_step = tc.batch_size * tc.grad_accum * context
    bf16 = use_bf16(tc.precision, device)
    log.info(
        "model: %.2fM parameters (%.2fM without embeddings), %s, %s",
        model.num_params(False) / 1e6,
        model.num_params() / 1e6,
        device,
        "bf16 autocast" if bf16 else "fp32",
    )
    bar = tqdm(total=tc.max_steps, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True)

    def evaluate(max_tokens: int | None) -> dict:
        result = evaluate_lm(
            model, val_tokens, eval_context, stride=cfg.eval.stride, batch_size=cfg.eval.batch_size,
            max_tokens=max_tokens, device=device, bf16=bf16,
        )  # fmt: skip
        model.attention_stats()  # drop the evaluation's rank counters: the training log reports training steps
        set_modes()
        return result

    def set_modes() -> None:
        model.train(tc.mode != "policy")  # a frozen language model runs in eval mode (no dropout) ...
        if rl is not None:
            rl.train()  # ... while the policy explores and learns

    set_modes()
    stop_signal, restore_signal = _catch_sigterm()
    steps_since, busy, busy_total = 0, 0.0, 0.0  # seconds inside training steps (evals and saving excluded)
    try:
        for step in range(start, tc.max_steps):
            t_step = time.perf_counter()
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # One draw per step, cut into micro-batches: accumulation changes memory use, not the trajectory.
            xs, ys = sample_batch(train_tokens, tc.batch_size * tc.grad_accum, context, tc.seed, step)
            loss_sum, episodes = 0.0, []
            for x, y in zip(xs.split(tc.batch_size), ys.split(tc.batch_size), strict=True):
                if rl is not None:
                    rl.begin()
                with (
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
                    torch.set_grad_enabled(tc.mode != "policy"),
                ):
                    loss = model.loss(x.to(device), y.to(device)) / tc.grad_accum
                if tc.mode != "policy":
                    loss.backward()
                loss_sum += loss.item()
                if rl is not None:
                    episodes += rl.collect()
            if not math.isfinite(loss_sum):
                raise DrrlError(
                    f"loss became {loss_sum} at step {step + 1}; lower train.lr or raise train.warmup_steps"
                )
            grad_norm = None
            if tc.mode != "policy":
                grad_norm = torch.nn.utils.clip_grad_norm_(lm_params, tc.grad_clip) if tc.grad_clip > 0 else None
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ppo is not None and episodes:  # L_RL (λ-weighted in the hybrid objective) on the policy's optimizer
                rl_stats = ppo.update(episodes, scale=cfg.rl.loss_weight if tc.mode == "hybrid" else 1.0)
                rl_stats["epsilon"] = rl.epsilon(rl.updates)
                rl.updates += 1
            done = step + 1
            dt = time.perf_counter() - t_step
            steps_since, busy, busy_total = steps_since + 1, busy + dt, busy_total + dt
            bar.update(1)
            if done % tc.log_every == 0 or done == tc.max_steps:
                tps = steps_since * tokens_per_step / busy
                rec = {"step": done, "loss": loss_sum, "lr": lr, "tokens": done * tokens_per_step, "tokens_per_s": tps}
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                if rl_stats:
                    rec["rl"] = rl_stats
                layer_stats = model.attention_stats()
                if any(layer_stats):  # dynamic-rank attention: per-layer mean executed rank, refreshes, fallbacks
                    rec["attention"] = layer_stats
                _append_metrics(metrics_path, rec)
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:,.0f}")
                steps_since, busy = 0, 0.0
            if tc.eval_every and done % tc.eval_every == 0 and done != tc.max_steps:
                r = evaluate(cfg.eval.periodic_max_tokens)
                _append_metrics(
                    metrics_path, {"step": done, "val_loss": r["loss"], "val_ppl": r["ppl"], "val_tokens": r["tokens"]}
                )
                message = f"step {done}: val loss {r['loss']:.4f}, ppl {r['ppl']:.2f} ({r['tokens']} tokens)"
                if progress:
                    bar.write(message)
                else:
                    log.info(message)
            stopping = stop_signal["sig"] is not None and done < tc.max_steps
            if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.max_steps or stopping:
                extra = {
                    "config": cfg.to_dict(),
                    "tokenizer": tok.name,
                    "scheduler": {"kind": "warmup_cosine", "next_step": done, "lr": lr},
                    "data": {"seed": tc.seed, "next_step": done, "tokens_seen": done * tokens_per_step},
                }
                extra_optimizers = None
                if ppo is not None:
                    extra["rl"] = {"updates": rl.updates, "generator": rl.generator.get_state().tolist()}
                    extra_optimizers = {"policy_optimizer": ppo.optimizer}
                path = save_checkpoint(
                    out, done, model, optimizer, extra, keep=tc.keep_checkpoints, extra_optimizers=extra_optimizers
                )
                if stopping:
                    bar.close()
                    raise Interrupted(
                        f"stopped by SIGTERM after step {done}; checkpoint written to {path}; continue with --resume"
                    )
    finally:
        restore_signal()
    bar.close()

    result = evaluate(None)
    result.update(
        corpus=cfg.eval.corpus or cfg.data.corpus,
        split=cfg.eval.split,
        step=max(start, tc.max_steps),
        train_seconds=busy_total,
        train_tokens_per_s=(tc.max_steps - start) * tokens_per_step / busy_total if busy_total else None,
    )
    _append_metrics(
        metrics_path, {"step": result["step"], "val_loss": result["loss"], "val_ppl": result["ppl"], "final": True}
    )
    write_json_atomic(out / "eval.json", result)
    return result
