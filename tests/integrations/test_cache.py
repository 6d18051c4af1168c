"""drrl.integrations.cache: generation through Hugging Face ``generate()`` with keys kept at rank (tiny random models,
a GQA Llama and GPT-2; nothing downloaded)."""

import logging

import pytest
import torch

from drrl.attention.drrl import calibrating
from drrl.controllers import TableController, attach_controller
from drrl.errors import DrrlError
from drrl.integrations.cache import LowRankCache, observed_widths
from drrl.integrations.hf import apply_dynamic_rank, cache_bytes_per_token, cache_kwarg, remove_dynamic_rank
from tests.integrations.test_hf import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
D = 16  # head_dim of both tiny models


def calibrated(make, seed=0, **kw):
    model = make(seed)
    ref = make(seed)  # an unpatched copy with the same weights
    layers = apply_dynamic_rank(model, **{"segment": 8, "bucket": 4, **kw})
    ids = torch.randint(2, 100, (3, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), calibrating(model):
        model(ids)
    return model, ref, layers


def prompts(n, lengths, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 100, (n_tok,), generator=g) for n_tok in lengths[:n]]


def left_padded(seqs, pad=1):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :], mask[i, width - len(s) :] = s, 1
    return ids, mask


def greedy(model, ids, mask=None, n=32, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=1, **kw)  # fmt: skip


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
def test_at_full_width_greedy_generation_equals_the_dense_model(make):
    model, ref, layers = calibrated(make, controller="fixed", rank=D)
    for p in prompts(3, [5, 13, 21]):  # batch 1, several prompts (segments of 8: prefill and decode cross them)
        cache = LowRankCache(model)
        assert cache.widths == {0: D, 1: D}
        out = greedy(model, p[None], **{cache_kwarg(): cache})
        assert torch.equal(out, greedy(ref, p[None]))
    ids, mask = left_padded(prompts(3, [5, 13, 21], seed=3))  # a left-padded batch
    for m in layers:
        m.pop_stats()
    out = greedy(model, ids, mask, **{cache_kwarg(): LowRankCache(model)})
    assert torch.equal(out, greedy(ref, ids, mask))
    st = layers[0].pop_stats()
    assert st.get("hf_exact_calls", 0) == 0 and st["hf_cache_calls"] == 32  # the padded prefill and 31 steps


@pytest.mark.parametrize(
    ("kw", "table"),
    [
        ({"controller": "fixed", "rank": 8}, None),
        ({"controller": "fixed", "rank": D}, [[16, 8, 12, 4], [4, 12, 8, 16, 8]]),  # per layer and segment
        ({"controller": "fixed", "rank": D}, [[[16, 4], [8, 12], 8, [4, 16]], [12]]),  # per key/value head
    ],
    ids=["fixed-8", "table", "per-head-table"],
)
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
def test_below_full_width_prefill_and_decode_agree_with_a_full_low_rank_forward(make, kw, table):
    model, _, layers = calibrated(make, **kw)
    if table is not None:
        if make is tiny_gpt2:  # MHA: 4 key/value heads
            table = [[e * 2 if isinstance(e, list) else e for e in row] for row in table]
        attach_controller(layers, TableController(table))
    ids = prompts(1, [19])[0][None]
    cache = LowRankCache(model)
    with torch.no_grad():
        pre = model(ids, use_cache=True, **{cache_kwarg(): cache}).logits
        steps = [ids]
        nxt = pre[:, -1:].argmax(-1)
        for _ in range(6):  # decode steps that cross the segment boundaries at 24 (and the table's ranks)
            steps.append(nxt)
            logit = model(nxt, use_cache=True, **{cache_kwarg(): cache}).logits
            full = model(torch.cat(steps, 1)).logits  # the full low-rank forward over the same tokens, no cache
            torch.testing.assert_close(logit[:, -1], full[:, -1], rtol=1e-9, atol=1e-9)
            nxt = logit[:, -1:].argmax(-1)
        torch.testing.assert_close(pre, model(ids).logits, rtol=1e-12, atol=1e-12)  # the prefill is the plain forward
    assert layers[0].pop_stats()["hf_cache_calls"] == 6  # every decode step read the keys at rank
    assert (full - make(0)(torch.cat(steps, 1)).logits).abs().max() > 1e-4  # low rank did change the model


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
def test_sampling_at_full_width_draws_what_the_dense_model_draws(make):
    model, ref, _ = calibrated(make, controller="fixed", rank=D, cache=True)
    ids, mask = left_padded(prompts(2, [7, 12], seed=4))
    outs = []
    for m in (model, ref):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(m.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=True, temperature=0.8,
                                   top_k=0, pad_token_id=1))  # fmt: skip
    assert torch.equal(*outs)


def test_cache_bytes_from_tensors_equal_the_formula():
    model, _, layers = calibrated(tiny_llama, controller="fixed", rank=D)
    attach_controller(layers, TableController([[4, 8], [12]]))
    cache = LowRankCache(model)
    assert cache.widths == {0: 8, 1: 12}  # each layer's widest rank
    ids = torch.randint(2, 100, (3, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg(): cache})
        model(ids[:, :1], use_cache=True, **{cache_kwarg(): cache})
    per_token = cache_bytes_per_token(model, cache.widths, bytes_per_value=8)  # float64
    assert cache.nbytes() == per_token * 3 * 31
    assert cache.nbytes() < cache_bytes_per_token(model, None, bytes_per_value=8) * 3 * 31
    cache.crop(-5)  # negative: tokens to remove (transformers 4.x and 5)
    assert cache.get_seq_length() == 26 and cache.nbytes() == per_token * 3 * 26
    assert LowRankCache(model, widths=4).widths == {0: 4, 1: 4}
    narrow = LowRankCache(model, widths=4)  # narrower than the table's ranks: capped, counted
    for m in layers:
        m.pop_stats()
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg(): narrow})
        model(ids[:, :1], use_cache=True, **{cache_kwarg(): narrow})
    assert layers[0].pop_stats()["hf_cache_capped"] == 1 and layers[1].pop_stats()["hf_cache_capped"] == 1
    assert LowRankCache(model, widths={1: 16}).widths == {0: 8, 1: 16}


