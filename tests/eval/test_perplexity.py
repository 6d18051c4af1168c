"""The one perplexity (drrl.eval.evaluate_lm) on drrl's LMs and Hugging Face models, token arrays and windows."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from drrl.eval import evaluate_lm, machine
from drrl.models import GPT, GPTConfig


def naive_ppl(logits_fn, windows):
    nll, n = 0.0, 0
    for w in windows:
        logits = logits_fn(w[None, :-1]).double()
        nll += F.cross_entropy(logits[0], w[1:], reduction="sum").item()
        n += len(w) - 1
    return math.exp(nll / n)


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_windows_of_a_hugging_face_model_match_a_float64_reference():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 64, (17,), generator=g) for _ in range(3)]
    seen = []
    res = evaluate_lm(model, windows, batch_size=1, on_batch=lambda n, s: seen.append((n, s)), per_batch=True)
    ref = naive_ppl(lambda x: model(input_ids=x, use_cache=False).logits, windows)
    assert math.isclose(res["ppl"], ref, rel_tol=1e-5)
    assert res["tokens"] == 48 and [n for n, _ in seen] == [16, 16, 16] and all(s >= 0 for _, s in seen)
    # per window (batch 1): summed NLL and targets, as a float64 reference computes them one window at a time
    assert res["batch_tokens"] == [16, 16, 16]
    for nll, w in zip(res["batch_nll"], windows, strict=True):
        assert math.isclose(nll, 16 * math.log(naive_ppl(lambda x: model(input_ids=x, use_cache=False).logits, [w])),
                            rel_tol=1e-5)  # fmt: skip


def test_a_token_array_and_its_windows_give_the_same_perplexity():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=32, context=16, vocab_size=64)).eval()
    tokens = np.random.default_rng(0).integers(0, 64, 16 * 4 + 1).astype(np.int64)
    by_array = evaluate_lm(model, tokens, 16, batch_size=3)
    windows = [torch.from_numpy(tokens[i * 16 : (i + 1) * 16 + 1]) for i in range(4)]
    by_windows = evaluate_lm(model, windows, batch_size=2)
    assert by_array["tokens"] == by_windows["tokens"] == 64
    assert math.isclose(by_array["ppl"], by_windows["ppl"], rel_tol=1e-6)
    assert math.isclose(by_array["ppl"], naive_ppl(model, windows), rel_tol=1e-5)
    assert not model.training  # the caller's mode is kept


def test_machine_stamp_names_the_cpu_threads_and_torch():
    stamp = machine()
    assert f"{torch.get_num_threads()} threads" in stamp and torch.__version__ in stamp
