import pytest
import torch

from drrl.models.loss import linear_cross_entropy, naive_linear_cross_entropy


@pytest.mark.parametrize("n, chunk", [(1, 4), (7, 3), (64, 64), (65, 16)], ids=str)
def test_matches_naive_outputs_and_grads_float64(n, chunk):
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(31, 12, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 31, (n,), generator=g)
    t[::3] = -100  # ignored targets
    ours = linear_cross_entropy(h, w, t, chunk=chunk)
    ref = naive_linear_cross_entropy(h, w, t)
    torch.testing.assert_close(ours, ref)
    upstream = torch.tensor(0.7, dtype=torch.float64)
    grads = torch.autograd.grad(ours * upstream, (h, w))
    ref_grads = torch.autograd.grad(ref * upstream, (h, w))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_no_grad_and_float32():
    torch.manual_seed(0)
    h, w = torch.randn(50, 16), torch.randn(1000, 16)
    t = torch.randint(0, 1000, (50,))
    with torch.no_grad():
        ours = linear_cross_entropy(h, w.requires_grad_(), t, chunk=8)
    assert not ours.requires_grad
    torch.testing.assert_close(ours, naive_linear_cross_entropy(h, w, t).detach(), rtol=1e-5, atol=1e-4)


def test_all_targets_ignored_gives_zero():
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
    loss = linear_cross_entropy(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(h.grad) == 0


def test_bad_inputs_are_rejected():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(IndexError, match="target -1 is out of bounds for 5 classes"):
        linear_cross_entropy(h, w, torch.tensor([0, -1, 2]))
    with pytest.raises(IndexError, match="target 5 is out of bounds"):
        linear_cross_entropy(h, w, torch.tensor([0, 5, 2]))
    with pytest.raises(TypeError, match="float32 or float64"):
        linear_cross_entropy(h.bfloat16(), w.bfloat16(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2]), chunk=0)


def test_double_backward_raises_instead_of_being_wrong():
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64)
    (g,) = torch.autograd.grad(linear_cross_entropy(h, w, torch.tensor([0, 1, 2])), h, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()
