"""The training loop: AdamW, warm-up + cosine schedule, clipping, accumulation, checkpoints, resume.

>>> from drrl.train import RunConfig, train
>>> result = train(RunConfig.load("configs/shakespeare-gpt-tiny.yaml", ["train.max_steps=50"]), "runs/tiny")
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from drrl.data.tokenizer import check_vocab, get_tokenizer
from drrl.data.tokens import load_tokens, sample_batch
from drrl.errors import DataError, DrrlError, Interrupted
from drrl.eval.perplexity import evaluate_lm
from drrl.models.gpt import build_model
from drrl.progress import progress as progress_bar
from drrl.rl.trainer import PolicyTrainer
from drrl.train.checkpoint import (
    resolve_checkpoint,
)
from drrl.train.config import RunConfig
from drrl.train.distributed import (
    Collectives,
    World,
    all_sum,
    barrier,
    broadcast_state,
    setup,
    shard_rows,
    teardown,
    wrap,
)
from drrl.train.fsdp import check_fsdp, clip_sharded, is_fsdp, load_optimizer_state
from drrl.train.resume import (  # noqa: F401  (check_resumable, load_weights: public names of this module before)
    RESUMABLE_TRAIN_KEYS,
    _append_metrics,
    _checkpoint,
    _open_run,
    _restore,
    check_resumable,
    load_weights,
    prepare_out_dir,
)
from drrl.utils import use_bf16, write_json_atomic

log = logging.getLogger(__name__)


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
    (bit for bit on the same kind of device and number of processes; after a CPU <-> CUDA move only up to
    rounding; with another number of processes, see :mod:`drrl.train.distributed` for what changes).

    Under ``torchrun`` every process calls this function: they share each step's batch and average their
    gradients (see :mod:`drrl.train.distributed`); only rank 0 writes to ``out``.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    world, device = setup(cfg.train.device)
    try:
        return _train(cfg, Path(out), world, device, resume=resume, progress=progress and world.is_main)
    finally:
        teardown(world)


def _load_data(cfg: RunConfig, world: World):
    """Tokenizer and token arrays; rank 0 tokenises (and caches) first, the others then read its cache."""
    tok = get_tokenizer(cfg.data.tokenizer)
    check_vocab(tok, cfg.model.vocab_size)
    if not world.is_main:
        barrier(world)
    train_tokens = load_tokens(cfg.data.corpus, "train", tok)
    val_tokens = load_tokens(cfg.eval.corpus or cfg.data.corpus, cfg.eval.split, tok)
    if world.is_main:
        barrier(world)
    return tok, train_tokens, val_tokens


def _train(cfg: RunConfig, out: Path, world: World, device: torch.device, *, resume: bool, progress: bool) -> dict:
    """The run, in order: data, checkpoint to resume, model and policy trainer, state restored, wrapping, then the
    step loop with its logging, evaluation and checkpoint cadence. It stays one function (about 120 lines)
    because the loop shares a dozen pieces of state (bar, timers, signal flag, evaluation closure) whose
    passing around would be harder to read than the loop; each step's work is in :func:`_train_step`."""
    tc = cfg.train
    # Everything that can fail on bad input happens before the output folder is touched.
    global_rows = tc.batch_size * tc.grad_accum  # windows per optimizer step, over all processes
    my_rows = shard_rows(global_rows, world)
    tok, train_tokens, val_tokens = _load_data(cfg, world)
    context = cfg.model.context
    eval_context = cfg.eval.context or context
    for name, toks, need in (("train", train_tokens, context + 1), (cfg.eval.split, val_tokens, 2)):
        if len(toks) < need:
            raise DataError(f"corpus split {name} has {len(toks)} tokens; it needs at least {need}")
    sharded = world.distributed and tc.distributed == "fsdp"
    if sharded:
        check_fsdp()  # a clear error before anything is written
    ckpt = _open_run(out, cfg, world, resume)
    init = resolve_checkpoint(tc.init_from) if tc.init_from and ckpt is None else None
    torch.manual_seed(tc.seed)
    # FSDP moves each block to the device as it shards it: the whole model never has to fit one device
    model = build_model(cfg.model) if sharded else build_model(cfg.model).to(device)
    rl = model.rank_controller
    policy_ids = {id(p) for p in rl.parameters()} if rl is not None else set()
    if init is not None:
        load_weights(model, init)
    trainer = _policy_trainer(model, cfg, world, policy_ids)
    if world.is_main:
        prepare_out_dir(out)

    metrics_path = out / "metrics.jsonl"
    start = _restore(ckpt, model, trainer, world, tc.seed, metrics_path)
    policy_names = [n for n, p in model.named_parameters() if id(p) in policy_ids]
    step_module = wrap(model, world, device, tc.distributed, ignore=policy_names)
    # after wrap: FSDP replaces the parameters by sharded ones
    lm_params = [p for p in model.parameters() if id(p) not in policy_ids]
    optimizer = build_optimizer(model, tc, exclude=policy_ids)
    if ckpt is not None and is_fsdp(step_module):
        load_optimizer_state(step_module, optimizer, ckpt.optimizer_state_dict())
    elif ckpt is not None:
        ckpt.load_optimizer(optimizer)

    tokens_per_step = global_rows * context
    bf16 = use_bf16(tc.precision, device)
    log.info(
        "model: %.2fM parameters (%.2fM without embeddings), %s, %s",
        model.num_params(False) / 1e6,
        model.num_params() / 1e6,
        device,
        "bf16 autocast" if bf16 else "fp32",
    )
    bar = progress_bar(
        total=tc.max_steps, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True
    )

    # FSDP needs the forward to go through its root (which gathers the shards) and the same number of forwards
    # on every process: each scores every window. DDP processes score every size-th window and sum.
    eval_module, eval_shard = (step_module, (0, 1)) if sharded else (model, (world.rank, world.size))

    def evaluate(max_tokens: int | None) -> dict:
        result = evaluate_lm(
            eval_module, val_tokens, eval_context, stride=cfg.eval.stride, batch_size=cfg.eval.batch_size,
            max_tokens=max_tokens, device=device, bf16=bf16, shard=eval_shard,
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
    rl_stats: dict = {}
    steps_since, busy, busy_total = 0, 0.0, 0.0  # seconds inside training steps (evals and saving excluded)
    try:
        for step in range(start, tc.max_steps):
            t_step = time.perf_counter()
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, stops, grad_norm, step_stats = _train_step(
                cfg, step, world, device, model, step_module, optimizer, trainer, lm_params, train_tokens, my_rows,
                bf16, stop_signal,
            )  # fmt: skip
            rl_stats = step_stats or rl_stats
            done = step + 1
            dt = time.perf_counter() - t_step
            steps_since, busy, busy_total = steps_since + 1, busy + dt, busy_total + dt
            bar.update(1)
            if done % tc.log_every == 0 or done == tc.max_steps:
                tps = steps_since * tokens_per_step / busy
                if world.is_main:
                    _append_metrics(metrics_path, _record(model, done, loss_sum, lr, tokens_per_step, tps, grad_norm,
                                                          rl_stats))  # fmt: skip
                else:
                    model.attention_stats()  # every process drops the counters of the steps logged
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:,.0f}")
                steps_since, busy = 0, 0.0
            if tc.eval_every and done % tc.eval_every == 0 and done != tc.max_steps:
                r = evaluate(cfg.eval.periodic_max_tokens)
                if world.is_main:
                    _append_metrics(
                        metrics_path,
                        {"step": done, "val_loss": r["loss"], "val_ppl": r["ppl"], "val_tokens": r["tokens"]},
                    )
                message = f"step {done}: val loss {r['loss']:.4f}, ppl {r['ppl']:.2f} ({r['tokens']} tokens)"
                if progress:
                    bar.write(message)
                else:
                    log.info(message)
            stopping = stops > 0 and done < tc.max_steps
            if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.max_steps or stopping:
                path = _checkpoint(cfg, out, world, done, lr, tok.name, model, step_module, optimizer, trainer)
                if stopping:
                    bar.close()
                    raise Interrupted(
                        f"stopped by SIGTERM after step {done}; checkpoint written to {path}; continue with --resume"
                    )
    finally:
        restore_signal()
    bar.close()

    return _final_evaluation(cfg, out, world, evaluate, start, busy_total, tokens_per_step, metrics_path)


