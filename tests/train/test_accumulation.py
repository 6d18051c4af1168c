import torch

from drrl.models import GPT, GPTConfig


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
