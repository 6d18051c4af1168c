"""`drrl prune --model` (drrl.recipes.prune_hf): a tiny random Qwen3.5 saved with the offline GPT-2 tokenizer is
pruned by the command a user runs on a real checkpoint; its report, its standard folders, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from drrl.cli import main
from tests.conftest import gpt2_tokenizer_into

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3_5ForCausalLM"):
    pytest.skip("this transformers has no Qwen3.5", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny_qwen35_dir(tmp_path_factory):
    """A 3-layer Qwen3.5 (two Gated DeltaNet layers, 2 key heads of d_k 8 serving 4 value heads, one attention layer)
    with the offline GPT-2 tokenizer."""
    d = tmp_path_factory.mktemp("tiny-qwen35")
    tok = gpt2_tokenizer_into(d)
    torch.manual_seed(0)
    cfg = transformers.Qwen3_5TextConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_size=48, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=6, layer_types=["linear_attention", "linear_attention", "full_attention"],
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    transformers.Qwen3_5ForCausalLM(cfg).save_pretrained(d)
    return d


QUICK = ["--context", "32", "--eval-tokens", "256", "--decode-batch", "2", "--repeats", "1"]


def test_prune_model_writes_the_table_and_standard_folders(tiny_qwen35_dir, text_corpus, tmp_path, capsys):
    out = tmp_path / "prune"
    args = ["-q", "prune", "--model", str(tiny_qwen35_dir), "--calibration", text_corpus, "--selector", "l1,drrqr",
            "--ratio", "0.5", "--recover", "--recover-steps", "2", "--out", str(out), *QUICK]  # fmt: skip
    assert main(args) == 0
    assert "| drrqr | 50% | 4 |" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["unpruned"]["delta_layers"] == 2 and rep["unpruned"]["fused_projection"] == ["in_proj_qkv"]
    assert [r["selector"] for r in rep["rows"]] == ["l1", "drrqr"]
    for r in rep["rows"]:
        assert r["d_keep"] == 4 and r["state_bytes_ratio"] == 0.5 and r["ppl"] > 1 and r["ppl_recovered"] > 1
        assert r["reload_max_abs_diff"] <= 1e-5
        assert r["decode_tps_b1"] > 0 and r["decode_tps_b2"] > 0 and r["decode_speedup_b2"] > 0
        folder = out / "models" / f"{r['selector']}-0.5"
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.linear_key_head_dim == 4
        assert transformers.AutoTokenizer.from_pretrained(folder).encode("hello") == [31373]
        assert (out / "models" / f"{r['selector']}-0.5-recovered" / "config.json").is_file()
    assert (out / "report.md").read_text().count("| l1 |") == 1


def test_prune_model_bad_input_is_one_line_and_writes_nothing(tiny_qwen35_dir, tiny_model_dir, text_corpus, tmp_path,
                                                              capsys):  # fmt: skip
    out = tmp_path / "x"
    assert main(["-q", "prune", "--model", tiny_model_dir, "--calibration", text_corpus, "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "no Gated DeltaNet layers" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert main(["-q", "prune", "--model", str(tiny_qwen35_dir), "--ratio", "0.95", "--out", str(out)]) != 0
    assert "would remove all 8" in capsys.readouterr().err and not out.exists()
    assert main(["-q", "prune", "--out", str(out)]) != 0
    assert "a run folder or --model" in capsys.readouterr().err
    assert main(["-q", "prune", str(tmp_path), "--model", str(tiny_qwen35_dir), "--out", str(out)]) != 0
    assert main(["-q", "prune", str(tmp_path), "--context", "32", "--out", str(out)]) != 0
    assert "--context applies to --model only" in capsys.readouterr().err and not out.exists()
