"""Q/K channel pruning of transformers' Gated DeltaNet layers (drrl.integrations.gated_deltanet): tiny random
Qwen3-Next (fused qkvz, interleaved per key head) and Qwen3.5 (fused qkv, blocked) models built here, with more
value heads than key heads so a key head serves several value heads."""

import copy
import sys

import pytest
import torch

from drrl.integrations.gated_deltanet import (
    SCALES,
    calibrate_hf,
    delta_layers,
    join_qk,
    prune_hf,
    recurrent_state_bytes,
    scaled_eps,
    slice_layer,
    split_qk,
    state_bytes_formula,
)
from drrl.pruning import available_selectors

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3_5ForCausalLM") or not hasattr(transformers, "Qwen3NextForCausalLM"):
    pytest.skip("this transformers has no Qwen3-Next / Qwen3.5", allow_module_level=True)

SIZES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, intermediate_size=48, linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=8, linear_value_head_dim=6, linear_conv_kernel_dim=4,
             layer_types=["linear_attention", "linear_attention", "full_attention"])  # fmt: skip


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "qwen3_next":
        cfg = transformers.Qwen3NextConfig(**SIZES, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=16)  # fmt: skip
        model = transformers.Qwen3NextForCausalLM(cfg)
    elif family == "qwen3_5_moe":
        cfg = transformers.Qwen3_5MoeTextConfig(**SIZES, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                                                shared_expert_intermediate_size=16)  # fmt: skip
        model = transformers.Qwen3_5MoeForCausalLM(cfg)
    else:
        model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**SIZES))
    with torch.no_grad():  # trained-looking gates: decays and betas away from their init extremes
        for m in delta_layers(model):
            m.A_log.uniform_(-2, 0)
            m.dt_bias.uniform_(-1, 1)
    return model.eval()


FAMILIES = ["qwen3_next", "qwen3_5", "qwen3_5_moe"]