def _record(model, done, loss_sum, lr, tokens_per_step, tps, grad_norm, rl_stats) -> dict:
    """One metrics.jsonl line of training statistics."""
    rec = {"step": done, "loss": loss_sum, "lr": lr, "tokens": done * tokens_per_step, "tokens_per_s": tps}
    if grad_norm is not None:
        rec["grad_norm"] = float(grad_norm)
    if rl_stats:
        rec["rl"] = rl_stats
    layer_stats = model.attention_stats()
    if any(layer_stats):  # dynamic-rank attention: per-layer mean executed rank, refreshes, fallbacks
        rec["attention"] = layer_stats
    return rec


def _final_evaluation(cfg, out, world, evaluate, start, busy_total, tokens_per_step, metrics_path) -> dict:
    """The whole validation split, written to eval.json and as the last metrics line (rank 0)."""
    tc = cfg.train
    result = evaluate(None)
    result.update(
        corpus=cfg.eval.corpus or cfg.data.corpus,
        split=cfg.eval.split,
        step=max(start, tc.max_steps),
        train_seconds=busy_total,
        train_tokens_per_s=(tc.max_steps - start) * tokens_per_step / busy_total if busy_total else None,
        processes=world.size,
    )
    if world.is_main:
        _append_metrics(
            metrics_path, {"step": result["step"], "val_loss": result["loss"], "val_ppl": result["ppl"], "final": True}
        )
        write_json_atomic(out / "eval.json", result)
    barrier(world)
    return result


