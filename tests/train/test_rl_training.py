"""`drrl train` in hybrid (L_LM + λ·L_RL) and policy (language model frozen) modes."""

import json
import shutil

import pytest
import torch

from drrl.errors import CheckpointError, ConfigError
from drrl.models import GPT
from drrl.train import RunConfig, train
from drrl.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # a tiny GPT: one thread (tests/conftest.py)

RL = [
    "model.attention=drrl",
    "model.attention_kwargs.segment=8",
    "model.attention_kwargs.controller=rl",
    "train.eval_every=0",
    "eval.periodic_max_tokens=256",
    "rl.eps_start=0.3",
]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def policy_keys(state):
    return {k for k in state if ".controller." in k or k.startswith("rank_controller.")}


def test_hybrid_training_learns_both_and_saves_the_policy(tiny_overrides_list, tmp_path):
    cfg = RunConfig.load(None, tiny_overrides_list + RL + ["train.mode=hybrid", "train.max_steps=3"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["ppl"] > 1
    logged = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert len(logged) == 3
    for m in logged:
        assert {"mean_reward", "entropy", "approx_kl", "epsilon"} <= m["rl"].keys()
        assert -1.5 < m["rl"]["mean_reward"] <= 1.0
    ckpt = latest_checkpoint(tmp_path / "run")
    assert "policy_optimizer.safetensors" in ckpt.state["files"] and ckpt.state["rl"]["updates"] == 3
    torch.manual_seed(cfg.train.seed)
    init = GPT(cfg.model).state_dict()
    trained = GPT(cfg.model)
    ckpt.load_model(trained)
    after = trained.state_dict()
    assert not torch.equal(after["wte.weight"], init["wte.weight"])  # the language model learned
    key = "blocks.0.attn.controller.policy.pi.weight"
    assert not torch.equal(after[key], init[key])  # and so did the policy


def test_a_budget_moves_the_multiplier_logs_it_and_resumes_it(tiny_overrides_list, tmp_path):
    cfg = RunConfig.load(None, tiny_overrides_list + RL + ["train.mode=hybrid", "train.max_steps=2", "rl.budget=0.6"])
    train(cfg, tmp_path / "run", progress=False)
    logged = [m["rl"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert len(logged) == 2 and all({"lagrange", "score_fraction", "budget_gap"} <= m.keys() for m in logged)
    assert logged[0]["lagrange"] != cfg.rl.beta  # the dual step ran
    assert logged[-1]["budget_gap"] == pytest.approx(logged[-1]["score_fraction"] - 0.4)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.state["rl"]["lagrange"] == pytest.approx(logged[-1]["lagrange"])  # a resumed run continues from it


def test_policy_mode_freezes_a_pretrained_language_model(tiny_overrides_list, tmp_path):
    base = RunConfig.load(None, tiny_overrides_list + ["train.max_steps=2", "train.eval_every=0"])
    train(base, tmp_path / "lm", progress=False)
    lm = GPT(base.model)
    latest_checkpoint(tmp_path / "lm").load_model(lm)
    overrides = ["train.mode=policy", "train.max_steps=2", f"train.init_from={tmp_path / 'lm'}"]
    cfg = RunConfig.load(None, tiny_overrides_list + RL + overrides)
    train(cfg, tmp_path / "run", progress=False)
    init = {**GPT(cfg.model).state_dict(), **lm.state_dict()}  # the source's weights, fresh policy keys
    trained = GPT(cfg.model)
    latest_checkpoint(tmp_path / "run").load_model(trained)
    after = trained.state_dict()
    policy = policy_keys(after)
    weights = {n for n, _ in trained.named_parameters(remove_duplicate=False)} - policy
    assert policy and weights and all(torch.equal(after[k], init[k]) for k in weights)  # buffers (bases) may move
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"rl"') == 2  # the policy learned each step


def test_init_from_a_different_model_is_a_clear_error(tiny_overrides_list, tmp_path):
    train(RunConfig.load(None, tiny_overrides_list + ["train.max_steps=1"]), tmp_path / "lm", progress=False)
    cfg = RunConfig.load(None, tiny_overrides_list + ["model.d_model=64", f"train.init_from={tmp_path / 'lm'}"])
    with pytest.raises(CheckpointError, match="does not fit the model"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_hybrid_training_resumes_exactly(tiny_overrides_list, tmp_path):
    cfg = RunConfig.load(
        None, tiny_overrides_list + RL + ["train.mode=hybrid", "train.max_steps=4", "train.checkpoint_every=2"]
    )
    a, b = tmp_path / "a", tmp_path / "b"
    straight = train(cfg, a, progress=False)
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_0000004")
    (b / "eval.json").unlink()
    resumed = train(cfg, b, resume=True, progress=False)
    la = {m["step"]: (m["loss"], m["rl"]["mean_reward"]) for m in metrics(a) if "loss" in m}
    lb = {m["step"]: (m["loss"], m["rl"]["mean_reward"]) for m in metrics(b) if "loss" in m}
    assert sorted(lb) == [1, 2, 3, 4]
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-6), step
    assert resumed["ppl"] == pytest.approx(straight["ppl"], rel=1e-6)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.mode=hybrid"], "set model.attention=drrl and model.attention_kwargs.controller=rl"),
        (["model.attention=drrl", "model.attention_kwargs.controller=rl"], "needs train.mode=hybrid"),
        (["rl.discount=1.5"], "discount"),
        (["rl.budget=1.2"], "budget"),
        (
            ["model.attention=drrl", "model.attention_kwargs.controller=rl", "train.mode=hybrid", "rl.fidelity=kl"],
            "rl.fidelity",
        ),
    ],
)
def test_rl_configuration_errors(tiny_overrides_list, overrides, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.load(None, tiny_overrides_list + overrides)
