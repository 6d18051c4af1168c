"""A run folder's state: whether a run may start or resume there, the checkpoint to resume and what it restores,
the metrics log, and the checkpoints the loop writes (every process agrees, rank 0 writes)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model

from drrl.errors import CheckpointError, ConfigError, DrrlError
from drrl.models.gpt import build_model
from drrl.train.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from drrl.train.config import RunConfig
from drrl.train.distributed import World, barrier, broadcast_object, check_in_sync, gather_rng_states
from drrl.train.fsdp import full_state, is_fsdp
from drrl.utils import write_text_atomic

log = logging.getLogger(__name__)


# Settings that may change when a run is resumed; every other key fixes the trajectory.
RESUMABLE_TRAIN_KEYS = {
    "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "device", "threads", "distributed",
}  # fmt: skip


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


def _rank_seed(seed: int, rank: int, step: int) -> int:
    # Dropout streams of processes other than rank 0 (rank 0 keeps the single-process stream).
    return int(np.random.SeedSequence([seed, rank, step, 0x5EED]).generate_state(1)[0])


def _open_run(out: Path, cfg: RunConfig, world: World, resume: bool) -> Checkpoint | None:
    """The checkpoint to resume (rank 0 chooses and hash-checks it; the others open that one), or None for a new
    run, which must not overwrite another."""
    ckpt = None
    if resume:
        # rank 0 chooses (and hash-checks) the checkpoint; the others open that one
        ckpt = latest_checkpoint(out) if world.is_main else None
        path = broadcast_object(str(ckpt.path) if ckpt is not None else None, world)
        if path is not None and ckpt is None:
            ckpt = load_checkpoint(Path(path))
        if ckpt is None:
            raise CheckpointError(f"--resume: no valid checkpoint in {out}; start without --resume")
        check_resumable(ckpt, cfg, out)
    elif list_checkpoints(out):
        raise DrrlError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return ckpt


def _restore(ckpt, model, trainer, world: World, seed: int, metrics_path: Path) -> int:
    """Load a checkpoint being resumed (model, RNG, policy state) and return its step; start a fresh metrics log
    otherwise (0)."""
    if ckpt is None:
        if world.rank:
            torch.manual_seed(_rank_seed(seed, world.rank, 0))
        if world.is_main:
            metrics_path.write_text("")
        return 0
    ckpt.load_model(model)
    start = int(ckpt.state["data"]["next_step"])
    if not ckpt.restore_rng(world.rank):
        torch.manual_seed(_rank_seed(seed, world.rank, start))
    saved_world = int(ckpt.state.get("world_size", 1))
    if trainer is not None:
        ckpt.load_optimizer(trainer.optimizer, "policy_optimizer")
        trainer.load_state_dict(ckpt.state["rl"])
    if world.is_main:
        _truncate_metrics(metrics_path, start)
    log.info("resumed from %s at step %d", ckpt.path, start)
    if saved_world != world.size:
        log.info("the checkpoint was written by %d processes, this run has %d", saved_world, world.size)
    return start


def _checkpoint(cfg, out, world, done, lr, tokenizer, model, step_module, optimizer, trainer) -> Path:
    """Every process checks that it is in step with rank 0 and hands over its RNG state; rank 0 writes."""
    tc = cfg.train
    sharded = is_fsdp(step_module)
    if not sharded:  # FSDP shards differ by design
        check_in_sync(model, world, done)
    rng_states = gather_rng_states(world) if world.distributed else None
    if sharded:  # rank 0 gets a full CPU copy of the model and the optimizer's full state
        model, optimizer = full_state(step_module, optimizer, lambda: build_model(cfg.model))
    path = out / "checkpoints" / f"step_{done:07d}"
    if world.is_main:
        extra = {
            "config": cfg.to_dict(),
            "tokenizer": tokenizer,
            "scheduler": {"kind": "warmup_cosine", "next_step": done, "lr": lr},
            "data": {"seed": tc.seed, "next_step": done, "tokens_seen": done * tc.batch_size * tc.grad_accum
                     * cfg.model.context},
            "world_size": world.size,
        }  # fmt: skip
        extra_optimizers = None
        if trainer is not None:
            extra["rl"] = trainer.state_dict()
            extra_optimizers = {"policy_optimizer": trainer.optimizer}
        path = save_checkpoint(
            out, done, model, optimizer, extra, keep=tc.keep_checkpoints, extra_optimizers=extra_optimizers,
            rng_states=rng_states,
        )  # fmt: skip
    barrier(world)  # nobody runs ahead (or exits) before the checkpoint is on disk
    return path
