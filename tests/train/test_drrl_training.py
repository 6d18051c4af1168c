"""`drrl train --set model.attention=drrl` with every controller: rank statistics logged, exact resume."""

import json
import shutil

import pytest

from drrl.errors import ConfigError
from drrl.train import RunConfig, train

DRRL = ["model.attention=drrl", "model.attention_kwargs.segment=8", "train.max_steps=4", "eval.periodic_max_tokens=256"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "controller",
    [["model.attention_kwargs.controller=energy", "model.attention_kwargs.tau=0.9"],
     ["model.attention_kwargs.controller=fixed", "model.attention_kwargs.rank=8"],
     ["model.attention_kwargs.controller=random"]],
    ids=["energy", "fixed", "random"],
)  # fmt: skip
def test_training_with_each_controller_logs_per_layer_ranks(tiny_overrides_list, tmp_path, controller):
    cfg = RunConfig.load(None, tiny_overrides_list + DRRL + controller + ["train.eval_every=2"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["ppl"] > 1
    logged = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert len(logged) == 4
    for m in logged:
        layers = m["attention"]
        assert len(layers) == 2  # one entry per layer, counting this step's forward only
        assert all(layer["calls"] == 1 and layer["segments"] == 4 * 4 and layer["fallbacks"] == 0 for layer in layers)
    if "fixed" in controller[0]:  # segment 0 runs at full rank, the three others at rank 8
        assert all(layer["mean_rank"] == (16 + 3 * 8) / 4 for m in logged for layer in m["attention"])


def test_drrl_training_resumes_exactly(tiny_overrides_list, tmp_path):
    """The running online basis and the step counter are buffers, so a resumed run follows the same path."""
    cfg = RunConfig.load(None, tiny_overrides_list + DRRL + ["train.max_steps=6", "train.checkpoint_every=3"])
    a, b = tmp_path / "a", tmp_path / "b"
    straight = train(cfg, a, progress=False)
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_0000006")
    (b / "eval.json").unlink()
    resumed = train(cfg, b, resume=True, progress=False)
    losses = [{m["step"]: m["loss"] for m in metrics(run) if "loss" in m} for run in (a, b)]
    assert sorted(losses[1]) == list(range(1, 7))
    for step in range(1, 7):
        assert losses[1][step] == pytest.approx(losses[0][step], abs=1e-6), step
    assert resumed["ppl"] == pytest.approx(straight["ppl"], rel=1e-6)


def test_calibrated_bases_are_refused_for_training(tiny_overrides_list):
    with pytest.raises(ConfigError, match="must be online"):
        RunConfig.load(None, tiny_overrides_list + DRRL + ["model.attention_kwargs.basis=calibrated"])
