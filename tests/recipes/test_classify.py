"""drrl classify end to end on a tiny BERT and a local tsv corpus (no downloads)."""

import json

import pytest
import torch

from drrl.cli import main
from drrl.data.sentences import length_batches
from drrl.errors import ConfigError
from drrl.recipes.classify import ClassifyConfig, run_table

WORDS = "good great fine bad awful poor film plot actor scene music".split()


@pytest.fixture(scope="module")
def tsv(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(240):
        n = 3 + i % 5
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (n,), generator=g).tolist()]
        label = int(
            sum(w in ("good", "great", "fine") for w in words) > sum(w in ("bad", "awful", "poor") for w in words)
        )
        lines.append(" ".join(words) + f"\t{label}")
    p = tmp_path_factory.mktemp("data") / "toy.tsv"
    p.write_text("\n".join(lines) + "\n")
    return f"tsv:{p}"


def test_length_batches_have_no_padding_and_cover_everything():
    ids = [[0] * n for n in (3, 5, 3, 4, 5, 5, 3)]
    batches = length_batches(ids, 2, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len({len(ids[i]) for i in b}) == 1 and len(b) <= 2 for b in batches)


def test_table_end_to_end(tiny_bert_with_tokenizer, tsv, tmp_path):
    methods = [
        {"method": "full"},
        {"method": "static", "attention_kwargs": {"rank": 4}},
        {"method": "performer", "attention_kwargs": {"n_features": 16}},
        {"method": "nystrom", "attention_kwargs": {"n_landmarks": 4}},
        {"method": "linformer", "attention_kwargs": {"max_len": 64, "k": 8}},
        {"method": "drrl", "attention_kwargs": {"basis": "calibrated"}},
    ]
    sets = [f"data={tsv}", f"model={tiny_bert_with_tokenizer}", "seeds=[0, 1]", "batch_size=16", "epochs=2",
            f"methods={json.dumps(methods)}"]  # fmt: skip
    rep = run_table(ClassifyConfig.load(None, sets), tmp_path, quiet=True)
    rows = {r["method"]: r for r in rep["rows"]}
    assert set(rows) == {m["method"] for m in methods}
    for r in rows.values():
        assert 0 <= r["accuracy_mean"] <= 1 and r["seeds"] == [0, 1] and r["attn_flops"] > 0
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert {"method", "accuracy_mean", "accuracy_std", "seeds", "attn_flops"} <= set(on_disk["rows"][0])
    assert "| performer |" in (tmp_path / "report.md").read_text()


def test_cli_and_bad_configs(tiny_bert_with_tokenizer, tsv, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: '{tsv}'\nmodel: '{tiny_bert_with_tokenizer}'\nseeds: [0]\nmethods:\n  - method: full\n")
    assert main(["-q", "classify", str(cfg), "--out", str(tmp_path / "o"), "--set", "quick=true"]) == 0
    assert "| full |" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="attention"):
        ClassifyConfig.load(None, ['methods=[{"method": "bogus"}]'])
    with pytest.raises(ConfigError, match="distinct"):
        ClassifyConfig.load(None, ['methods=[{"method": "full"}, {"method": "full"}]'])
    assert main(["-q", "classify", str(cfg), "--set", "epochs=0"]) == 2


@pytest.mark.parametrize(("beta", "expect"), [(0.0, "largest"), (5.0, "smallest")])
def test_rl_controller_learns_the_cost_tradeoff_while_fine_tuning(
    tiny_bert_with_tokenizer, tsv, tmp_path, beta, expect
):
    """controller: rl trains the encoder's shared rank policy with PPO beside the fine-tuning; a free cost
    (β = 0) drives it to the largest rank (best fidelity), a dominant cost to the smallest."""
    methods = [{
        "method": "drrl-rl", "attention": "drrl",
        "attention_kwargs": {"basis": "calibrated", "controller": "rl", "bucket": 2},
        "rollout": 2, "rl": {"beta": beta, "gamma": 0.0, "lr": 0.01, "eps_start": 0.5, "eps_end": 0.2},
    }]  # fmt: skip
    sets = [f"data={tsv}", f"model={tiny_bert_with_tokenizer}", "seeds=[0]", "batch_size=8", "epochs=3",
            "lr=1e-3", f"methods={json.dumps(methods)}"]  # fmt: skip
    rep = run_table(ClassifyConfig.load(None, sets), tmp_path, quiet=True)
    ranks = rep["rows"][0]["mean_ranks"]
    assert len(ranks) == 2  # one per encoder layer (d_head 8: buckets 2, 4, 6, 8)
    assert all(r == (8 if expect == "largest" else 2) for r in ranks), ranks


@pytest.mark.distributed
def test_torchrun_shares_the_runs_among_processes(tiny_bert_with_tokenizer, tsv, tmp_path):
    """2 processes run half the (method, seed) fine-tunes each; rank 0 writes the same table one process does."""
    import os
    import subprocess
    import sys

    methods = [{"method": "full"}, {"method": "static", "attention_kwargs": {"rank": 4}}]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: '{tsv}'\nmodel: '{tiny_bert_with_tokenizer}'\nseeds: [0, 1]\nbatch_size: 16\n"
                   f"epochs: 1\nmethods: {json.dumps(methods)}\n")  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    drrl = ["-m", "drrl", "-q", "classify", str(cfg), "--out"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for cmd in ([sys.executable, *drrl, str(tmp_path / "one")], [*torchrun, *drrl, str(tmp_path / "two")]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("| full |") == 1  # rank 0 reports, once
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert [(r["method"], r["seed"]) for r in two["runs"]] == [(m["method"], s) for m in methods for s in (0, 1)]
    assert [r["accuracy"] for r in two["runs"]] == [r["accuracy"] for r in one["runs"]]
    assert [r["validation_accuracy"] for r in two["runs"]] == [r["validation_accuracy"] for r in one["runs"]]
