"""Run by tests/train/test_distributed.py under ``torchrun --nproc_per_node 2``: the rank policy and the
language model under data parallelism, built from the same pieces as ``drrl train``.

Each process writes ``OUT/rank<r>.json`` with what it saw; the test compares them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from drrl.errors import DrrlError
from drrl.models.gpt import GPTConfig, build_model
from drrl.rl.ppo import PPO
from drrl.train.distributed import Collectives, broadcast_state, check_in_sync, setup, teardown, wrap
from drrl.train.recovery import RecoveryConfig, lora_recover


def thread_names() -> list[str]:
    """Names of this process's threads (Linux: /proc/self/task/*/comm; gloo's are gloo_* and pt_gloo_*)."""
    names = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(names)


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def decisions(model, x) -> list:
    rl = model.rank_controller
    rl.begin()
    model.loss(x[:, :-1], x[:, 1:])
    return [ep.actions.tolist() for ep in rl.collect()]


def recovery() -> dict:
    """LoRA recovery of a tiny GPT, data-parallel (the test runs the same in one process)."""
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, context=32))
    tokens = torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(3)).numpy()
    r = lora_recover(
        model, tokens, RecoveryConfig(steps=6, batch_size=4, lora_r=4, lora_alpha=8, warmup_steps=2, targets=("qkv",))
    )
    return {"loss_first": r["loss_first"], "loss_last": r["loss_last"],
            "weights": [float(p.detach().double().sum()) for p in model.parameters()]}  # fmt: skip


def main(out: Path) -> None:
    # as drrl train does: the work in its own frame, so its DDP module and collectives are gone at teardown
    world, _ = setup("cpu")
    try:
        report = work(world)
        report["threads_before_teardown"] = thread_names()
    finally:
        teardown(world)  # the group is freed here, so gloo's threads stop now, not at interpreter exit
    report["threads_after_teardown"] = thread_names()
    (out / f"rank{world.rank}.json").write_text(json.dumps(report))


def work(world) -> dict:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=64, n_layer=2, n_head=2, d_model=32, context=32, attention="drrl",
        attention_kwargs={"controller": "rl", "segment": 8},
    )  # fmt: skip
    model = build_model(cfg).train()
    rl = model.rank_controller
    policy_ids = {id(p) for p in rl.parameters()}
    policy_names = [n for n, p in model.named_parameters() if id(p) in policy_ids]
    step_module = wrap(model, world, torch.device("cpu"), "ddp", ignore=policy_names)
    ppo = PPO(rl.policy, comm=Collectives(world))
    lm_params = [p for p in model.parameters() if id(p) not in policy_ids]
    optimizer = torch.optim.AdamW(lm_params, lr=1e-2)
    report = {"rank": world.rank}

    # Processes start with different exploration streams and running bases; broadcast_state aligns them.
    rl.generator.manual_seed(100 + world.rank)
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.add_(world.rank)
    same = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(7))
    report["unsynced_decisions"] = decisions(model, same)
    for step in range(3):
        broadcast_state(model, rl.generator, world)
        report[f"decisions_{step}"] = decisions(model, same)  # same batch on every process
        # then a hybrid step on this process's own rows: the LM through DDP, the policy through PPO
        broadcast_state(model, rl.generator, world)
        own = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1000 * step + world.rank))
        rl.begin()
        loss = step_module(own[:, :-1], own[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        episodes = rl.collect()
        report[f"own_decisions_{step}"] = [ep.actions.tolist() for ep in episodes]
        ppo.update(episodes, scale=1.0)
        check_in_sync(model, world, step + 1)
    report["policy_checksum"] = [float(p.detach().double().sum()) for p in rl.parameters()]
    with torch.no_grad():  # one process drifts: the check must notice
        next(model.parameters()).add_(1e-3 * world.rank)
    try:
        check_in_sync(model, world, 99)
        report["divergence_detected"] = False
    except DrrlError as e:
        report["divergence_detected"] = str(e)
    report["recovery"] = recovery()
    return report


if __name__ == "__main__":
    main(Path(sys.argv[1]))
