"""`drrl prune` (drrl.recipes.prune): the selector × ratio table on a tiny trained DeltaNet run, its report, its
models, bad input; the old import path drrl.reduce."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from drrl.cli import main
from drrl.train import RunConfig, train
from tests.conftest import tiny_overrides

DELTANET = [
    "model.kind=deltanet",
    "model.dropout=0.0",
    "model.deltanet.head_k_dim=8",
    "model.deltanet.head_v_dim=8",
    "model.deltanet.chunk_size=16",
    "train.max_steps=3",
    "train.eval_every=0",
    "train.checkpoint_every=3",
]


@pytest.fixture(scope="module")
def deltanet_run(tmp_path_factory, text_corpus):
    out = tmp_path_factory.mktemp("deltanet-run")
    train(RunConfig.load(None, tiny_overrides(text_corpus) + DELTANET), out, progress=False)
    return out


def test_prune_table_report_and_models(deltanet_run, tmp_path, capsys):
    out = tmp_path / "prune"
    args = ["-q", "prune", str(deltanet_run), "--selector", "l1,drrqr,pca", "--ratio", "0.5", "--eval-tokens", "600",
            "--recover", "--recover-steps", "2", "--decode-batch", "2", "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "| drrqr | 50% | 4 |" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert [r["selector"] for r in rep["rows"]] == ["l1", "drrqr", "pca"]
    for r in rep["rows"]:
        assert {"selector", "ratio", "ppl", "ppl_ratio", "state_bytes_ratio", "decode_speedup"} <= set(r)
        assert r["state_bytes_ratio"] == 0.5 and r["d_keep"] == 4 and r["ppl"] > 1
        assert r["ppl_ratio"] == pytest.approx(r["ppl"] / rep["unpruned"]["ppl"])
        assert r["decode_speedup"] > 0 and 0 < r["utilisation"] <= 1 and r["ppl_recovered"] > 1
    assert (out / "report.md").is_file() and (out / "utilisation.png").stat().st_size > 0
    base = rep["unpruned"]
    assert len(base["utilisation_per_head"]) == 2 and len(base["utilisation_per_head"][0]) == 2  # (layers, heads)
    assert all(0 < u <= 1 for row in base["utilisation_per_head"] for u in row)
    assert all(1 <= e <= 8 for row in base["effective_rank_per_head"] for e in row)  # ≤ min(d_k, d_v)
    # a pruned model is a checkpoint that `drrl eval` reads like any run
    assert (
        main(["-q", "eval", str(out / "models" / "drrqr-0.5"), "--split", "test", "--out", str(tmp_path / "e.json")])
        == 0
    )
    assert json.loads((tmp_path / "e.json").read_text())["ppl"] > 1


def test_prune_ratio_zero_keeps_the_perplexity(deltanet_run, tmp_path):
    out = tmp_path / "p0"
    args = ["-q", "prune", str(deltanet_run), "--selector", "wanda,taylor,random", "--ratio", "0", "--eval-tokens",
            "300", "--no-save", "--decode-batch", "1", "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    assert all(r["ppl_ratio"] == pytest.approx(1.0, abs=1e-6) and r["state_bytes_ratio"] == 1.0 for r in rep["rows"])
    assert not (out / "models").exists()


def test_prune_bad_input(deltanet_run, tmp_path, tiny_cfg, capsys):
    gpt_run = tmp_path / "gpt"
    cfg = RunConfig.load(None, [f"data.corpus={tiny_cfg.data.corpus}", *tiny_overrides(tiny_cfg.data.corpus)[1:],
                                "train.max_steps=1", "train.eval_every=0"])  # fmt: skip
    train(cfg, gpt_run, progress=False)
    capsys.readouterr()
    assert main(["-q", "prune", str(gpt_run), "--out", str(tmp_path / "x")]) != 0
    assert "needs model.kind=deltanet" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["-q", "prune", str(deltanet_run), "--selector", "magic", "--out", str(tmp_path / "y")]) != 0
    assert "selectors must be among" in capsys.readouterr().err
    assert main(["-q", "prune", str(deltanet_run), "--ratio", "1.0", "--out", str(tmp_path / "y")]) != 0
    assert "[0, 1)" in capsys.readouterr().err
    assert main(["-q", "prune", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) != 0
    assert "does not exist" in capsys.readouterr().err


def test_old_import_path_warns_and_finds_every_name(monkeypatch):
    import drrl.pruning
    import drrl.recipes.prune as recipe

    monkeypatch.delitem(sys.modules, "drrl.reduce", raising=False)
    with pytest.warns(DeprecationWarning, match="drrl.reduce moved to drrl.recipes.prune and drrl.pruning"):
        old = importlib.import_module("drrl.reduce")
    for name in ("PruneConfig", "run_prune", "report_markdown", "_plot_ranks", "RecoveryConfig"):
        assert getattr(old, name) is getattr(recipe, name)
    for name in ("state_ranks", "decode_times", "calibrate", "prune_qk", "mixers"):
        assert getattr(old, name) is getattr(drrl.pruning, name)
    assert old.SELECTORS == ("random", "l1", "wanda", "taylor", "pca", "drrqr")
    with pytest.raises(AttributeError, match="moved to"):
        old.no_such_name  # noqa: B018
