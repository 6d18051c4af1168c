"""Data-parallel training under torchrun (2 CPU processes, gloo) and fault tolerance.

The multi-process tests launch ``python -m torch.distributed.run --standalone --nproc_per_node 2`` in a
subprocess with one thread per process, exactly as a user would.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drrl.data.tokens import sample_batch
from drrl.errors import ConfigError
from drrl.rl import RLController
from drrl.rl.policy import RankPolicy
from drrl.rl.ppo import PPO, Episode
from drrl.train.checkpoint import list_checkpoints
from drrl.train.distributed import World, shard_rows, sum_gradients

WORKER = Path(__file__).with_name("ddp_worker.py")
CONFIG = Path(__file__).parents[2] / "configs" / "shakespeare-gpt-tiny.yaml"  # every size is overridden


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def _train_cmd(overrides: list[str], out: Path, *extra: str, nproc: int = 2) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    args = ["-m", "drrl", "-q", "train", str(CONFIG), "--out", str(out), *sets, "--set", "train.threads=1", *extra]
    return [sys.executable, *args] if nproc == 1 else _torchrun(*args, nproc=nproc)


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _eval(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def _overrides(tiny_overrides_list: list[str], **changes) -> list[str]:
    base = dict(o.split("=", 1) for o in tiny_overrides_list)
    base.update({"train.max_steps": "6", "train.eval_every": "0", "train.checkpoint_every": "3"})
    base.update(changes)
    return [f"{k}={v}" for k, v in base.items()]


# ---------------------------------------------------------------- in-process pieces


def test_shard_rows_splits_the_step_batch_or_names_the_fix():
    shards = [shard_rows(8, World(rank=r, size=4)) for r in range(4)]
    assert [list(range(8))[s] for s in shards] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert shard_rows(8, World()) == slice(0, 8)
    with pytest.raises(ConfigError, match="cannot be split over 3 processes; make it a multiple of 3"):
        shard_rows(8, World(rank=0, size=3))


def test_a_process_reads_only_its_rows_of_the_step_batch():
    tokens = torch.arange(5000).numpy()
    x, y = sample_batch(tokens, 8, 16, seed=3, step=11)
    for r in range(2):
        rows = shard_rows(8, World(rank=r, size=2))
        xr, yr = sample_batch(tokens, 8, 16, seed=3, step=11, rows=rows)
        assert torch.equal(xr, x[rows]) and torch.equal(yr, y[rows])


def test_sum_gradients_is_the_identity_in_a_world_of_one():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    sum_gradients([p], World())
    assert p.grad.tolist() == [1.0, 2.0, 3.0]


class _WorldOfOne:
    """Collectives of a single process: what PPO(comm=...) sees with one process."""

    def sum(self, values):
        return [float(v) for v in values]

    def sum_gradients(self, params):
        pass


def _episodes(n: int, nb: int = 4, n_layers: int = 2, seed: int = 0) -> list[Episode]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = 5
        out.append(Episode(
            feats=torch.randn(k, _n_features(nb), generator=g), layers=torch.tensor([0, 0, 1, 1, 1]),
            segments=torch.tensor([0, 1, 0, 1, 2]), prev=torch.full((k,), nb), allowed=torch.ones(k, nb, dtype=torch.bool),
            actions=torch.randint(nb, (k,), generator=g), logp=torch.full((k,), -math.log(nb)),
            values=torch.zeros(k), rewards=torch.randn(k, generator=g), eps=0.1,
        ))  # fmt: skip
    return out


def _n_features(nb: int) -> int:
    return RLController.n_features(nb)


def test_ppo_with_collectives_of_one_process_takes_the_plain_step():
    """The distributed PPO path (global advantage statistics, loss over the global decision count, summed
    gradients) reduces to the single-process update when there is one process."""
    nb = 4
    results = []
    for comm in (None, _WorldOfOne()):
        torch.manual_seed(0)
        policy = RankPolicy(_n_features(nb), nb, 2)
        stats = PPO(policy, comm=comm).update(_episodes(3))
        results.append(([p.detach().clone() for p in policy.parameters()], stats))
    (p0, s0), (p1, s1) = results
    for a, b in zip(p0, p1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)  # Adam steps are ±lr = 3e-4 per epoch
    assert s0.keys() == s1.keys()
    for k in s0:
        assert s0[k] == pytest.approx(s1[k], rel=1e-3, abs=1e-5)


def test_ppo_with_collectives_and_no_episodes_anywhere_does_nothing():
    policy = RankPolicy(_n_features(4), 4, 2)
    before = [p.detach().clone() for p in policy.parameters()]
    assert PPO(policy, comm=_WorldOfOne()).update([]) == {}
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


# ---------------------------------------------------------------- two processes


@pytest.mark.distributed
def test_rank_decisions_and_parameters_agree_across_processes(tmp_path):
    _run(_torchrun(str(WORKER), str(tmp_path)), timeout=120)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["unsynced_decisions"] != r1["unsynced_decisions"]  # different generators and bases disagree ...
    for step in range(3):  # ... after broadcast_state the same batch gets the same decisions everywhere
        assert r0[f"decisions_{step}"] == r1[f"decisions_{step}"]
    assert r0["policy_checksum"] == r1["policy_checksum"]  # PPO's summed gradients kept the policies equal
    assert "diverged from rank 0" in r0["divergence_detected"]
    # LoRA recovery: both processes merge the same adapters, those of the one-process run on the same batches
    assert r0["recovery"] == r1["recovery"]
    sys.path.insert(0, str(WORKER.parent))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    alone = ddp_worker.recovery()
    assert r0["recovery"]["loss_first"] == pytest.approx(alone["loss_first"], rel=1e-5)
    assert r0["recovery"]["loss_last"] == pytest.approx(alone["loss_last"], rel=1e-4)
    assert r0["recovery"]["weights"] == pytest.approx(alone["weights"], rel=1e-4, abs=1e-4)
    assert r0["divergence_detected"] == r1["divergence_detected"]
    # teardown frees the group: gloo's threads, alive before it, are joined by it (a group left to interpreter
    # exit is what made processes abort under load), on Linux where threads have names to read
    if sys.platform == "linux":
        for r in (r0, r1):
            assert any("gloo" in n for n in r["threads_before_teardown"])
            assert not any("gloo" in n for n in r["threads_after_teardown"]), r["threads_after_teardown"]


@pytest.mark.distributed
def test_two_processes_follow_the_one_process_trajectory_and_resume_across_process_counts(
    tiny_overrides_list, tmp_path
):
    ov = _overrides(tiny_overrides_list, **{"model.dropout": "0.0"})
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_train_cmd(ov, one, nproc=1))
    proc = _run(_train_cmd(ov, two))
    assert proc.stdout.count("eval (") == 1  # rank 0 reports, once
    e1, e2 = _eval(one), _eval(two)
    assert e2["processes"] == 2 and e2["tokens"] == e1["tokens"]
    assert e2["loss"] == pytest.approx(e1["loss"], rel=1e-5)
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one writer, no duplicates
    for a, b in zip((one / "metrics.jsonl").read_text().splitlines(), lines, strict=True):
        a = json.loads(a)
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    ckpt = list_checkpoints(two)[-1]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world_size"] == 2 and "torch.rank1" in load_file(ckpt / "rng.safetensors")

    # a 2-process checkpoint resumes in 1 process, and a 1-process checkpoint in 2 processes
    for src, nproc, name in ((two, 1, "two-then-one"), (one, 2, "one-then-two")):
        dst = tmp_path / name
        step3 = list_checkpoints(src)[0]
        assert step3.name == "step_0000003"
        shutil.copytree(step3, dst / "checkpoints" / step3.name)
        _run(_train_cmd(ov, dst, "--resume", nproc=nproc))
        assert _eval(dst)["loss"] == pytest.approx(e1["loss"], rel=1e-5)


@pytest.mark.distributed
def test_sigkill_at_a_random_step_then_resume_reaches_the_same_final_loss(tiny_overrides_list, tmp_path):
    """Kill every process of a 2-process run with SIGKILL mid-run; --resume ends bit-identical to a run
    that was never interrupted (dropout on: each process's RNG stream is restored too)."""
    ov = _overrides(tiny_overrides_list, **{"train.max_steps": "8", "train.checkpoint_every": "2"})
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    _run(_train_cmd(ov, clean))
    kill_after = random.Random(os.getpid()).randint(3, 7)  # a step that is not the last
    proc = subprocess.Popen(
        _train_cmd(ov, killed), env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if steps and max(steps) >= kill_after:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before step {kill_after}: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed / "eval.json").exists()
    _run(_train_cmd(ov, killed, "--resume"))
    assert _eval(killed)["loss"] == _eval(clean)["loss"], f"killed after step {kill_after}"
    assert (killed / "metrics.jsonl").read_text().count('"final": true') == 1


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["hybrid", "policy"])
def test_rank_policy_trains_under_ddp_with_processes_in_step(tiny_overrides_list, tmp_path, mode):
    """The RL rank policy trains in 2 processes, beside the language model (hybrid) or alone (policy: the LM is
    frozen, so DDP has nothing to do and PPO alone synchronises); the parameters are compared across processes
    at every step (checkpoint_every=1) and the run would stop if they ever differed."""
    ov = _overrides(
        tiny_overrides_list,
        **{
            "model.attention": "drrl", "model.attention_kwargs.controller": "rl",
            "model.attention_kwargs.segment": "8", "train.mode": mode, "train.max_steps": "3",
            "train.checkpoint_every": "1", "train.keep_checkpoints": "1",
        },
    )  # fmt: skip
    out = tmp_path / mode
    _run(_train_cmd(ov, out))
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"rl"' in x]
    assert len(rec) == 3 and all(math.isfinite(r["rl"]["mean_reward"]) for r in rec)
    assert "policy_optimizer.safetensors" in os.listdir(list_checkpoints(out)[-1])


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.distributed
@pytest.mark.skipif(not _has_fsdp2(), reason="FSDP2 needs torch >= 2.6")
def test_fsdp_matches_ddp_and_its_checkpoints_resume_anywhere(tiny_overrides_list, tmp_path):
    ov = _overrides(tiny_overrides_list, **{"model.dropout": "0.0"})
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _run(_train_cmd(ov, ddp))
    _run(_train_cmd([*ov, "train.distributed=fsdp"], fsdp))
    assert _eval(fsdp)["loss"] == pytest.approx(_eval(ddp)["loss"], rel=1e-5)
    resumed, step3 = tmp_path / "fsdp-then-one", list_checkpoints(fsdp)[0]
    shutil.copytree(step3, resumed / "checkpoints" / step3.name)
    _run(_train_cmd(ov, resumed, "--resume", nproc=1))  # a full, ordinary checkpoint
    assert _eval(resumed)["loss"] == pytest.approx(_eval(ddp)["loss"], rel=1e-5)
    # and FSDP resumes its own checkpoint (the optimizer state is sharded again): bit for bit
    again = tmp_path / "fsdp-then-fsdp"
    shutil.copytree(step3, again / "checkpoints" / step3.name)
    _run(_train_cmd([*ov, "train.distributed=fsdp"], again, "--resume"))
    assert _eval(again)["loss"] == _eval(fsdp)["loss"]


