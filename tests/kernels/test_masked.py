"""drrl.kernels.masked_rows and masked_dots (the compiled CPU kernels) against its PyTorch reference and a float64 sum: every mask
density from none to all, odd sizes, one and several tokens, float32 and bfloat16, both keep criteria."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl import kernels
from drrl.kernels import masked_dots, masked_dots_reference, masked_rows, masked_rows_reference


def test_the_kernel_is_built():
    assert kernels.available(), f"`make install` builds it (python -m drrl.kernels): {kernels._state.get('error')}"


def case(n, d, T, dtype, seed=0, scaled=False, biased=False):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=g).to(dtype)
    c = torch.randn(T, n, generator=g).to(dtype)
    scale = torch.rand(n, generator=g) + 0.5 if scaled else None
    bias = torch.randn(d, generator=g).to(dtype) if biased else None
    return rows, c, scale, bias


def tau_for(c, scale, density):
    """A threshold that keeps about ``density`` of the entries (0: none, 1: all)."""
    s = (c.float().square() if scale is None else c.float().abs() * scale).flatten()
    if density <= 0:
        return float(s.max()) * 2 + 1
    if density >= 1:
        return 0.0
    return float(s.quantile(1 - density))


def exact(rows, c, tau, scale, bias):
    """float64 sum over the reference's kept set."""
    t = torch.tensor(tau, dtype=torch.float32).to(c.dtype)
    m = (c.square() if scale is None else c.abs() * scale.to(c.dtype)) >= t
    y = (c.double() * m) @ rows.double()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True], ids=["square", "scaled"])
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 0.9, 1.0])
def test_equals_the_reference_at_every_density(dtype, scaled, T, density):
    rows, c, scale, bias = case(37, 101, T, dtype, seed=T, scaled=scaled, biased=True)
    tau = tau_for(c, scale, density)
    y, active = masked_rows(rows, c, tau, scale, bias)
    y_ref, active_ref = masked_rows_reference(rows, c, tau, scale, bias)
    assert y.dtype == dtype and y.shape == (T, 101)
    assert torch.equal(active, active_ref)  # the same kept set, decided in the same dtype
    if density == 0:
        assert active.sum() == 0 and torch.equal(y, bias.expand(T, -1))
    if density == 1:
        assert torch.equal(active, torch.full((T,), 37))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    ref = exact(rows, c, tau, scale, bias)
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    torch.testing.assert_close(y.double(), y_ref.double(), rtol=tol, atol=tol * ref.abs().max().item())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), d=st.integers(1, 90), T=st.integers(1, 5), density=st.floats(0, 1),
       bf16=st.booleans(), scaled=st.booleans(), biased=st.booleans(), seed=st.integers(0, 10**6))  # fmt: skip
def test_odd_sizes_match_the_float64_sum(n, d, T, density, bf16, scaled, biased, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    rows, c, scale, bias = case(n, d, T, dtype, seed, scaled, biased)
    tau = tau_for(c, scale, density)
    y, active = masked_rows(rows, c, tau, scale, bias)
    assert torch.equal(active, masked_rows_reference(rows, c, tau, scale, bias)[1])
    ref = exact(rows, c, tau, scale, bias)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * (ref.abs().max().item() + 1))


@pytest.mark.parametrize("T", [1, 4])
def test_a_given_mask_keeps_what_it_says(T):
    rows, c, _, bias = case(50, 30, T, torch.float32, seed=7, biased=True)
    keep = torch.rand(T, 50, generator=torch.Generator().manual_seed(1)) < 0.3
    y, active = masked_rows(rows, c, 123.0, None, bias, keep)  # τ is ignored
    assert torch.equal(active, keep.sum(-1))
    ref = (c.double() * keep) @ rows.double() + bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_a_component_exactly_at_the_threshold_is_kept():
    rows = torch.eye(3)
    c = torch.tensor([[0.5, -0.5, 0.25]])
    y, active = masked_rows(rows, c, 0.25)  # 0.5² = 0.25 ≥ τ: kept; 0.25² is not
    assert active.tolist() == [2] and y.tolist() == [[0.5, -0.5, 0.0]]


def test_the_result_does_not_depend_on_the_thread_count():
    rows, c, scale, bias = case(300, 1000, 2, torch.float32, seed=3, biased=True)
    tau = tau_for(c, None, 0.4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = masked_rows(rows, c, tau, None, bias)[0]
        torch.set_num_threads(2)
        two = masked_rows(rows, c, tau, None, bias)[0]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_autograd_and_other_dtypes_take_the_reference():
    rows, c, _, _ = case(8, 5, 1, torch.float64, seed=1)
    y, active = masked_rows(rows, c, 0.3)
    assert y.dtype == torch.float64 and torch.equal(y, masked_rows_reference(rows, c, 0.3)[0])
    a = torch.randn(8, 5, requires_grad=True)
    y, _ = masked_rows(a, c.float(), 0.0)
    y.sum().backward()
    assert a.grad is not None


def test_bad_shapes_are_clear_errors():
    ext = kernels.load()
    with pytest.raises(RuntimeError, match=r"rows \(n, d\) and c \(T, n\) expected"):
        ext.masked_rows(torch.zeros(4, 3), torch.zeros(1, 5), None, 0.1, None)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ext.masked_rows(torch.zeros(4, 3), torch.zeros(1, 4, dtype=torch.bfloat16), None, 0.1, None)
    with pytest.raises(RuntimeError, match="scale must be"):
        ext.masked_rows(torch.zeros(4, 3), torch.zeros(1, 4), torch.zeros(3), 0.1, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("d", [1, 7, 8, 77])
def test_masked_dots_equal_the_float64_products(dtype, T, density, d):
    g = torch.Generator().manual_seed(d + T)
    rows, x = torch.randn(45, d, generator=g).to(dtype), torch.randn(T, d, generator=g).to(dtype)
    keep = torch.rand(T, 45, generator=g) < density
    out = masked_dots(rows, x, keep)
    assert out.dtype == dtype and out.shape == (T, 45)
    assert torch.equal(out[~keep], torch.zeros(int((~keep).sum()), dtype=dtype))  # not kept: exactly zero
    ref = (x.double() @ rows.double().t()) * keep
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * (ref.abs().max().item() + 1))
    torch.testing.assert_close(out.double(), masked_dots_reference(rows, x, keep).double(), rtol=tol, atol=tol * 10)


def test_masked_dots_bad_shapes_are_clear_errors():
    ext = kernels.load()
    with pytest.raises(RuntimeError, match=r"rows \(n, d\) and x \(T, d\) expected"):
        ext.masked_dots(torch.zeros(4, 3), torch.zeros(1, 5), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="keep must be"):
        ext.masked_dots(torch.zeros(4, 3), torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool))