def ids(seed=1, b=2, t=20):
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.fixture(scope="module")
def calibrated():
    out = {}
    for fam in FAMILIES:
        model = build(fam)
        out[fam] = (model, calibrate_hf(model, [ids(s, 2, 41) for s in (2, 3)]))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_split_and_join_are_inverse_and_follow_the_layout(family):
    h, d_k = 2, 3
    rows = torch.arange(h * (2 * d_k + 5)).float()
    q, k, rest = split_qk(rows, h, d_k, interleaved=family == "qwen3_next")
    torch.testing.assert_close(join_qk(q, k, rest, family == "qwen3_next"), rows)
    if family == "qwen3_next":  # [q0 k0 v0 z0 | q1 k1 v1 z1]: head 1's q starts one group in
        assert q[1].tolist() == [11.0, 12.0, 13.0] and k[0].tolist() == [3.0, 4.0, 5.0]
    else:  # [q0 q1 | k0 k1 | v z]
        assert q[1].tolist() == [3.0, 4.0, 5.0] and k[0].tolist() == [6.0, 7.0, 8.0]


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_records_the_kernels_q_and_k_and_puts_everything_back(family, calibrated):
    model, cal = calibrated[family]
    mod = sys.modules[type(delta_layers(model)[0]).__module__]
    before = [getattr(mod, name) for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")]
    calibrate_hf(model, [ids(4, 1, 9)], ("acts",))
    after = [getattr(mod, name) for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")]
    assert all(a is b for a, b in zip(after, before, strict=True))  # the kernels are unwrapped again
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert len(cal) == 2
    for c in cal:
        q, k = torch.cat(c.q), torch.cat(c.k)
        assert q.shape == k.shape and q.shape[1:] == (2, 8) and 0 < q.shape[0] <= 2 * 2 * 40
        assert not torch.allclose(q.norm(dim=-1), torch.ones(1))  # before the kernel's L2 norm
        assert (q > -0.2785).all()  # after SiLU (its minimum is -0.2785)
        assert c.gq.shape == c.gk.shape == (16, 32) and c.gq.abs().sum() > 0 and c.sq_sum.shape == (32,)
        assert c.tokens == 2 * 2 * 40


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_changes_nothing(family, calibrated):
    model, cal = calibrated[family]
    pruned = copy.deepcopy(model)
    info = prune_hf(pruned, 0.0, "drrqr", cal)
    assert info.d_keep == 8
    torch.testing.assert_close(logits(pruned, ids()), logits(model, ids()), rtol=0, atol=0)


def _set_eps(model, factor: float, gated: bool) -> None:
    """Multiply the ε of the gated norms (``gated``) or of every other RMSNorm by ``factor``."""
    gated_norms = {id(m.norm) for m in delta_layers(model)}
    for m in model.modules():
        if "rmsnorm" in type(m).__name__.lower() and (id(m) in gated_norms) == gated:
            attr = "variance_epsilon" if hasattr(m, "variance_epsilon") else "eps"
            setattr(m, attr, getattr(m, attr) * factor)


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_silent_channels_is_exact_up_to_the_readout_scale(family):
    """Channels whose q and k rows are zero carry nothing (conv(0) = 0, SiLU(0) = 0): slicing them away changes the
    readout only by its scale, c = √(d_k/d') = √2 here, which the gated norm turns into ε/c²: norm(c·o; ε) =
    norm(o; ε/c²). ``scale="kernel"`` is the unpruned model with the gated norms' ε halved; ``scale="eps"`` restores
    the gated norms exactly and doubles every other norm's ε."""
    model = build(family)
    keep = torch.tensor([[0, 2, 5, 7], [1, 3, 4, 6]])
    with torch.no_grad():
        for m in delta_layers(model):
            fused = m.in_proj_qkvz if family == "qwen3_next" else m.in_proj_qkv
            q, k, _ = split_qk(fused.weight, 2, 8, family == "qwen3_next")
            drop = torch.ones(2, 8, dtype=torch.bool)
            drop[torch.arange(2)[:, None], keep] = False
            q[drop] = 0
            k[drop] = 0
    ref = logits(model, ids())
    pruned = {}
    for scale in SCALES:
        pruned[scale] = copy.deepcopy(model)
        info = prune_hf(pruned[scale], 0.5, "l1", [], scale=scale)  # L1 keeps the channels whose rows are not zero
        assert info.kept[0] == keep.tolist()
    assert pruned["eps"].config.rms_norm_eps == 2 * model.config.rms_norm_eps
    assert pruned["kernel"].config.rms_norm_eps == model.config.rms_norm_eps
    twin = copy.deepcopy(model)
    _set_eps(twin, 0.5, gated=True)
    torch.testing.assert_close(logits(pruned["kernel"], ids()), logits(twin, ids()), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(pruned["kernel"], ids()), ref, atol=1e-5)
    twin = copy.deepcopy(model)
    _set_eps(twin, 2.0, gated=False)
    torch.testing.assert_close(logits(pruned["eps"], ids()), logits(twin, ids()), rtol=1e-5, atol=1e-5)
    with scaled_eps(pruned["eps"], 0.5):  # the other scale, in place, restored afterwards
        torch.testing.assert_close(logits(pruned["eps"], ids()), logits(pruned["kernel"], ids()), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(pruned["eps"], ids()), logits(twin, ids()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_permutation_within_a_key_head_moves_the_kept_channels_with_it(family, calibrated):
    """Permuting one key head's channels in q, k and their convolution channels leaves the model's function alone;
    pruning the permuted model at the permuted indices must then give the same logits (a wrong slice of the fused
    projection or of the convolution would not)."""
    model, _ = calibrated[family]
    inter = family == "qwen3_next"
    perm = torch.tensor([5, 2, 7, 0, 3, 1, 6, 4])
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        for m in delta_layers(permuted):
            fused = m.in_proj_qkvz if inter else m.in_proj_qkv
            for t, layout in ((fused.weight, inter), (m.conv1d.weight, False)):
                q, k, _ = split_qk(t, 2, 8, layout)
                q[1] = q[1][perm].clone()
                k[1] = k[1][perm].clone()
    torch.testing.assert_close(logits(permuted, ids()), logits(model, ids()), rtol=1e-4, atol=1e-5)
    keep = torch.tensor([[0, 1, 4, 6], [0, 3, 5, 7]])
    inverse = torch.argsort(perm)  # channel c of the original is channel inverse[c] of the permuted head
    keep_p = keep.clone()
    keep_p[1] = inverse[keep[1]]
    a, b = copy.deepcopy(model), copy.deepcopy(permuted)
    for la, lb in zip(delta_layers(a), delta_layers(b), strict=True):
        slice_layer(la, keep)
        slice_layer(lb, keep_p.sort(-1).values)
    torch.testing.assert_close(logits(b, ids()), logits(a, ids()), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits(a, ids()), logits(model, ids()), atol=1e-4)  # something was removed


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("selector", list(available_selectors()))
def test_every_selector_prunes_and_the_saved_folder_reloads_with_the_same_logits(family, selector, calibrated,
                                                                                tmp_path):  # fmt: skip
    model, cal = calibrated[family]
    pruned = copy.deepcopy(model)
    info = prune_hf(pruned, 0.5, selector, cal)
    assert info.d_keep == 4 and pruned.config.linear_key_head_dim == 4
    for m in delta_layers(pruned):
        assert m.head_k_dim == 4 and m.key_dim == 8 and m.conv1d.weight.shape[0] == m.conv_dim == 2 * 8 + 4 * 6
    pruned.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(back, ids()), logits(pruned, ids()), rtol=0, atol=1e-5)
    with torch.no_grad():
        out = back.generate(ids(b=1, t=6), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


@pytest.mark.parametrize("family", FAMILIES)
def test_recurrent_state_bytes_from_the_cache_equal_the_formula(family, calibrated):
    model, cal = calibrated[family]
    pruned = copy.deepcopy(model)
    prune_hf(pruned, 0.5, "l1", cal)
    got = {}
    for name, m in (("dense", model), ("pruned", pruned)):
        with torch.no_grad():
            out = m(input_ids=ids(b=3), use_cache=True)
        got[name] = recurrent_state_bytes(out.past_key_values)
        assert got[name] == state_bytes_formula(m.config, batch=3) > 0
    assert got["pruned"] * 2 == got["dense"]  # num_v_heads × d' × d_v: half of d_k


def test_models_without_gated_deltanet_layers_and_emptying_ratios_are_refused(calibrated):
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                                   num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match="no Gated DeltaNet layers"):
        prune_hf(llama, 0.5, "l1", [])
    other = torch.nn.Sequential(type("OlmoHybridGatedDeltaNet", (torch.nn.Module,), {})())  # another structure
    with pytest.raises(ValueError, match="cannot prune OlmoHybridGatedDeltaNet yet"):
        delta_layers(other)
    model, cal = calibrated["qwen3_5"]
    with pytest.raises(ValueError, match="would remove all 8"):
        prune_hf(copy.deepcopy(model), 0.9, "l1", cal)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_hf(copy.deepcopy(model), 1.0, "l1", cal)
