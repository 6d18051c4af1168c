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


@pytest.mark.parametrize("kind", ["gpt", "deltanet"])
def test_same_seed_gives_bitwise_identical_metrics(tiny_overrides_list, tmp_path, kind):
    """Two CPU runs of one config: every logged loss, gradient norm and evaluation is bit-for-bit equal
    (timings aside). JSON floats are written with full precision, so string equality is bit equality."""
    ov = [*tiny_overrides_list, "train.max_steps=4", "train.eval_every=2", f"model.kind={kind}", "model.dropout=0.0"]
    runs = []
    for name in ("a", "b"):
        train(RunConfig.load(None, ov), tmp_path / name, progress=False)
        recs = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs.append([json.dumps({k: v for k, v in r.items() if k != "tokens_per_s"}, sort_keys=True) for r in recs])
    assert runs[0] == runs[1] and len(runs[0]) >= 6


def test_sigterm_writes_a_checkpoint_and_the_run_resumes(tiny_overrides_list, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from drrl.train.checkpoint import latest_checkpoint

    run, config = tmp_path / "run", tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    ov = [*tiny_overrides_list, "train.max_steps=60", "train.checkpoint_every=1000", "train.eval_every=0"]
    cmd = [sys.executable, "-m", "drrl", "-q", "train", str(config), "--out", str(run)]
    for o in ov:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM after step" in err and "--resume" in err
    step = int(err.split("after step ")[1].split(";")[0])
    assert 2 <= step < 60 and latest_checkpoint(run).step == step  # a checkpoint the schedule did not ask for
    result = train(RunConfig.load(config, ov), run, resume=True, progress=False)
    assert result["step"] == 60 and (run / "eval.json").is_file()