@pytest.mark.parametrize("grow", [1, 3, 256])
def test_the_buffers_grow_in_steps_and_keep_generation_exact(grow, monkeypatch):
    import drrl.integrations.cache as cache_mod

    monkeypatch.setattr(cache_mod, "GROW", grow)
    model, ref, _ = calibrated(tiny_llama, controller="fixed", rank=D)
    p = prompts(1, [11])[0][None]
    cache = LowRankCache(model)
    assert torch.equal(greedy(model, p, n=20, **{cache_kwarg(): cache}), greedy(ref, p, n=20))
    per_token = cache_bytes_per_token(model, cache.widths, bytes_per_value=8)
    assert cache.nbytes() == per_token * 30  # 11 + 20 − 1 cached tokens
    assert cache.nbytes() <= cache.allocated_bytes() <= cache.nbytes() + per_token * grow


def test_a_cache_repeated_along_the_batch_decodes_as_a_batch_prefill_does():
    model, _, _ = calibrated(tiny_llama, controller="fixed", rank=8)
    p = prompts(1, [13])[0][None]
    one, two = LowRankCache(model), LowRankCache(model)
    kw1, kw2 = {cache_kwarg(): one}, {cache_kwarg(): two}
    with torch.no_grad():
        model(p, use_cache=True, **kw1)
        one.batch_repeat_interleave(2)  # new tensors: the layer adopts them, then grows from them
        model(p.repeat(2, 1), use_cache=True, **kw2)
        step = torch.tensor([[5], [7]])
        for _ in range(3):
            a, b = model(step, use_cache=True, **kw1).logits, model(step, use_cache=True, **kw2).logits
            torch.testing.assert_close(a, b)
            step = a[:, -1].argmax(-1, keepdim=True)
    assert one.get_seq_length() == two.get_seq_length() == 16


def test_observed_widths_give_a_dynamic_controller_a_narrower_cache():
    model, _, layers = calibrated(tiny_llama, controller="energy", tau=0.7)
    assert LowRankCache(model).widths == {0: D, 1: D}  # a controller that reads statistics: r_max unless measured
    ids = torch.randint(2, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    widths = observed_widths(model, ids)
    assert widths == {m.layer_idx: max(max(p.ranks) for p in m.last_plans) for m in layers}
    assert all(w < D for w in widths.values()), widths  # the energy rule keeps fewer than d_head columns here
    cache = LowRankCache(model, widths)
    for m in layers:
        m.pop_stats()
    greedy(model, ids[:1], n=6, **{cache_kwarg(): cache})  # its own prefill's ranks fit the measured widths
    assert cache.nbytes() == cache_bytes_per_token(model, widths, bytes_per_value=8) * 45
    assert all(m.pop_stats().get("hf_cache_capped", 0) == 0 for m in layers)
    with pytest.raises(DrrlError, match="apply_dynamic_rank"):
        observed_widths(tiny_llama(), ids)


def test_the_cache_switch_and_the_warned_exact_fallback(caplog):
    model, ref, layers = calibrated(tiny_llama, controller="fixed", rank=D)
    p = prompts(1, [9])[0][None]
    with caplog.at_level(logging.WARNING, logger="drrl.integrations.hf"):
        plain = greedy(model, p, n=8)  # Hugging Face's own cache: exact, counted, warned once per layer
    assert torch.equal(plain, greedy(ref, p, n=8))
    assert layers[0].pop_stats()["hf_exact_calls"] == 7
    assert sum("LowRankCache" in r.message for r in caplog.records) == 2  # one per layer, not one per call
    remove_dynamic_rank(model)
    layers = apply_dynamic_rank(model, controller="fixed", rank=D, segment=8, bucket=4, cache=True)
    with torch.no_grad(), calibrating(model):
        model(torch.randint(2, 100, (3, 64), generator=torch.Generator().manual_seed(5)))
    assert torch.equal(greedy(model, p, n=8), plain)
    st = layers[0].pop_stats()
    assert st.get("hf_exact_calls", 0) == 0 and st["hf_cache_calls"] == 7
    apply_dynamic_rank(model, controller="fixed", rank=D, segment=8, bucket=4)  # cache=False turns the switch off
    assert "generate" not in vars(model)
    apply_dynamic_rank(model, controller="fixed", rank=D, segment=8, bucket=4, cache=True)
    remove_dynamic_rank(model)
    assert "generate" not in vars(model)


def test_bad_caches_are_clear_errors():
    model = tiny_llama()
    with pytest.raises(DrrlError, match="apply_dynamic_rank"):
        LowRankCache(model)
    apply_dynamic_rank(model, controller="fixed", rank=8, segment=8, bucket=4)
    with pytest.raises(DrrlError, match="calibrated bases"):
        LowRankCache(model)
    with torch.no_grad(), calibrating(model):
        model(torch.randint(2, 100, (1, 16)))
    with pytest.raises(DrrlError, match="cache width must be in 1..r_max=16, got 17"):
        LowRankCache(model, widths=17)
