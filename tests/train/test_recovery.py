import copy

import numpy as np
import pytest
import torch

from drrl.config import FieldError
from drrl.data.tokens import sample_batch
from drrl.models import GPTConfig, build_model
from drrl.models.loss import linear_cross_entropy
from drrl.train.recovery import RecoveryConfig, kd_loss, lora_recover

TARGETS = ("q_proj", "k_proj", "v_proj")
TOKENS = np.tile(np.arange(10, dtype=np.uint16), 60)  # a repeating pattern: easy to learn in a few steps


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (tests/conftest.py)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(GPTConfig(kind="deltanet", vocab_size=64, n_layer=2, n_head=2, d_model=32, context=32))


def _cfg(**kw) -> RecoveryConfig:
    return RecoveryConfig(
        **{"steps": 3, "lr": 1e-2, "batch_size": 4, "context": 16, "lora_r": 4, "lora_alpha": 8, **kw}
    )


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batch_loss(model, cfg: RecoveryConfig, step: int = 0, seed: int = 1) -> float:
    x, y = sample_batch(TOKENS, cfg.batch_size, cfg.context, seed, step)
    with torch.no_grad():
        return float(model.loss(x, y))


def _naive_kd(h_s, h_t, w, t):
    log_p = torch.log_softmax(h_s.double() @ w.double().t() / t, -1)
    log_q = torch.log_softmax(h_t.double() @ w.double().t() / t, -1)
    return t**2 * (log_q.exp() * (log_q - log_p)).sum(-1).mean()


# ---------------------------------------------------------------- kd_loss


@pytest.mark.parametrize("chunk", [8, 1024])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_kd_loss_matches_naive_value_and_gradient(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    h_s, h_t, w = torch.randn(37, 16, generator=g), torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g)
    ref_h = h_s.double().requires_grad_(True)
    ref = _naive_kd(ref_h, h_t, w, temperature)
    ref.backward()
    h = h_s.clone().requires_grad_(True)  # requires_grad: the checkpointed path
    out = kd_loss(h, h_t, w, temperature, chunk=chunk)
    assert ref.item() > 0.1
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    out.backward()
    torch.testing.assert_close(h.grad.double(), ref_h.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the plain (no checkpoint) path gives the same value
        torch.testing.assert_close(kd_loss(h_s, h_t, w, temperature, chunk=chunk), out.detach())


def test_kd_loss_is_zero_for_identical_student_and_teacher():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g)
    assert kd_loss(h, h.clone(), w, 2.0, chunk=8).item() == 0.0
    assert kd_loss(h, h.flip(0), w, 2.0, chunk=8).item() > 0.0


# ---------------------------------------------------------------- lora_recover


@pytest.fixture(scope="module")
def recovered(one_thread):
    model = _model()
    original = copy.deepcopy(model)
    cfg = _cfg(steps=30)
    stats = lora_recover(model, TOKENS, cfg)
    return model, original, cfg, stats


def test_recovery_merges_back_into_plain_linears(recovered):
    model, original, _, _ = recovered
    for name, module in model.named_modules():
        if name.endswith(TARGETS):
            assert type(module) is torch.nn.Linear, name
    assert {n for n, _ in model.named_modules()} == {n for n, _ in original.named_modules()}
    before, after = original.state_dict(), model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].shape == before[k].shape for k in before)
    assert all(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.wte.weight  # tied embeddings survive


def test_recovery_changes_only_the_targeted_weights(recovered):
    model, original, _, _ = recovered
    before, after = original.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"blocks.{i}.attn.{t}.weight" for i in range(2) for t in TARGETS}


def test_recovery_stats_and_loss_falls(recovered):
    model, original, cfg, stats = recovered
    assert set(stats) == {"loss_first", "loss_last", "seconds", "trainable"}
    expected = sum(
        cfg.lora_r * (m.in_features + m.out_features) for n, m in original.named_modules() if n.endswith(TARGETS)
    )
    assert stats["trainable"] == expected == 6 * 4 * (32 + 32)
    assert stats["seconds"] > 0
    assert stats["loss_last"] < 0.95 * stats["loss_first"]
    # the merged weights keep what the adapters learned (a batch neither run saw during training)
    assert _batch_loss(model, cfg) < 0.95 * _batch_loss(original, cfg)


def test_first_loss_is_the_cross_entropy_of_the_untouched_model():
    model = _model()
    cfg = _cfg(steps=1)
    x, y = sample_batch(TOKENS, cfg.batch_size, cfg.context, cfg.seed + 7919, 0)
    with torch.no_grad():
        expected = float(model.loss(x, y))
    stats = lora_recover(model, TOKENS, cfg)
    assert stats["loss_first"] == pytest.approx(expected, rel=1e-5)  # LoRA B starts at zero


def test_distillation_from_a_copy_runs_and_leaves_the_teacher_alone():
    model = _model()
    teacher = copy.deepcopy(model)
    before = _state(teacher)
    plain = lora_recover(copy.deepcopy(model), TOKENS, _cfg())
    stats = lora_recover(model, TOKENS, _cfg(kd_weight=1.0), teacher=teacher)
    assert stats["loss_first"] == pytest.approx(plain["loss_first"], rel=1e-6)  # student == teacher at step 0
    assert np.isfinite(stats["loss_last"])
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, teacher.blocks[0].attn.q_proj.weight)


def test_distillation_adds_weighted_kd_term_to_the_first_loss():
    model, teacher = _model(0), _model(1)
    cfg = _cfg(steps=1, kd_weight=0.5, kd_temperature=2.0)
    x, y = sample_batch(TOKENS, cfg.batch_size, cfg.context, cfg.seed + 7919, 0)
    with torch.no_grad():
        h, h_t = model.hidden(x).flatten(0, 1), teacher.hidden(x).flatten(0, 1)
        ce = linear_cross_entropy(h, model.lm_head.weight, y.flatten()) / y.numel()
        kd = _naive_kd(h, h_t, model.lm_head.weight, 2.0)
    stats = lora_recover(model, TOKENS, cfg, teacher=teacher)
    assert kd.item() > 1e-3
    assert stats["loss_first"] == pytest.approx(float(ce) + 0.5 * kd.item(), rel=1e-5)


def test_recovery_is_deterministic():
    base = _model()
    a, b, c = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    lora_recover(a, TOKENS, _cfg(seed=3))
    lora_recover(b, TOKENS, _cfg(seed=3))
    lora_recover(c, TOKENS, _cfg(seed=4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_unknown_target_lists_the_available_layers():
    model = _model()
    before = _state(model)
    with pytest.raises(ValueError, match=r"nope.*q_proj") as err:
        lora_recover(model, TOKENS, _cfg(targets=("q_proj", "nope")))
    assert "up_proj" in str(err.value) and "o_proj" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_kd_without_teacher_is_an_error():
    with pytest.raises(ValueError, match="teacher"):
        lora_recover(_model(), TOKENS, _cfg(kd_weight=1.0))


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("lora_r", 0), ("lr", 0.0), ("kd_weight", -1.0), ("kd_temperature", 0.0), ("targets", ())],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(FieldError) as err:
        RecoveryConfig(**{field: value})
    assert err.value.field == field
