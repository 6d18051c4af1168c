import json

import pytest

from drrl.errors import ConfigError
from drrl.train import RunConfig
from drrl.train.loop import train


@pytest.fixture
def finished_run(tiny_overrides_list, tmp_path):
    ov = [*tiny_overrides_list, "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=0"]
    train(RunConfig.load(None, ov), tmp_path / "run", progress=False)
    return ov, tmp_path / "run"


@pytest.mark.parametrize("change", ["train.lr=0.01", "train.max_steps=8", "train.seed=1", "train.grad_accum=2"])
def test_resume_rejects_a_different_trajectory(finished_run, change):
    ov, run = finished_run
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"--resume: .* differs from the checkpoint"):
        train(RunConfig.load(None, [*ov, change]), run, resume=True, progress=False)
    assert (run / "metrics.jsonl").read_text() == before


def test_resume_allows_cadence_changes_and_survives_a_cut_metrics_line(finished_run):
    ov, run = finished_run
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # a line cut by a crash
    result = train(RunConfig.load(None, [*ov, "train.log_every=2"]), run, resume=True, progress=False)
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r for r in records if r.get("final")] == [records[-1]]  # one final evaluation, the new one
    assert result["step"] == 4


def test_resume_of_a_finished_run_reevaluates_through_the_cli(finished_run, capsys, tmp_path):
    from drrl.cli import main

    ov, run = finished_run
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("{}\n")
    argv = ["-q", "train", str(defaults), "--out", str(run), "--resume"]
    for item in ov:
        argv += ["--set", item]
    assert main(argv) == 0
    assert "no training steps left" in capsys.readouterr().out
