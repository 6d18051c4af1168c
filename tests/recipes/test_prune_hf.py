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
    """A tiny Qwen3.5 saved as the hub's Qwen3.5 checkpoints are (the image-text model: a vision tower and a 3-layer
    language model with two Gated DeltaNet layers, 2 key heads of d_k 8 serving 4 value heads, and one attention
    layer), with the offline GPT-2 tokenizer. AutoModelForCausalLM reads its language model."""
    d = tmp_path_factory.mktemp("tiny-qwen35")
    tok = gpt2_tokenizer_into(d)
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_size=48, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=6, layer_types=["linear_attention", "linear_attention", "full_attention"],
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=2,
                  temporal_patch_size=1, spatial_merge_size=1)  # fmt: skip
    config = transformers.Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True)
    transformers.Qwen3_5ForConditionalGeneration(config).save_pretrained(d)
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
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)  # a text model now: the vision tower stays
        assert model.config.model_type == "qwen3_5_text" and model.config.linear_key_head_dim == 4
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
    assert "--context applies to transformers models only" in capsys.readouterr().err and not out.exists()


HF_RUN = ["model.kind=hf", "model.dropout=0.0", "model.hf.model_type=qwen3_5_text", "model.hf.intermediate_size=48",
          "model.hf.num_key_value_heads=1", "model.hf.head_dim=16", "model.hf.linear_num_key_heads=2",
          "model.hf.linear_num_value_heads=4", "model.hf.linear_key_head_dim=8", "model.hf.linear_value_head_dim=8",
          "model.hf.layer_types=[linear_attention, full_attention]", "train.max_steps=2", "train.eval_every=0",
          "train.checkpoint_every=2"]  # fmt: skip


def test_a_drrl_run_of_a_transformers_hybrid_prunes_into_standard_folders(text_corpus, tmp_path, capsys):
    """`drrl train` with model.kind=hf, then `drrl prune RUN_DIR`: the folders load in plain transformers with a
    tokenizer that encodes as the run's (tiktoken GPT-2) did, and ratio 0 keeps the run's own perplexity."""
    import drrl
    from drrl.data.tokenizer import get_tokenizer
    from drrl.data.tokens import load_tokens
    from drrl.eval.perplexity import evaluate_lm
    from drrl.train import RunConfig, train
    from tests.conftest import tiny_overrides

    run = tmp_path / "run"
    train(RunConfig.load(None, tiny_overrides(text_corpus) + HF_RUN), run, progress=False)
    out = tmp_path / "prune"
    args = ["-q", "prune", str(run), "--selector", "taylor", "--ratio", "0,0.5", "--eval-tokens", "256",
            "--decode-batch", "2", "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    rep = json.loads((out / "report.json").read_text())
    assert rep["corpus"] == text_corpus and rep["config"]["context"] is None  # the run's corpus and context
    zero, half = rep["rows"]
    assert zero["ppl_ratio"] == 1.0 and zero["state_bytes_ratio"] == 1.0 and half["state_bytes_ratio"] == 0.5
    wrapped, run_tok, _ = drrl.load(run)  # drrl's own model and loss on the same windows
    run_ppl = evaluate_lm(wrapped, load_tokens(text_corpus, "test", run_tok)[:257], 32, batch_size=8)["ppl"]
    assert rep["unpruned"]["ppl"] == pytest.approx(run_ppl, rel=1e-5)
    folder = out / "models" / "taylor-0.5"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "To be, or not to be: that is the question."
    assert tok.encode(text) == get_tokenizer("gpt2").encode(text)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.linear_key_head_dim == 4 and half["reload_max_abs_diff"] <= 1e-5
