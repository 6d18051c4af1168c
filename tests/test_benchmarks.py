"""The benchmark scripts run end to end on tiny shapes and write the JSON layout BENCHMARKS.md relies on."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_attention_benchmark_writes_its_schema(tmp_path, capsys):
    bench = load_script("attention")
    out = tmp_path / "a.json"
    argv = ["--lengths", "256", "--decode-lengths", "512", "--rounds", "1", "--min-time", "0.001", "--json", str(out)]
    bench.main(argv + ["--segments", "64"])
    data = json.loads(out.read_text())
    assert data["device"] and data["torch"]
    keys = {"L", "rank", "time_ratio_vs_sdpa", "score_flops_reduction", "overhead_fraction"}
    assert data["prefill"] and all(keys <= row.keys() for row in data["prefill"])
    fixed = [r for r in data["prefill"] if r["variant"] == "calibrated/fixed-16"][0]
    assert fixed["score_flops_reduction"] == 0.75 and fixed["kernel_score_flops_reduction"] == 0.0  # CPU pads
    assert {(r["L"], r["rank"]) for r in data["decode"]} == {(512, 16), (512, 32)}
    assert all({"L", "rank", "d", "speedup_vs_sdpa", "bytes_limit"} <= r.keys() for r in data["decode"])
    assert "prefill L=" in capsys.readouterr().out


def test_deltanet_decode_benchmark_writes_its_schema(tmp_path, capsys):
    bench = load_script("deltanet_decode")
    cfg = tmp_path / "dn.yaml"
    cfg.write_text(
        "model: {kind: deltanet, n_layer: 1, n_head: 2, d_model: 32, context: 32, vocab_size: 128,\n"
        "        deltanet: {head_k_dim: 8, head_v_dim: 8}}\n"
    )
    out = tmp_path / "d.json"
    bench.main(["--config", str(cfg), "--batches", "2", "--ratios", "0.5", "--repeats", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["removed"], r["d_keep"]) for r in rows] == [(0.0, 8), (0.5, 4)]
    assert rows[0]["mixers_speedup"] == 1.0 and rows[1]["mixers_us"] > 0 and rows[1]["model_speedup"] > 0
    assert "| 2 | 50% | 4 |" in capsys.readouterr().out


@pytest.mark.distributed
def test_ddp_throughput_benchmark_writes_its_schema(tmp_path, capsys, text_corpus):
    bench = load_script("ddp_throughput")
    out = tmp_path / "ddp.json"
    sets = [a for o in tiny_overrides(text_corpus) if not o.startswith("train.") for a in ("--set", o)]
    argv = ["--config", str(ROOT / "configs" / "shakespeare-gpt-tiny.yaml"), "--steps", "4", "--log-every", "2"]
    data = bench.main([*argv, "--repeats", "1", "--out", str(out), *sets, "--set", "train.batch_size=4",
                       "--set", "model.dropout=0.0"])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    assert set(data["runs"]) == {"single", "ddp"} and data["procs"] == 2
    assert all(r["tokens_per_s"] > 0 for rs in data["runs"].values() for r in rs)
    # the same global batch: both variants train the same model to the same loss (no dropout)
    assert data["runs"]["ddp"][0]["val_loss"] == pytest.approx(data["runs"]["single"][0]["val_loss"], rel=1e-4)
    assert data["ddp_over_single"] == data["median_tokens_per_s"]["ddp"] / data["median_tokens_per_s"]["single"]
    assert "ratio" in capsys.readouterr().out


def test_fisher_kl_benchmark_writes_its_schema(tmp_path, capsys, tiny_model_dir, text_corpus):
    bench = load_script("fisher_kl")
    out = tmp_path / "f.json"
    data = bench.main(["--model", tiny_model_dir, "--corpus", text_corpus, "--context", "48", "--segment", "16",
                       "--bucket", "4", "--ranks", "4,8", "--layers", "0,1", "--calib-windows", "1",
                       "--eval-windows", "1", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    assert [r["config"] for r in data["rows"]] == ["every layer at 4", "every layer at 8", "layer 0 alone at 4",
                                                   "layer 1 alone at 4"]  # fmt: skip
    for r in data["rows"]:
        assert r["exact_kl"] > 0 and r["estimated_kl"] > 0
    rows = data["rows"]
    # the estimate of the whole model at rank 4 sums the layers' estimates alone, up to the inputs they see
    assert rows[0]["estimated_kl"] > max(rows[2]["estimated_kl"], rows[3]["estimated_kl"])
    assert -1 <= data["spearman_estimated_vs_exact"] <= 1
    assert "| layer 1 alone at 4 |" in capsys.readouterr().out


def test_adaptivity_headroom_benchmark_writes_its_schema(tmp_path, capsys, tiny_model_dir, text_corpus):
    bench = load_script("adaptivity_headroom")
    out = tmp_path / "h.json"
    data = bench.main(["--model", tiny_model_dir, "--corpus", text_corpus, "--context", "48", "--segment", "16",
                       "--bucket", "4", "--calib-windows", "1", "--windows", "2", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"full", "static (calibration)", "static (test average)", "oracle per window"}
    assert rows["full"]["ppl_ratio"] == 1 and rows["full"]["score_fraction"] == 1
    for name in ("static (calibration)", "static (test average)", "oracle per window"):
        assert rows[name]["score_fraction"] <= 0.6 + 1e-9 and rows[name]["ppl"] > 1  # every table at the budget
    assert rows["full"]["estimated_kl"] == 0 and all(r["estimated_kl"] > 0 for n, r in rows.items() if n != "full")
    assert "| oracle per window |" in capsys.readouterr().out


def test_planning_overhead_benchmark_writes_its_schema(tmp_path, capsys, tiny_model_dir, text_corpus):
    bench = load_script("planning_overhead")
    out = tmp_path / "p.json"
    data = bench.main(["--model", tiny_model_dir, "--corpus", text_corpus, "--contexts", "32,64", "--segment", "16",
                       "--bucket", "4", "--calib-windows", "1", "--windows", "2", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    assert [r["context"] for r in data["rows"]] == [32, 64]
    for r in data["rows"]:
        assert r["decisions"] > 0 and r["decisions"] % (r["context"] // 16) == 0  # every (layer, segment) decided
        assert 0 < r["policy_s"] <= r["plan_s"] < r["drrl_forward_s"] and 0 < r["plan_fraction"] < 1
        assert r["policy_passes_s"]["extend"] > 0 and r["policy_passes_s"]["re-encode"] > 0
    assert "| 64 |" in capsys.readouterr().out


def test_generate_benchmark_writes_its_schema(tmp_path, capsys, tiny_model_dir, text_corpus):
    bench = load_script("generate")
    out = tmp_path / "g.json"
    data = bench.main(["--model", tiny_model_dir, "--corpus", text_corpus, "--lengths", "40", "--batches", "1,2",
                       "--new-tokens", "5", "--ranks", "8,16", "--budget", "0.4", "--calib-context", "64",
                       "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    rows = {(r["batch"], r["method"]): r for r in data["rows"]}
    assert {m for _, m in rows} == {"dense", "rank 8", "rank 16", "alloc@40%"}
    for b in (1, 2):
        full = rows[(b, "rank 16")]  # full width: the dense model's tokens and distributions
        assert full["greedy_agreement"] == full["top1_agreement"] == 1 and full["mean_kl"] < 1e-6
        assert full["cache_ratio"] == 1 and full["vs_full_width"] == 1  # rank 16 = head_dim: the control row
        assert "of_limit_vs_full_width" in rows[(b, "rank 8")]
        half = rows[(b, "rank 8")]
        assert half["cache_ratio"] == pytest.approx(0.75) and half["bytes_limit"] > 1 and half["mean_kl"] > 0
        assert all(r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0 for (bb, _), r in rows.items() if bb == b)
    assert "| alloc@40% |" in capsys.readouterr().out


def test_generate_benchmark_replicates_one_prompt_along_the_batch(tmp_path, capsys, tiny_model_dir, text_corpus):
    bench = load_script("generate")
    data = bench.main(["--model", tiny_model_dir, "--corpus", text_corpus, "--lengths", "40", "--batches", "1,3",
                       "--new-tokens", "4", "--ranks", "8", "--budget", "0", "--calib-context", "64", "--replicate",
                       "--repeats", "2"])  # fmt: skip
    rows = {(r["batch"], r["method"]): r for r in data["rows"]}
    assert not rows[(1, "rank 8")]["replicated"] and rows[(3, "rank 8")]["replicated"]
    for m in ("dense", "rank 8"):  # three copies of batch 1's cache (40 + 4 - 1 tokens)
        assert rows[(3, m)]["cache_bytes"] == 3 * rows[(1, m)]["cache_bytes"]
    assert rows[(3, "rank 8")]["cache_ratio"] == pytest.approx(0.75) and "mean_kl" not in rows[(3, "rank 8")]
    assert rows[(3, "rank 8")]["of_limit"] == pytest.approx(
        rows[(3, "rank 8")]["speedup"] / rows[(3, "rank 8")]["bytes_limit"]
    )
    assert "| 3 (copies) | rank 8 |" in capsys.readouterr().out


def test_rana_decode_benchmark_writes_its_schema(tmp_path, capsys, tiny_model_dir, text_corpus):
    bench = load_script("rana_decode")
    out = tmp_path / "r.json"
    data = bench.main(["--model", tiny_model_dir, "--corpus", text_corpus, "--flops-ratios", "0.56",
                       "--batches", "1,2", "--steps", "2", "--calib-windows", "2", "--calib-context", "64",
                       "--repeats", "1", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    rows = {(r["batch"], r["method"]): r for r in data["rows"]}
    assert {m for _, m in rows} == {"dense", "rana", "rana, masked matmul", "cats", "svd"}
    for b in (1, 2):
        dense = rows[(b, "dense")]
        assert dense["bytes"] == 2 * 3 * 96 * 128 * 4 and dense["bytes_limit"] == 1  # two layers' three weights
        rana, off = rows[(b, "rana")], rows[(b, "rana, masked matmul")]
        assert rana["bytes"] < off["bytes"] and 1 < rana["bytes_limit"]  # the masked matmul reads every row of A
        assert all(r["step_us"] > 0 for (bb, _), r in rows.items() if bb == b)
    assert rows[(2, "rana")]["bytes"] >= rows[(1, "rana")]["bytes"]  # two tokens keep at least one token's rows
    assert "| rana, masked matmul |" in capsys.readouterr().out


def test_rana_generate_benchmark_writes_its_schema(tmp_path, capsys, tiny_model_dir, text_corpus):
    bench = load_script("rana_generate")
    out = tmp_path / "g.json"
    data = bench.main(["--model", tiny_model_dir, "--corpus", text_corpus, "--flops-ratios", "0.6",
                       "--targets", "mlp,mlp+qkv", "--prompt-tokens", "16", "--new-tokens", "4", "--calib-windows",
                       "2", "--calib-context", "64", "--repeats", "1", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    rows = {(r["targets"], r["method"]): r for r in data["rows"]}
    assert set(rows) == {("mlp", "dense"), ("mlp", "rana"), ("mlp", "cats"), ("mlp+qkv", "dense"),
                         ("mlp+qkv", "rana")}  # fmt: skip
    assert all(r["bytes_limit"] == 1 for (_, m), r in rows.items() if m == "dense")
    assert 1 < rows[("mlp", "rana")]["bytes_limit"] < rows[("mlp+qkv", "rana")]["bytes_limit"]  # q/k/v adds rows
    assert all(r["decode_tokens_per_s"] > 0 and r["median_step_ms"] > 0 for r in rows.values())
    assert all(r["step_speedup"] == 1 and r["step_of_limit"] == 1 for (_, m), r in rows.items() if m == "dense")
    assert "| mlp+qkv | 0.60 | 1 | rana |" in capsys.readouterr().out


def test_passkey_benchmark_writes_its_schema(tmp_path, capsys, tiny_model_dir, text_corpus):
    bench = load_script("passkey")
    out = tmp_path / "p.json"
    data = bench.main(["--model", tiny_model_dir, "--corpus", text_corpus, "--lengths", "60,90", "--depths", "0.2,0.8",
                       "--keys", "1", "--ranks", "16", "--budget", "0.4", "--calib-context", "64",
                       "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    assert [r["length"] for r in data["rows"]] == [60, 90] and all(r["trials"] == 2 for r in data["rows"])
    for t in data["trials"]:
        assert abs(t["tokens"] - t["length"]) <= 2 and set(t["answers"]) == {"dense", "rank 16", "alloc@40%"}
        assert t["answers"]["rank 16"] == t["answers"]["dense"]  # full width answers as the dense model does
        assert t["passed"]["dense"] == (str(t["key"]) in t["answers"]["dense"])
    ppl = data["perplexity"]
    assert set(ppl) == {"dense", "rank 16", "alloc@40%"} and ppl["rank 16"] == pytest.approx(ppl["dense"], rel=1e-4)
    printed = capsys.readouterr().out
    assert "| prompt tokens |" in printed and "| perplexity (64 tokens) |" in printed


def test_passkey_prompt_hides_the_key_at_its_depth(tiny_model_dir):
    from transformers import AutoTokenizer

    bench = load_script("passkey")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for depth in (0.1, 0.5, 0.9):
        text = tok.decode(bench.prompt_ids(tok, 400, depth, 12345)[0])
        assert text.count("12345") == 2 and text.endswith(bench.QUESTION)
        where = text.index("12345") / len(text)
        assert abs(where - depth) < 0.1, (depth, where)


def test_calibration_length_benchmark_writes_its_schema(tmp_path, capsys, tiny_model_dir, text_corpus):
    bench = load_script("calibration_length")
    out = tmp_path / "c.json"
    data = bench.main(["--model", tiny_model_dir, "--corpus", text_corpus, "--rank", "8", "--calib-lengths", "32,96",
                       "--length", "96", "--bin", "32", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    assert [r["calib_length"] for r in data["rows"]] == [32, 96]
    assert all(len(r["kl_by_bin"]) == 3 and r["kl"] > 0 for r in data["rows"])
    assert "| 96 |" in capsys.readouterr().out
