"""DeltaNet language model: config validation, build_model, logits/loss, prefill + step decoding, state size,
tied embeddings, and a short training run that checkpoints, loads and resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import drrl
from drrl.config import FieldError
from drrl.errors import ConfigError
from drrl.linear_attention import DeltaNet
from drrl.models import GPT, DeltaNetConfig, DeltaNetLM, GPTConfig, build_model
from drrl.train import RunConfig, train

ROOT = Path(__file__).resolve().parents[2]
V, N_LAYER, N_HEAD, D_MODEL, CONTEXT = 256, 2, 2, 32, 64
VARIANTS = {
    "deltanet": {},
    "gated": {"gated": True, "chunk_size": 8},
    "dk-ne-dv": {"head_k_dim": 8, "head_v_dim": 24, "chunk_size": 8},
}


def tiny(**deltanet) -> GPTConfig:
    return GPTConfig(
        kind="deltanet", vocab_size=V, n_layer=N_LAYER, n_head=N_HEAD, d_model=D_MODEL, context=CONTEXT,
        deltanet=DeltaNetConfig(**deltanet),
    )  # fmt: skip


def model64(variant: str, seed: int = 0) -> DeltaNetLM:
    torch.manual_seed(seed)
    return DeltaNetLM(tiny(**VARIANTS[variant])).double().eval()


def tokens(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


VARIANT = pytest.mark.parametrize("variant", list(VARIANTS))


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("kw", [{"attention": "drrl"}, {"attention_kwargs": {"rank": 4}}], ids=["name", "kwargs"])
def test_attention_settings_are_refused_for_deltanet(kw):
    with pytest.raises(FieldError, match="model.deltanet") as e:
        GPTConfig(kind="deltanet", **kw)
    assert e.value.field == "attention"
    with pytest.raises(ConfigError, match=r"model\.attention applies to kind=gpt only"):
        RunConfig.load(None, ["model.kind=deltanet", "model.attention=drrl"])


@pytest.mark.parametrize(
    "kw, field",
    [({"head_k_dim": 0}, "head_k_dim"), ({"head_v_dim": -2}, "head_v_dim"), ({"chunk_size": 0}, "chunk_size"),
     ({"conv_size": 0}, "conv_size"), ({"qk_scale": -0.5}, "qk_scale"), ({"qk_scale": 0.0}, "qk_scale")],
)  # fmt: skip
def test_bad_deltanet_values_raise_field_errors(kw, field):
    with pytest.raises(FieldError) as e:
        DeltaNetConfig(**kw)
    assert e.value.field == field
    (key, value), *_ = kw.items()
    with pytest.raises(ConfigError, match=rf"^model\.deltanet\.{field} must be"):
        RunConfig.load(None, ["model.kind=deltanet", f"model.deltanet.{key}={value}"])


def test_unknown_kind_and_odd_heads():
    with pytest.raises(ConfigError, match=r"model\.kind must be one of 'gpt', 'deltanet'"):
        RunConfig.load(None, ["model.kind=mamba"])
    GPTConfig(kind="deltanet", d_model=12, n_head=4)  # d_head 3: no RoPE, so an odd head width is fine
    with pytest.raises(FieldError, match="even head dimension"):
        GPTConfig(kind="gpt", d_model=12, n_head=4)


def test_shipped_config_loads_and_round_trips():
    cfg = RunConfig.load(ROOT / "configs" / "shakespeare-deltanet-tiny.yaml")
    assert cfg.model.kind == "deltanet"
    assert isinstance(cfg.model.deltanet, DeltaNetConfig)
    assert cfg.model.deltanet.head_k_dim == 64 and cfg.model.deltanet.head_v_dim == 64
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert again.to_dict()["model"]["deltanet"]["head_k_dim"] == 64


def test_build_model_picks_the_kind():
    assert type(build_model(GPTConfig(vocab_size=V, n_layer=1, n_head=2, d_model=16, context=8))) is GPT
    model = build_model(tiny())
    assert type(model) is DeltaNetLM
    assert len(model.mixers()) == N_LAYER and all(isinstance(m, DeltaNet) for m in model.mixers())
    mixer = model.mixers()[0]
    assert mixer.head_k_dim == mixer.head_v_dim == D_MODEL // N_HEAD  # None = d_model / n_head
    mixer = build_model(tiny(head_k_dim=8, head_v_dim=24, qk_scale=0.25, conv_size=2)).mixers()[1]
    assert (mixer.head_k_dim, mixer.head_v_dim, mixer.scale, mixer.q_conv1d.kernel_size[0]) == (8, 24, 0.25, 2)


# ----------------------------------------------------------------------------- the model


@VARIANT
def test_logits_loss_and_context(variant):
    model = model64(variant)
    x, y = tokens(3, 20), tokens(3, 20, seed=1)
    logits = model(x)
    assert logits.shape == (3, 20, V) and logits.dtype == torch.float64
    _close(model.loss(x, y), F.cross_entropy(logits.flatten(0, 1), y.flatten()), 1e-10)
    y[:, :7] = -100
    _close(model.loss(x, y), F.cross_entropy(logits[:, 7:].flatten(0, 1), y[:, 7:].flatten()), 1e-10)
    assert model(tokens(1, CONTEXT)).shape == (1, CONTEXT, V)
    with pytest.raises(ValueError, match=f"exceeds the model context {CONTEXT}"):
        model(tokens(1, CONTEXT + 1))


def test_no_causal_leakage():
    model = model64("gated")
    idx = tokens(2, 21)
    base = model(idx)
    for t in (0, 7, 19):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % V
        out = model(changed)
        _close(out[:, : t + 1], base[:, : t + 1], 1e-12)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


@VARIANT
@pytest.mark.parametrize("prompt", [1, 9])
def test_prefill_then_step_reproduces_forward(variant, prompt):
    model = model64(variant)
    idx = tokens(2, 20, seed=2)
    full = model(idx)
    logits, caches = model.prefill(idx[:, :prompt])
    assert len(caches) == N_LAYER
    _close(logits, full[:, prompt - 1], 1e-10)
    for t in range(prompt, 20):
        _close(model.step(idx[:, t], caches), full[:, t], 1e-10)


@VARIANT
def test_steps_from_empty_caches_reproduce_forward(variant):
    model = model64(variant)
    idx = tokens(2, 12, seed=3)
    full = model(idx)
    caches = model.empty_caches(2)
    for t in range(12):
        _close(model.step(idx[:, t], caches), full[:, t], 1e-10)


def test_step_has_no_context_limit():
    """Decoding past ``context`` continues the recurrence: it equals the forward of the same weights with a longer
    context (the weights do not depend on it)."""
    short = model64("deltanet")
    cfg = tiny()
    cfg.context = 2 * CONTEXT
    long = DeltaNetLM(cfg).double().eval()
    long.load_state_dict(short.state_dict())
    idx = tokens(1, CONTEXT + 6, seed=4)
    full = long(idx)
    logits, caches = short.prefill(idx[:, :CONTEXT])
    _close(logits, full[:, CONTEXT - 1], 1e-10)
    for t in range(CONTEXT, CONTEXT + 6):
        _close(short.step(idx[:, t], caches), full[:, t], 1e-10)


@pytest.mark.parametrize("variant, dk, dv", [("deltanet", 16, 16), ("dk-ne-dv", 8, 24)])
def test_state_bytes(variant, dk, dv):
    model = DeltaNetLM(tiny(**VARIANTS[variant]))
    assert model.state_bytes() == N_LAYER * N_HEAD * dk * dv * 4
    assert model.state_bytes(3) == 3 * N_LAYER * N_HEAD * dk * dv * 4
    caches = model.prefill(tokens(3, 5))[1]
    assert sum(c["state"].numel() * c["state"].element_size() for c in caches) == model.state_bytes(3)


def test_tied_embeddings_and_num_params():
    model = DeltaNetLM(tiny(gated=True))
    assert model.lm_head.weight is model.wte.weight
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in set(model.parameters()))
    assert model.num_params(non_embedding=False) - model.num_params() == V * D_MODEL
    model.loss(tokens(2, 8), tokens(2, 8, seed=1)).backward()
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


# ----------------------------------------------------------------------------- training, loading, resuming


def test_deltanet_trains_checkpoints_loads_and_resumes(tiny_overrides_list, tmp_path):
    ov = [
        *tiny_overrides_list, "model.kind=deltanet", "model.deltanet.chunk_size=8", "model.deltanet.gated=true",
        "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=0", "eval.batch_size=32",
    ]  # fmt: skip
    cfg = RunConfig.load(None, ov)
    a, b = tmp_path / "a", tmp_path / "b"
    straight = train(cfg, a, progress=False)
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert [m["step"] for m in metrics(a) if "loss" in m] == [1, 2, 3, 4]

    model, _, ckpt = drrl.load(a)
    assert type(model) is DeltaNetLM and not model.training and ckpt.step == 4
    assert model.cfg == cfg.model and model.mixers()[0].gated and model.mixers()[0].chunk_size == 8
    fresh = build_model(cfg.model)
    assert not torch.equal(fresh.wte.weight, model.wte.weight)  # trained weights were loaded
    again = drrl.evaluate(a, device="cpu")  # the loaded model reproduces the run's own final evaluation
    assert again["loss"] == straight["loss"]

    shutil.copytree(a, b)  # resume from step 2 and land on the same weights
    shutil.rmtree(b / "checkpoints" / "step_0000004")
    (b / "eval.json").unlink()
    resumed = train(cfg, b, resume=True, progress=False)  # exact: same data, dropout RNG and optimizer state
    assert resumed["step"] == 4 and resumed["loss"] == straight["loss"]
    logged = [{m["step"]: m["loss"] for m in metrics(run) if "loss" in m} for run in (a, b)]
    assert logged[1] == logged[0] and sorted(logged[0]) == [1, 2, 3, 4]
    model_b = drrl.load(b)[0]
    for (name, p), q in zip(model.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    idx = tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(model_b(idx), model(idx))
