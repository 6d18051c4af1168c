"""The output Fisher of drrl layers (drrl.attention.drrl.sensitivity, drrl.eval.allocation.output_fisher) and the
per-decision KL estimate the feedback carries from it, against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from drrl.attention.drrl import DynamicLowRankAttention, calibrating
from drrl.attention.drrl.sensitivity import measuring_output_fisher
from drrl.controllers import TableController
from drrl.eval.allocation import output_fisher
from drrl.integrations.hf import apply_dynamic_rank
from tests.integrations.test_hf import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


class AddLeaf:
    """Wraps a layer's ``attend`` so that its output gets an added zero leaf: the leaf's gradient is the output's."""

    def __init__(self, layer):
        self.layer, self.orig, self.leaves = layer, layer.attend, []
        layer.attend = self

    def __call__(self, q, k, v):
        y = self.orig(q, k, v)
        leaf = torch.zeros_like(y, requires_grad=True)
        self.leaves.append(leaf)
        return y + leaf


def test_measured_fisher_is_the_mean_squared_output_gradient():
    torch.manual_seed(0)
    layer = DynamicLowRankAttention(32, 4, basis="calibrated", controller="fixed", rank=8, segment=4, bucket=4)
    layer.double()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    with calibrating(layer):
        layer(x)
    wrap = AddLeaf(layer)
    head = torch.randn(32, 5, dtype=torch.float64)
    with measuring_output_fisher([layer]):
        for _ in range(2):  # two backward passes: the mean is over both
            (layer(x) @ head).sin().sum().backward()
    grads = torch.cat([leaf.grad for leaf in wrap.leaves])  # (4, H, L, d)
    ref = grads.pow(2).sum((0, 2)) / (grads.shape[0] * grads.shape[2])
    assert layer.output_fisher.shape == (4, 8) and layer.output_fisher.dtype == torch.float32
    torch.testing.assert_close(layer.output_fisher.double(), ref, rtol=1e-6, atol=0)
    assert layer._fisher_acc is None


class Probe(TableController):
    """A fixed table that asks for feedback and keeps it."""

    @property
    def wants_feedback(self):
        return True

    def __init__(self, table):
        super().__init__(table)
        self.feedback = []

    def observe(self, feedback):
        self.feedback.append(feedback)


def test_feedback_error_is_half_the_fisher_weighted_squared_output_error_per_segment():
    torch.manual_seed(0)
    layer = DynamicLowRankAttention(32, 4, basis="calibrated", segment=4, bucket=2).double()
    layer.layer_idx = 0
    layer.controller = TableController([[8]])
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    with calibrating(layer):
        layer(torch.randn(3, 10, 32, dtype=torch.float64))
    fisher = torch.rand(4, 8, dtype=torch.float64)
    layer.output_fisher = fisher
    seen = {}
    orig = layer.attend

    def capture(q, k, v):
        seen["qkv"] = (q, k, v)
        seen["y"] = orig(q, k, v)
        return seen["y"]

    layer.attend = capture
    probe = Probe([[2, 4, 6]])
    layer.controller = probe
    with torch.no_grad():
        layer(x)
    q, k, v = seen["qkv"]
    teacher = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    per_pos = 0.5 * ((seen["y"] - teacher) ** 2 * fisher[None, :, None]).sum((0, 1, 3))  # (L,)
    fb = probe.feedback[-1]
    decided = [s for s in range(3) if bool(layer.last_plan.stats.decide[s])]
    assert len(fb.error) == len(decided) == len(fb.fidelity) > 1
    for e, s in zip(fb.error, decided, strict=True):
        ref = per_pos[4 * s : 4 * s + 4].mean()
        assert e.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-12)
        cos = F.cosine_similarity(seen["y"], teacher, dim=-1)[..., 4 * s : 4 * s + 4].mean()
        assert fb.fidelity[decided.index(s)].item() == pytest.approx(cos.item(), rel=1e-6)
    assert max(e.item() for e in fb.error) > 0  # a rank below d_head costs something
    layer.controller = Probe([[8]])  # full rank: nothing to pay
    with torch.no_grad():
        layer(x)
    assert all(e.item() < 1e-12 for e in layer.controller.feedback[-1].error)
    layer.output_fisher = None  # without a Fisher the feedback carries no estimate
    with torch.no_grad():
        layer(x)
    assert layer.controller.feedback[-1].error == []


def test_output_fisher_of_a_hugging_face_model_is_seeded_and_leaves_the_weights_alone():
    model = tiny_llama().float()
    ids = torch.randint(0, 100, (3, 41), generator=torch.Generator().manual_seed(1))
    layers = apply_dynamic_rank(model, controller="fixed", rank=16, segment=8)
    with calibrating(model):
        model(input_ids=ids[:, :-1])
    assert output_fisher(model, layers, list(ids[:2]), seed=3) == 2
    first = [m.output_fisher.clone() for m in layers]
    assert all(f.shape == (6, 16) and bool((f >= 0).all()) and float(f.sum()) > 0 for f in first)
    assert all(p.grad is None for p in model.parameters())
    output_fisher(model, layers, list(ids[:2]), seed=3)
    assert all(torch.equal(a, m.output_fisher) for a, m in zip(first, layers, strict=True))
    output_fisher(model, layers, list(ids[:2]), seed=4)  # other sampled labels: another estimate
    assert any(not torch.equal(a, m.output_fisher) for a, m in zip(first, layers, strict=True))
    assert all(m.controller.table == [[16]] * 2 for m in layers)  # left at r_max
    assert math.isfinite(float(sum(f.sum() for f in first)))
