"""``model.kind: hf`` (drrl.models.hf): a transformers architecture (a tiny Qwen3.5 hybrid) behind drrl's language
model interface, and its config checks."""

import pytest
import torch
import torch.nn.functional as F

from drrl.config import FieldError
from drrl.models import GPTConfig, build_model

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3_5ForCausalLM"):
    pytest.skip("this transformers has no Qwen3.5", allow_module_level=True)

HF = {"model_type": "qwen3_5_text", "intermediate_size": 48, "num_key_value_heads": 1, "head_dim": 16,
      "layer_types": ["linear_attention", "full_attention"], "linear_num_key_heads": 2, "linear_num_value_heads": 4,
      "linear_key_head_dim": 8, "linear_value_head_dim": 8}  # fmt: skip


def cfg(**hf) -> GPTConfig:
    return GPTConfig(kind="hf", n_layer=2, n_head=2, d_model=32, context=32, vocab_size=64, hf={**HF, **hf})


def test_the_model_is_transformers_own_with_drrls_sizes_and_loss():
    torch.manual_seed(0)
    model = build_model(cfg()).eval()
    c = model.lm.config
    assert type(model.lm).__name__ == "Qwen3_5ForCausalLM"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size, c.max_position_embeddings) == (
        32, 2, 2, 64, 32)  # fmt: skip
    assert model.lm_head.weight is model.wte.weight  # tied
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.lm(input_ids=x).logits
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        want = F.cross_entropy(ref.flatten(0, 1).double(), y.flatten(), reduction="sum")
        torch.testing.assert_close(model.nll(x, y).double(), want, rtol=1e-5, atol=1e-4)
    assert model.num_params() == model.num_params(False) - 64 * 32
    with pytest.raises(ValueError, match="exceeds the model context 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_no_causal_leakage():
    """Changing token t+1 never changes the logits at positions <= t (the delta rule and the attention layer)."""
    torch.manual_seed(0)
    model = build_model(cfg()).eval()
    x = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(x)
        for t in (0, 7, 18):
            x2 = x.clone()
            x2[0, t + 1] = (x2[0, t + 1] + 1) % 64
            torch.testing.assert_close(model(x2)[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(model(x2)[:, t + 1], base[:, t + 1])


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"hf": {k: v for k, v in HF.items() if k != "model_type"}}, "needs model_type"),
        ({"hf": {**HF, "hidden_size": 64}}, "must not set hidden_size: set model.d_model"),
        ({"hf": {**HF, "model_type": "nonsense_arch"}}, "nonsense_arch"),
        ({"hf": {**HF, "model_type": "vit"}}, "has no causal LM"),
        ({"dropout": 0.1}, "kind=hf model's layers and dropouts are set under model.hf"),
        ({"kind": "gpt"}, "applies to kind=hf only"),
    ],
)
def test_bad_hf_sections_are_clear_errors(change, needle):
    kw = dict(kind="hf", n_layer=2, n_head=2, d_model=32, context=32, vocab_size=64, hf=HF) | change
    with pytest.raises(FieldError, match=needle) as e:
        GPTConfig(**kw)
    assert "\n" not in str(e.value)
