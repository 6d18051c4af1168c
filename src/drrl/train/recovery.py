"""Recovery fine-tuning after compression: LoRA through ``peft`` (merged at the end), with optional distillation
from the uncompressed model.

    loss = CE(student) + λ · T² · KL(softmax(z_teacher / T) ‖ softmax(z_student / T))

LoRA (r, α) wraps the named linear layers (default q_proj, k_proj, v_proj: the recipe of the linear-attention
pruning paper); every other weight stays frozen. After training the adapters are merged into the weights, so
the recovered model has the same modules, shapes and speed as before. The KD term walks over row chunks
under activation checkpointing, so the (tokens × vocabulary) logits of teacher and student never coexist in
full.

>>> stats = lora_recover(pruned, train_tokens, RecoveryConfig(steps=200), teacher=dense)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from drrl.config import require
from drrl.data.tokens import sample_batch
from drrl.models.loss import linear_cross_entropy
from drrl.progress import progress as progress_bar
from drrl.train.distributed import all_sum, current_world, shard_rows, sum_gradients

log = logging.getLogger(__name__)


@dataclass
class RecoveryConfig:
    steps: int = 200
    batch_size: int = 8
    context: int | None = None  # tokens per window; None = the model's context
    lr: float = 1e-3  # AdamW on the LoRA weights, warm-up then cosine to lr/10
    warmup_steps: int = 10
    grad_clip: float = 1.0
    lora_r: int = 32
    lora_alpha: int = 64
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # module names LoRA wraps
    kd_weight: float = 0.0  # λ; 0 = plain language-model fine-tuning
    kd_temperature: float = 2.0
    seed: int = 0

    def __post_init__(self):
        require(self.context is None or self.context > 0, "context", f"must be a positive integer, got {self.context}")
        for name in ("steps", "batch_size", "lora_r", "lora_alpha"):
            require(getattr(self, name) > 0, name, f"must be a positive integer, got {getattr(self, name)}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.kd_weight >= 0, "kd_weight", f"must be >= 0, got {self.kd_weight}")
        require(self.kd_temperature > 0, "kd_temperature", f"must be > 0, got {self.kd_temperature}")
        require(len(self.targets) > 0, "targets", "must name at least one linear layer, e.g. q_proj")


def _kd_chunk(h_s, h_t, weight, temperature):
    dt = torch.promote_types(h_s.dtype, torch.float32)
    log_p = F.log_softmax((h_s @ weight.t()).to(dt) / temperature, -1)
    log_q = F.log_softmax((h_t @ weight.t()).to(dt) / temperature, -1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="sum")


def kd_loss(h_s: torch.Tensor, h_t: torch.Tensor, weight: torch.Tensor, temperature: float, chunk: int = 1024):
    """Mean over tokens of T² · KL(teacher ‖ student) of the logits ``h @ weightᵀ``; h (N, D), weight (V, D)."""
    total = h_s.new_zeros((), dtype=torch.promote_types(h_s.dtype, torch.float32))
    for s in range(0, h_s.shape[0], chunk):
        args = (h_s[s : s + chunk], h_t[s : s + chunk], weight, temperature)
        total = total + (checkpoint(_kd_chunk, *args, use_reentrant=False) if h_s.requires_grad else _kd_chunk(*args))
    return total * temperature**2 / max(h_s.shape[0], 1)


def lm_parts(model) -> tuple:
    """``(hidden, head, context)`` of a causal LM: a function from token ids (B, L) to final hidden states
    (B, L, D), the output layer (V, D) and the default window length; drrl models and Hugging Face ones."""
    if all(hasattr(model, a) for a in ("hidden", "lm_head", "cfg")):
        return model.hidden, model.lm_head, model.cfg.context
    if hasattr(model, "get_decoder") and model.get_output_embeddings() is not None:
        decoder = model.get_decoder()
        context = min(getattr(model.config, "max_position_embeddings", 512), 512)
        return (lambda x: decoder(input_ids=x).last_hidden_state), model.get_output_embeddings(), context
    raise ValueError("lora_recover needs a drrl language model or a Hugging Face causal LM")


def lora_targets(model) -> list[str]:
    """Names of the plain ``nn.Linear`` layers of ``model`` that LoRA can wrap (the LM head excluded: it is
    tied to the embedding and gets no gradient through the chunked loss); rank adapters are not linears."""
    head = lm_parts(model)[1]
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head}
    )


def lora_recover(model, tokens: np.ndarray, cfg: RecoveryConfig, *, teacher=None, progress: bool = False) -> dict:
    """Fine-tune LoRA adapters on ``cfg.targets`` of a causal LM (drrl's, or a Hugging Face one, adapted or
    not) on random windows of ``tokens``, distilling from ``teacher`` when ``cfg.kd_weight > 0``; merge them
    and return ``{"loss_first" (first step), "loss_last" (mean of the last 10 steps), "seconds", "trainable"}``.
    The model is modified in place.

    Inside a process group (a script under torchrun that called :func:`drrl.train.distributed.setup`), every
    process must call this with the same arguments: each runs its share of every step's windows and the LoRA
    gradients are averaged, so all processes merge the same adapters."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    names = set(lora_targets(model))
    missing = [t for t in cfg.targets if t not in names]
    if missing:
        raise ValueError(f"recovery targets {missing} are not linear layers of the model; choose from {sorted(names)}")
    if cfg.kd_weight > 0 and teacher is None:
        raise ValueError("kd_weight > 0 needs a teacher model (the uncompressed one)")
    hidden, head, default_context = lm_parts(model)
    teacher_hidden = lm_parts(teacher)[0] if teacher is not None and cfg.kd_weight > 0 else None
    context = cfg.context or default_context
    torch.manual_seed(cfg.seed)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.targets), lora_dropout=0.0)
    wrapped = LoraModel(model, lcfg, "default")
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    device = next(model.parameters()).device
    if teacher is not None:
        teacher.eval()
    model.train()
    world = current_world()
    rows = shard_rows(cfg.batch_size, world, what="the recovery batch_size")
    losses, t0 = [], time.perf_counter()
    for step in progress_bar(range(cfg.steps), desc="recover", unit="step", disable=not progress, dynamic_ncols=True):
        warm = (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else 1.0
        frac = max(step - cfg.warmup_steps, 0) / max(cfg.steps - cfg.warmup_steps, 1)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        x, y = sample_batch(tokens, cfg.batch_size, context, cfg.seed + 7919, step, rows=rows)
        x, y = x.to(device), y.to(device)
        h = hidden(x)
        loss = linear_cross_entropy(h.flatten(0, 1).float(), head.weight.float(), y.flatten()) / y.numel()
        if teacher_hidden is not None:
            with torch.no_grad():
                h_t = teacher_hidden(x)
            loss = loss + cfg.kd_weight * kd_loss(h.flatten(0, 1), h_t.flatten(0, 1), head.weight, cfg.kd_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sum_gradients(params, world, mean=True)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(all_sum([loss.item()], world)[0] / world.size)
    merged = wrapped.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    merged.eval()
    n_trainable = sum(p.numel() for p in params)
    last = float(np.mean(losses[-10:]))
    log.info("recovery: %d steps, loss %.4f -> %.4f (last 10 steps), %d LoRA parameters", cfg.steps, losses[0], last,
             n_trainable)  # fmt: skip
    return {
        "loss_first": losses[0],
        "loss_last": last,
        "seconds": time.perf_counter() - t0,
        "trainable": n_trainable,
    }