def _policy_trainer(model, cfg: RunConfig, world: World, policy_ids: set[int]) -> PolicyTrainer | None:
    """The rank policy learns beside (hybrid) or instead of (policy mode: the language model frozen) the LM."""
    rl = model.rank_controller
    if rl is None:
        return None
    comm = Collectives(world) if world.distributed else None
    trainer = PolicyTrainer(rl, cfg.rl, seed=cfg.train.seed, comm=comm)
    if cfg.train.mode == "policy":
        for p in model.parameters():
            if id(p) not in policy_ids:
                p.requires_grad_(False)
    return trainer


def _train_step(cfg, step, world, device, model, step_module, optimizer, trainer, lm_params, train_tokens, my_rows,
                bf16, stop_signal):  # fmt: skip
    """One optimizer step (and one policy update when the rank policy has episodes). Returns the mean loss over
    every process, whether any process saw SIGTERM, the gradient norm (None when the LM is frozen or clipping is
    off) and the policy's statistics (empty without an update)."""
    tc = cfg.train
    rl = model.rank_controller
    broadcast_state(model, rl.generator if rl is not None else None, world)
    # One draw per step, cut into micro-batches: accumulation changes memory use, not the trajectory;
    # each process reads its share of the step's windows.
    xs, ys = sample_batch(train_tokens, tc.batch_size * tc.grad_accum, cfg.model.context, tc.seed, step, rows=my_rows)
    n_rows = len(xs)
    loss_sum = 0.0
    micro = list(zip(xs.split(tc.batch_size), ys.split(tc.batch_size), strict=True))
    for i, (x, y) in enumerate(micro):
        if trainer is not None:
            trainer.begin()
        last = i == len(micro) - 1  # gradients are averaged once, after the last micro-batch
        if hasattr(step_module, "set_requires_gradient_sync"):  # FSDP
            step_module.set_requires_gradient_sync(last)
        no_sync = step_module.no_sync() if not last and hasattr(step_module, "no_sync") else nullcontext()
        with no_sync:  # DDP
            with (
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
                torch.set_grad_enabled(tc.mode != "policy"),
            ):
                loss = step_module(x.to(device), y.to(device)) / (n_rows / len(x))
            if tc.mode != "policy":
                loss.backward()
        loss_sum += loss.item()
        if trainer is not None:
            trainer.collect()
    # one all-reduce of the step's scalars: the mean loss over every process, SIGTERM seen anywhere,
    # whether any process has policy episodes
    n_own = len(trainer.episodes) if trainer is not None else 0
    loss_sum, stops, n_episodes = all_sum([loss_sum, float(stop_signal["sig"] is not None), float(n_own)], world)
    loss_sum /= world.size
    if not math.isfinite(loss_sum):
        raise DrrlError(f"loss became {loss_sum} at step {step + 1}; lower train.lr or raise train.warmup_steps")
    grad_norm = None
    if tc.mode != "policy":
        grad_norm = clip_gradients(step_module, lm_params, tc.grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    rl_stats = {}
    if trainer is not None and n_episodes:  # L_RL (λ-weighted in the hybrid objective) on the policy's optimizer
        rl_stats = trainer.update(scale=cfg.rl.loss_weight if tc.mode == "hybrid" else 1.0)
    return loss_sum, stops, grad_norm, rl_stats


def clip_gradients(step_module: torch.nn.Module, params: list, max_norm: float):
    """Clip the (already averaged) gradients to ``max_norm``; returns the norm before clipping (None if off)."""
    if max_norm <= 0:
        return None
    if is_fsdp(step_module):  # sharded gradients: the norm needs every process's shard
        return clip_sharded(step_module, max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
