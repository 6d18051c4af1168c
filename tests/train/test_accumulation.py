import json

import pytest
import torch

from drrl.models import GPT, GPTConfig
from drrl.train import RunConfig
from drrl.train.loop import train


def test_grad_accumulation_equals_full_batch():
    """Two micro-batches with loss / 2 give the gradient of one batch of twice the size (same token counts)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context=16, n_layer=2, n_head=2, d_model=16)).double()
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    model.loss(x, y).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for i in range(2):
        (model.loss(x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2]) / 2).backward()
    for a, p in zip(full, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a)


def _losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_training_loop_accumulation_follows_the_same_trajectory(tiny_overrides_list, tmp_path):
    """batch 4 x accum 1 and batch 2 x accum 2 draw the same sequences and take the same steps."""
    base = [*tiny_overrides_list, "train.max_steps=6", "train.eval_every=0", "model.dropout=0.0"]
    train(RunConfig.load(None, [*base, "train.batch_size=4"]), tmp_path / "a", progress=False)
    train(RunConfig.load(None, [*base, "train.batch_size=2", "train.grad_accum=2"]), tmp_path / "b", progress=False)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == 6
    assert a == pytest.approx(b, rel=1e-5)
