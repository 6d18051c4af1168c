import pytest
import torch

from drrl.attention import available_attentions, calibrating
from drrl.errors import ConfigError
from drrl.models import GPT, GPTConfig


def tiny(**kw) -> GPTConfig:
    return GPTConfig(**{"vocab_size": 97, "context": 24, "n_layer": 2, "n_head": 2, "d_model": 16, **kw})


@pytest.mark.parametrize("attention", available_attentions(causal=True))
def test_no_causal_leakage(attention):
    """Changing token t+1 never changes the logits at positions <= t (every registered causal attention)."""
    torch.manual_seed(0)
    kwargs = {"rank": 4, "segment": 8} if attention == "static" else {}  # static: one rank, calibrated maps
    model = GPT(tiny(attention=attention, attention_kwargs=kwargs)).double().eval()
    idx = torch.randint(0, 97, (2, 24))
    if attention == "static":
        with calibrating(model):
            model(torch.randint(0, 97, (4, 24)))
    base = model(idx)
    for t in (0, 5, 22):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 97
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_shapes_tied_embeddings_and_params():
    model = GPT(tiny())
    assert model(torch.zeros(3, 24, dtype=torch.long)).shape == (3, 24, 97)
    assert model.lm_head.weight is model.wte.weight
    assert model.num_params(non_embedding=False) - model.num_params() == 97 * 16


def test_sequence_longer_than_context_is_rejected():
    with pytest.raises(ValueError, match="exceeds the model context 24"):
        GPT(tiny())(torch.zeros(1, 25, dtype=torch.long))


def test_loss_matches_manual_cross_entropy_and_ignores():
    torch.manual_seed(0)
    model = GPT(tiny()).double()
    x, y = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    logp = model(x).log_softmax(-1)
    manual = -logp.gather(-1, y[..., None]).mean()
    torch.testing.assert_close(model.loss(x, y), manual.float().double(), rtol=1e-6, atol=1e-6)
    y2 = y.clone()
    y2[:, :4] = -100
    manual2 = -logp[:, 4:].gather(-1, y[:, 4:, None]).mean()
    torch.testing.assert_close(model.loss(x, y2), manual2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n_head": 3}, "n_head must divide d_model"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"d_model": 12, "n_head": 4}, "even head dimension"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"attention": "nope"}, "attention must be one of"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kw)


def test_training_step_reduces_loss_on_repeated_batch():
    torch.manual_seed(0)
    model = GPT(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 97, (4, 24))
    first = model.loss(x[:, :-1], x[:, 1:]).item()
    for _ in range(20):
        loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first - 1.0