def test_commands_that_run_in_one_process_refuse_torchrun(monkeypatch, capsys, tmp_path):
    from drrl.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["eval", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        "drrl: error: drrl eval runs in one process; launch it without torchrun (only train and classify use "
        "several processes)"
    )


def test_a_numbered_gpu_under_torchrun_is_refused(monkeypatch):
    from drrl.train.distributed import setup

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="would put every process on one GPU; use cuda"):
        setup("cuda:1")


def test_fsdp_with_a_rank_policy_is_a_config_error(tiny_overrides_list):
    from drrl.train.config import RunConfig

    sets = ["model.attention=drrl", "model.attention_kwargs.controller=rl", "train.mode=hybrid"]
    with pytest.raises(ConfigError, match="train.distributed.*use ddp for controller=rl"):
        RunConfig.load(None, [*tiny_overrides_list, *sets, "train.distributed=fsdp"])


@pytest.mark.distributed
def test_sigterm_to_every_process_writes_one_checkpoint_and_the_run_resumes(tiny_overrides_list, tmp_path):
    """What a scheduler does at pre-emption: SIGTERM to the launcher and all its workers. The workers agree on
    the step to stop after, rank 0 checkpoints it, and --resume finishes the run."""
    ov = _overrides(tiny_overrides_list, **{"train.max_steps": "12", "train.checkpoint_every": "0"})
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(ov, out), env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"loss"') >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("stopped by SIGTERM after step") == 1 and "--resume" in err  # rank 0 speaks for all
    (ckpt,) = list_checkpoints(out)
    stopped = json.loads((ckpt / "state.json").read_text())["step"]
    assert 2 <= stopped < 12 and not (out / "eval.json").exists()
    _run(_train_cmd(ov, out, "--resume"))
    assert _eval(out)["step"] == 12
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 13))


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_two_gpus_follow_the_one_gpu_trajectory(tiny_overrides_list, tmp_path):
    ov = _overrides(tiny_overrides_list, **{"model.dropout": "0.0", "train.device": "cuda", "train.precision": "fp32"})
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_train_cmd(ov, one, nproc=1))
    _run(_train_cmd(ov, two))
    assert _eval(two)["processes"] == 2
    assert _eval(two)["loss"] == pytest.approx(_eval(one)["loss"], rel=1e-4)  # TF32 and reduction order
