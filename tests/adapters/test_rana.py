"""apply_rana on tiny models of every supported family: exactness at the full budget, the measured FLOPs
against the budget, export and reload, merge, and clear errors."""

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from drrl.adapters import RankAdapter, apply_rana, find_sites, measured_flops, reset_counts
from drrl.adapters.export import load_adapted, merge, save_adapted
from drrl.errors import DrrlError
from drrl.models.encoder import EncoderClassifier, EncoderConfig
from drrl.models.gpt import GPT, GPTConfig

VOCAB = 97


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64)  # fmt: skip
    return BertModel(cfg).eval()


def _gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, context=64, n_layer=2, n_head=4, d_model=32)).eval()


def _encoder():
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=VOCAB, max_len=64, n_layer=2, n_head=4, d_model=32, d_ff=96, dropout=0.0)
    return EncoderClassifier(cfg).eval()


FAMILIES = {"llama": _llama, "bert": _bert, "gpt": _gpt, "encoder": _encoder}


def _out(model, x):
    y = model(input_ids=x) if hasattr(model, "generation_config") or hasattr(model, "embeddings") else model(x)
    y = getattr(y, "logits", None) if hasattr(y, "logits") else getattr(y, "last_hidden_state", y)
    return y


def _data(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 24), generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_are_found_in_every_family(family):
    mlps, qkvs = find_sites(FAMILIES[family]())
    assert len(mlps) == 2 and len(qkvs) == 2
    assert {s.kind for s in mlps} == ({"gated"} if family == "llama" else {"plain"})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rana", "cats"])  # a static factorisation at the dense cost is not full rank
def test_full_budget_keeps_the_model(family, method):
    model = FAMILIES[family]()
    x = _data(5, 1)[0]
    ref = _out(model, x)
    apply_rana(model, 1.0, _data(), method=method, targets="mlp" if method == "cats" else "mlp+qkv")
    torch.testing.assert_close(_out(model, x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rana", "svd", "cats"])
def test_measured_flops_meet_the_budget_on_calibration_data(family, method):
    model = FAMILIES[family]()
    cal = _data()
    # a plain MLP's neuron adapter computes its fc densely (half the MLP): with q/k/v dense as well, 0.56 of
    # the whole set is out of its reach, so it adapts the MLPs alone there
    targets = "mlp" if method == "cats" and family != "llama" else "mlp+qkv"
    rep = apply_rana(model, 0.56, cal, method=method, targets=targets, sample_tokens=4096)
    with torch.no_grad():
        for x in cal:
            _out(model, x)
    got = measured_flops(model, rep)
    # thresholds are set on the calibration sample (here: every token), so the mean matches up to ties and
    # the split's discrete grid (MLP budgets are met per matrix, q/k/v per stacked layer)
    assert got["ratio"] == pytest.approx(0.56, abs=0.03), got
    reset_counts(model)
    assert measured_flops(model, rep)["flops_per_token"] < got["flops_per_token"]  # counters cleared


@pytest.mark.parametrize("family", ["llama", "encoder"])
def test_rana_beats_static_svd_on_the_mlp_output_of_correlated_inputs(family):
    """RaNA's per-token mask spends the same FLOPs better than a fixed truncation in the same basis."""
    errs = {}
    x = _data(9, 1)[0]
    for method in ("rana", "svd"):
        model = FAMILIES[family]()
        site = find_sites(model)[0][0]
        hidden = {}

        def grab(m, a, d=hidden):
            d.setdefault("x", a[0])

        h = model.get_submodule(site.name).register_forward_pre_hook(grab)
        with torch.no_grad():
            _out(model, x)
            h.remove()
            ref = site.dense(hidden["x"])
            apply_rana(model, 0.56, _data(), method=method, targets="mlp")
            errs[method] = float((site.dense(hidden["x"]) - ref).square().sum() / ref.square().sum())
    assert errs["rana"] < errs["svd"], errs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rana", "cats", "svd"])
def test_export_and_reload_give_identical_outputs(family, method, tmp_path):
    model = FAMILIES[family]()
    targets = "mlp" if method == "cats" and family != "llama" else "mlp+qkv"
    rep = apply_rana(model, 0.56, _data(), method=method, targets=targets)
    x = _data(3, 1)[0]
    y = _out(model, x)
    save_adapted(model, rep, tmp_path / "adapted")
    fresh = load_adapted(FAMILIES[family](), tmp_path / "adapted")
    torch.testing.assert_close(_out(fresh, x), y, rtol=0, atol=0)
    # a state dict round trip into the rebuilt structure
    again = load_adapted(FAMILIES[family](), tmp_path / "adapted")
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(_out(again, x), y, rtol=0, atol=0)


def test_cats_gated_export_and_merge(tmp_path):
    model = _llama()
    rep = apply_rana(model, 0.56, _data(), method="cats")
    x = _data(3, 1)[0]
    save_adapted(model, rep, tmp_path / "c")
    torch.testing.assert_close(_out(load_adapted(_llama(), tmp_path / "c"), x), _out(model, x), rtol=0, atol=0)
    svd = _gpt()
    apply_rana(svd, 0.7, _data(), method="svd")
    y = _out(svd, x)
    merge(svd)  # no mask: merging a static factorisation changes nothing
    assert not any(isinstance(m, RankAdapter) for m in svd.modules())
    torch.testing.assert_close(_out(svd, x), y, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="method"):
        apply_rana(_gpt(), 0.5, _data(), method="bogus")
    with pytest.raises(ValueError, match="flops_ratio"):
        apply_rana(_gpt(), 1.5, _data())
    with pytest.raises(ValueError, match="calibration data is empty"):
        apply_rana(_gpt(), 0.5, [])
    with pytest.raises(ValueError, match="no MLP"):
        apply_rana(torch.nn.Linear(3, 3), 0.5, _data())
    with pytest.raises(DrrlError, match="not an adapted model"):
        load_adapted(_gpt(), tmp_path)
    model = _llama()
    rep = apply_rana(model, 0.5, _data())
    save_adapted(model, rep, tmp_path / "l")
    with pytest.raises(DrrlError, match="does not fit"):
        load_adapted(_gpt(), tmp_path / "l")
    torch.save({"w": torch.zeros(1)}, tmp_path / "l" / "model.safetensors")  # a pickle archive in disguise
    with pytest.raises(DrrlError, match="never unpickles"):
        load_adapted(_llama(), tmp_path / "l")


def test_a_shared_cache_gives_the_same_adapters():
    """Whatever ran first with the cache (svd here), rana gets the bases and samples it gets alone, also when
    the calibration has more tokens than the sample."""
    x = _data(3, 1)[0]
    cache: dict = {}
    outs = {}
    for method in ("svd", "rana", "rana"):
        model = _llama()
        apply_rana(model, 0.6, _data(), method=method, cache=cache, sample_tokens=100)
        outs.setdefault(method, []).append(_out(model, x))
    fresh = _llama()
    apply_rana(fresh, 0.6, _data(), method="rana", sample_tokens=100)
    for y in outs["rana"]:
        torch.testing.assert_close(y, _out(fresh, x), rtol=0, atol=0)
    assert len(cache["fits"]) == 2 * 4  # gate, up, down (svd) and stacked q/k/v bases of 2 layers, once each


@pytest.mark.parametrize("method", ["rana", "cats", "svd"])
def test_half_precision_models_are_adapted_in_their_dtype(method):
    model = _llama().to(torch.bfloat16)
    apply_rana(model, 0.6, _data(), method=method)
    y = _out(model, _data(3, 1)[0])
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
