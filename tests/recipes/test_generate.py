"""``drrl generate`` on a tiny random Llama (GQA) saved with the offline GPT-2 tokenizer."""

import re

import pytest
import torch

from drrl.cli import main
from drrl.recipes.generate import GenerateConfig, run_generate

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "First Citizen: Before we proceed any further, hear me speak."
LINE = re.compile(
    r"prompt (\d+) tokens, (\d+) new; decode [\d.]+ tokens/s; prefill [\d.]+ s; cache ([\d.]+) MB against "
    r"([\d.]+) MB dense \(([\d.]+)×\)"
)


def cfg(tiny_model_dir, text_corpus, **kw):
    return GenerateConfig(prompt=PROMPT, model=tiny_model_dir, corpus=text_corpus,
                          **{"max_new_tokens": 12, "calib_context": 64, **kw})  # fmt: skip


def test_full_width_generation_is_the_dense_models(tiny_model_dir, text_corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = run_generate(cfg(tiny_model_dir, text_corpus), stream=False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = dense.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.eos_token_id)  # fmt: skip
    assert res["text"] == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert res["widths"] == {0: 16, 1: 16} and res["cache_bytes"] == res["dense_cache_bytes"]
    assert res["prompt_tokens"] == ids.shape[1] and res["new_tokens"] == 12
    assert res["calib_context"] == 64  # as configured


def test_rank_and_budget_shrink_the_measured_cache(tiny_model_dir, text_corpus):
    res = run_generate(cfg(tiny_model_dir, text_corpus, rank=8, calib_context=None), stream=False)
    assert res["calib_context"] == 512  # by default the windows cover the positions generated (at least 512)
    assert res["cache_bytes"] / res["dense_cache_bytes"] == pytest.approx((8 + 16) / 32)
    res = run_generate(cfg(tiny_model_dir, text_corpus, budget=0.4), stream=False)
    assert sum(res["widths"].values()) <= 0.6 * 32 + 1e-9 and set(res["widths"].values()) <= {4, 8, 12, 16}
    keys = sum(res["widths"].values()) / 32  # the key share of the cache shrinks by the budget
    assert res["cache_bytes"] / res["dense_cache_bytes"] == pytest.approx((keys + 1) / 2)


def test_cli_streams_and_ends_with_one_line(tiny_model_dir, text_corpus, capsys):
    assert main(["-q", "generate", "--model", tiny_model_dir, "--corpus", text_corpus, "--calib-context", "64",
                 "--prompt", PROMPT, "--max-new-tokens", "8", "--rank", "8", "--temperature", "0.7"]) == 0  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    m = LINE.fullmatch(out[-1])
    assert m and int(m[2]) == 8 and float(m[5]) == pytest.approx(0.75, abs=0.01)
    assert len(out) >= 2  # the streamed text came first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "   "], "prompt is empty"),
        (["--prompt", PROMPT, "--rank", "17"], "rank must be in 1..16"),
        (["--prompt", "word " * 600], "exceed the model's 512 positions"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read the prompt file"),
        (["--prompt", PROMPT, "--budget", "1.5"], "budget must be in [0, 1)"),
        (["--prompt", PROMPT, "--adapters", "/nonexistent/adapted"], "is not an adapted model"),
    ],
)
def test_bad_input_is_a_one_line_error(tiny_model_dir, text_corpus, capsys, args, message):
    code = main(["-q", "generate", "--model", tiny_model_dir, "--corpus", text_corpus, "--calib-context", "64", *args])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and message in err, err


def test_adapters_generate_what_the_adapted_model_generates(tiny_model_dir, text_corpus, tmp_path):
    from transformers import AutoTokenizer

    from drrl.adapters import apply_rana
    from drrl.adapters.export import load_adapted, save_adapted
    from drrl.integrations.hub import load_causal_lm

    base, _ = load_causal_lm(tiny_model_dir)
    calib = [torch.randint(2, 1000, (4, 64), generator=torch.Generator().manual_seed(0))]
    rep = apply_rana(base, 0.6, calib, method="rana", targets="mlp", sample_tokens=256, score_tokens=128)
    save_adapted(base, rep, tmp_path / "rana")
    res = run_generate(cfg(tiny_model_dir, text_corpus, adapters=str(tmp_path / "rana")), stream=False)
    adapted = load_adapted(load_causal_lm(tiny_model_dir)[0], tmp_path / "rana").eval()
    for m in adapted.modules():  # the reference: no kernels, no drrl attention
        if hasattr(m, "fast"):
            m.fast = False
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = adapted.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               pad_token_id=tok.eos_token_id)  # fmt: skip
    assert res["text"] == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
