"""drrl compress end to end on a tiny randomly initialised Llama and a local corpus."""

import json

import pytest
import torch

from drrl.adapters.export import load_adapted
from drrl.cli import main
from drrl.errors import ConfigError
from drrl.recipes.compress import CompressConfig, run_compress

ROW_KEYS = {"method", "flops_ratio", "flops_reduction", "mlp_rel_error", "ppl", "decode_speedup"}


def _cfg(text_corpus, **kw):
    base = dict(context=64, calib_windows=3, eval_windows=2, sample_tokens=128, score_tokens=64, error_tokens=64,
                decode_tokens=2, timing_repeats=1, calibration=text_corpus, corpus=text_corpus)  # fmt: skip
    base.update(kw)
    return CompressConfig(**base)


def test_compress_end_to_end(tiny_model_dir, text_corpus, tmp_path):
    cfg = _cfg(text_corpus, model=tiny_model_dir, flops_ratios=[1.0, 0.6])
    rep = run_compress(cfg, tmp_path, quiet=True)
    rows = {(r["method"], r["flops_ratio"]): r for r in rep["rows"]}
    assert set(rows) == {("dense", 1.0)} | {(m, f) for m in ("rana", "cats", "svd") for f in (1.0, 0.6)}
    for r in rows.values():
        assert ROW_KEYS <= set(r)
    assert rows["rana", 1.0]["mlp_rel_error"] < 1e-10 and rows["rana", 1.0]["ppl"] == pytest.approx(
        rows["dense", 1.0]["ppl"], rel=1e-5)  # fmt: skip
    for m in ("rana", "cats", "svd"):  # executed FLOPs near the budget on held-out text
        assert rows[m, 0.6]["flops_reduction"] == pytest.approx(0.4, abs=0.08), (m, rows[m, 0.6])
        assert rows[m, 0.6]["mlp_rel_error"] > 0
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert len(on_disk["rows"]) == 7 and "| rana |" in (tmp_path / "report.md").read_text()
    # the saved model reloads onto its base and reproduces the reported perplexity
    from drrl.data import get_tokenizer, load_tokens, spread_windows
    from drrl.integrations.hub import load_causal_lm
    from drrl.recipes.compress import perplexity

    base, path = load_causal_lm(tiny_model_dir)
    model = load_adapted(base, rows["rana", 0.6]["saved"])
    w = spread_windows(load_tokens(text_corpus, "test", get_tokenizer("hf:" + path)), 2, 65)
    assert perplexity(model, w, torch.device("cpu")) == pytest.approx(rows["rana", 0.6]["ppl"], rel=1e-6)


def test_compress_cli_and_bad_input(tiny_model_dir, text_corpus, tmp_path, capsys):
    args = [
        "-q",
        "compress",
        "--quick",
        "--model",
        tiny_model_dir,
        "--calibration",
        text_corpus,
        "--corpus",
        text_corpus,
        "--method",
        "rana,svd",
        "--flops-ratio",
        "0.5",
        "--no-save",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| rana |" in out and "| svd |" in out and not (tmp_path / "o" / "models").exists()
    assert main(["-q", "compress", "--method", "bogus", "--out", str(tmp_path / "x")]) == 2
    assert "methods" in capsys.readouterr().err
    assert main(["-q", "compress", "--flops-ratio", "1.5", "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "file").write_text("")
    assert main(["-q", "compress", "--model", tiny_model_dir, "--out", str(tmp_path / "file")]) == 1
    with pytest.raises(ConfigError, match="targets"):
        _cfg(text_corpus, targets="attention")


def test_compress_lora_recovery(tiny_model_dir, text_corpus, tmp_path):
    cfg = _cfg(text_corpus, model=tiny_model_dir, methods=["rana", "svd"], flops_ratios=[0.6], recover_steps=3,
               recover_lr=1e-2, targets="mlp")  # fmt: skip
    rep = run_compress(cfg, tmp_path, quiet=True)
    rows = {r["method"]: r for r in rep["rows"]}
    for m in ("rana", "svd"):
        r = rows[m]
        assert r["recovery_targets"] == ["k_proj", "o_proj", "q_proj", "v_proj"]  # the layers left dense
        assert r["ppl_recovered"] > 1 and r["ppl_recovered"] != r["ppl"]
        assert r["ppl_ratio_recovered"] == pytest.approx(r["ppl_recovered"] / rows["dense"]["ppl"])
    assert "after LoRA recovery" in (tmp_path / "report.md").read_text()
    # the saved model is the recovered one: it reloads and reproduces the recovered perplexity
    from drrl.data import get_tokenizer, load_tokens, spread_windows
    from drrl.integrations.hub import load_causal_lm
    from drrl.recipes.compress import perplexity

    base, path = load_causal_lm(tiny_model_dir)
    model = load_adapted(base, rows["rana"]["saved"])
    w = spread_windows(load_tokens(text_corpus, "test", get_tokenizer("hf:" + path)), 2, 65)
    assert perplexity(model, w, torch.device("cpu")) == pytest.approx(rows["rana"]["ppl_recovered"], rel=1e-5)
    with pytest.raises(ConfigError, match="causal LMs only"):
        _cfg(text_corpus, model="minilm", recover_steps=2)


@pytest.fixture(scope="module")
def tiny_bert_and_sentences(tiny_bert_with_tokenizer, tmp_path_factory):
    words = "good great fine bad awful poor film plot actor scene music".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[j] for j in torch.randint(0, 11, (3 + i % 6,), generator=g).tolist()) + f"\t{i % 2}"
             for i in range(300)]  # fmt: skip
    p = tmp_path_factory.mktemp("sentences") / "s.tsv"
    p.write_text("\n".join(lines) + "\n")
    return tiny_bert_with_tokenizer, f"tsv:{p}"


def test_compress_encoder_reports_embedding_cosine(tiny_bert_and_sentences, tmp_path):
    model, data = tiny_bert_and_sentences
    cfg = _cfg(data, model=model, flops_ratios=[1.0, 0.6], methods=["rana", "svd"], calib_sentences=128,
               eval_sentences=64, save=False)  # fmt: skip
    rep = run_compress(cfg, tmp_path, quiet=True)
    rows = {(r["method"], r["flops_ratio"]): r for r in rep["rows"]}
    assert rep["kind"] == "encoder" and rows["dense", 1.0]["cosine"] == pytest.approx(1.0)
    assert rows["rana", 1.0]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows["rana", 0.6]["cosine"] < 1.0 and "ppl" not in rows["rana", 0.6]
    assert "embedding cosine" in (tmp_path / "report.md").read_text()
