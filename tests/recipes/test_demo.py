"""The main job (drrl demo) end to end on a tiny randomly initialised Llama with GQA and a local corpus."""

import json

import numpy as np
import pytest

from drrl.cli import main
from drrl.errors import ConfigError, DataError
from drrl.recipes.demo import DemoConfig, protocol_windows, run_demo

ROW_KEYS = {"method", "ppl", "ppl_ratio", "score_flops_reduction", "planned_score_flops_reduction",
            "attn_flops_reduction", "attn_time_ratio", "decode_time_ratio"}  # fmt: skip


def test_demo_end_to_end(tiny_model_dir, text_corpus, tmp_path):
    cfg = DemoConfig(model=tiny_model_dir, corpus=text_corpus, context=64, segment=16, eval_windows=2,
                     calib_windows=2, policy_steps=2, betas=(0.05, 0.5), taus=(0.97,), timing_repeats=1,
                     budgets=(), fidelities=("cosine",))  # fmt: skip
    rep = run_demo(cfg, tmp_path, quiet=True)
    names = [r["method"] for r in rep["rows"]]
    for need in ("full", "static", "random", "energy", "drrl", "drrl-beta=0.5", "drrl-frozen"):
        assert need in names
    for r in rep["rows"]:
        assert ROW_KEYS <= set(r)
        assert r["ppl"] > 1 and r["attn_time_ratio"] > 0 and r["decode_time_ratio"] > 0
        # every segment runs at its own rank: what executes is what the decided ranks count
        assert r["score_flops_reduction"] == pytest.approx(r["planned_score_flops_reduction"], abs=1e-12)
    rows = {r["method"]: r for r in rep["rows"]}
    assert rows["full"]["ppl_ratio"] == 1 and rows["full"]["score_flops_reduction"] == 0
    # a static rank below d saves exactly its share of the score FLOPs (the scores are all it changes)
    st = rows["static"]
    assert st["score_flops_reduction"] == pytest.approx(1 - st["mean_rank"] / 16, abs=1e-9)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in on_disk["rows"]] == names
    assert (tmp_path / "pareto.png").stat().st_size > 0 and (tmp_path / "ranks.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "| drrl |" in report and "pareto.png" in report
    grid = on_disk["rank_grids"]["drrl"]
    assert len(grid) == 2 and len(grid[0]) == 4  # layers x segments
    # the frozen ablation replays drrl's mean ranks (nearest bucket) as a table: the same ranks on every window
    frozen = on_disk["rank_grids"]["drrl-frozen"]
    nearest = [[min(on_disk["buckets"], key=lambda b, x=x: (abs(b - x), -b)) for x in row] for row in grid]
    assert frozen == nearest
    assert on_disk["input_adaptivity"]["drrl-frozen"] == 0.0 and on_disk["input_adaptivity"]["static"] == 0.0
    assert 0 <= on_disk["input_adaptivity"]["drrl"] <= 1 and "Input adaptivity" in report
    use = on_disk["feature_use"]["drrl"]
    assert use["replayed"] == 1.0 and set(use) == {"replayed", "energy", "query norm", "key norm", "position"}
    assert "drrl-frozen" not in on_disk["feature_use"] and "What the policies read" in report
    (cmp,) = on_disk["comparisons"]  # no budgets: drrl against its frozen table only
    assert (cmp["method"], cmp["reference"]) == ("drrl", "drrl-frozen") and cmp["low"] <= cmp["high"]


def test_demo_at_budgets_compares_every_method_at_the_same_cut(tiny_model_dir, text_corpus, tmp_path):
    cfg = DemoConfig(model=tiny_model_dir, corpus=text_corpus, context=64, segment=16, bucket=4, eval_windows=2,
                     calib_windows=2, policy_steps=2, betas=(0.5,), taus=(0.97,), timing_repeats=1, static_ranks=(),
                     budgets=(0.4,), fidelities=("fisher", "kl", "cosine"))  # fmt: skip
    rep = run_demo(cfg, tmp_path, quiet=True)
    rows = {r["method"]: r for r in rep["rows"]}
    for name in ("drrl@40%", "drrl-frozen@40%", "alloc@40%", "static@40%", "drrl-cosine@40%", "drrl-kl@40%",
                 "drrl-frozen-cosine@40%", "drrl", "drrl-cosine", "drrl-kl", "drrl-frozen-cosine"):  # fmt: skip
        assert name in rows
    assert rep["output_fisher"]["windows"] == 1 and rep["output_fisher"]["seconds"] > 0
    # the static rows meet the budget by construction (buckets 4..16: the uniform bucket within 60% is 8)
    assert rep["budgets"]["@40%"]["uniform_rank"] == 8 and rows["static@40%"]["score_flops_reduction"] == 0.5
    assert rows["alloc@40%"]["score_flops_reduction"] >= 0.4 - 1e-9
    assert rows["alloc-cells@40%"]["score_flops_reduction"] >= 0.4 - 1e-9  # the Fisher table per (layer, segment)
    assert rows["alloc-heads@40%"]["score_flops_reduction"] >= 0.4 - 1e-9  # ... and per key/value head
    assert rep["budgets"]["cell_errors"]["forwards"] == 3  # one window at each bucket below r_max (4, 8, 12)
    alloc = rep["budgets"]["@40%"]["allocation"]
    assert len(alloc) == 2 and sum(alloc) / (2 * 16) <= 0.6 + 1e-9
    for p in rep["budgets"]["@40%"]["policies"].values():
        assert p["tuned_fraction"] <= 0.6 + 1e-9  # the cost shift meets it on the tuning windows
        assert p["lagrange"] != cfg.lagrange_init  # trained with the budget: dual ascent moved the multiplier
    sens = rep["budgets"]["sensitivity"]
    assert sens["ranks"] == [8, 16] and sens["forwards"] == 1 + 2 * 1
    # the heuristics at the same cut: the energy rule's τ meets it on the tuning windows; random's mean is its rank
    b = rep["budgets"]["@40%"]
    assert "energy@40%" in rows and "random@40%" in rows
    assert 0 < b["energy_tau"] <= 1 and b["energy_tuned_fraction"] <= 0.6 + 1e-9
    assert b["random_mean_rank"] == pytest.approx(0.6 * 16)
    # DR-RL against every method at the same budget, with a bootstrap interval; the ratio is the rows' ppl ratio
    cmp = {(c["method"], c["reference"]): c for c in rep["comparisons"]}
    refs = {"drrl-frozen@40%", "alloc@40%", "static@40%", "energy@40%", "random@40%", "drrl-cosine@40%",
            "drrl-frozen-cosine@40%", "drrl-kl@40%", "drrl-frozen-kl@40%", "alloc-cells@40%", "alloc-heads@40%"}  # fmt: skip
    assert {r for m, r in cmp if m == "drrl@40%"} == refs
    for (m, r), c in cmp.items():
        assert c["low"] <= c["ratio"] <= c["high"] and c["windows"] == 2
        assert c["ratio"] == pytest.approx(rows[m]["ppl"] / rows[r]["ppl"], rel=1e-9)
    report = (tmp_path / "report.md").read_text()
    assert "`alloc@B`" in report and "| drrl@40% | alloc@40% |" in report


def test_demo_cli_quick_and_bad_input(tiny_model_dir, text_corpus, tmp_path, capsys):
    # the defaults: every method at a 40% cut, the fisher reward; no β sweep
    assert main(["-q", "demo", "--quick", "--model", tiny_model_dir, "--corpus", text_corpus,
                 "--out", str(tmp_path / "d")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    for name in ("full", "drrl@40%", "drrl-frozen@40%", "alloc@40%", "static@40%", "energy@40%", "random@40%"):
        assert f"| {name} |" in out
    assert "| drrl |" not in out and (tmp_path / "d" / "results.json").is_file()
    rep = json.loads((tmp_path / "d" / "results.json").read_text())
    assert rep["config"]["fidelities"] == ["fisher"] and rep["policy_overhead"]["method"] == "drrl@40%"
    assert "alloc-cells@40%" in out and "alloc-heads@40%" in out
    assert main(["-q", "demo", "--budgets", "none", "--model", tiny_model_dir, "--out", str(tmp_path / "y")]) != 0
    assert "needs a budget or a β" in capsys.readouterr().err and not (tmp_path / "y").exists()
    code = main(["-q", "demo", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "model" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="tau"):
        DemoConfig(taus=(1.5,))
    with pytest.raises(ConfigError, match="repeat a method name"):
        DemoConfig(betas=(0.5, 0.1, 0.10))
    with pytest.raises(ConfigError, match="beta"):
        DemoConfig(betas=(float("nan"),))
    with pytest.raises(ConfigError, match="device"):
        DemoConfig(device="gpu")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["-q", "demo", "--model", tiny_model_dir, "--out", str(afile)]) != 0
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "x"


def test_calibration_and_policy_windows_are_disjoint():
    train = np.arange(1000)
    calib, policy = protocol_windows(train, 6, 12, 65)
    seen_c = {int(t) for w in calib for t in w}
    seen_p = {int(t) for w in policy for t in w}
    assert len(calib) == 6 and len(policy) == 12 and not seen_c & seen_p
    with pytest.raises(DataError, match="two disjoint halves"):
        protocol_windows(train, 2, 2, 600)
