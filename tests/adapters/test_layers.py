import copy

import pytest
import torch
from torch import nn

from drrl.adapters import NeuronAdapterMLP, NeuronMaskedLinear, RankAdapter, SharedBasis, SharedRankSlice
from drrl.linalg.adaptive_lowrank import data_aware_basis


def _fitted(d_out=24, d_in=16, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g))
        lin.bias.copy_(torch.randn(d_out, generator=g))
    x = torch.randn(n, d_in, generator=g)
    a, b, _ = data_aware_basis(lin.weight.detach(), x.double().T @ x.double())
    return lin, x, a, b


def test_full_rank_adapter_without_mask_equals_the_dense_layer():
    lin, x, a, b = _fitted()
    ad = RankAdapter(a, b, 0.0, lin.bias)
    torch.testing.assert_close(ad(x), lin(x), rtol=1e-5, atol=1e-5)
    assert ad.mean_active == ad.n_b  # every component ran
    assert ad.flops_per_token() == 2 * 16 * 16 + 2 * 24 * 16


def test_mask_keeps_exactly_the_components_above_tau_and_counts_them():
    lin, x, a, b = _fitted()
    c2 = (x @ b.T).square()
    tau = float(c2.median())
    ad = RankAdapter(a, b, tau, lin.bias)
    y = ad(x)
    keep = c2 >= tau
    torch.testing.assert_close(y, ((x @ b.T) * keep) @ a.T + lin.bias, rtol=1e-5, atol=1e-5)
    assert ad.active == int(keep.sum()) and ad.tokens == len(x)
    assert ad.flops_per_token() == pytest.approx(2 * 16 * 16 + 2 * 24 * keep.sum().item() / len(x))


def test_decode_fast_paths_equal_the_reference():
    lin, x, a, b = _fitted()
    tau = float((x @ b.T).square().quantile(0.7))
    ref, fast = RankAdapter(a, b, tau, lin.bias).eval(), RankAdapter(a, b, tau, lin.bias).eval()
    fast.prepare_decode()
    nm_ref = NeuronMaskedLinear(lin.weight.T.contiguous(), 0.5).eval()
    nm_fast = NeuronMaskedLinear(lin.weight.T.contiguous(), 0.5).eval()
    nm_fast.prepare_decode()
    for t in range(5):
        xt = x[t].view(1, 1, -1)
        torch.testing.assert_close(fast(xt), ref(xt), rtol=1e-5, atol=1e-5)
        ht = torch.randn(1, 1, 24)
        torch.testing.assert_close(nm_fast(ht), nm_ref(ht), rtol=1e-5, atol=1e-5)
    assert fast.active == ref.active
    silent = NeuronMaskedLinear(lin.weight.T.contiguous(), 1e9, torch.ones(16)).eval()  # nothing active
    silent.prepare_decode()
    torch.testing.assert_close(silent(torch.randn(1, 1, 24)), torch.ones(1, 1, 16))


def test_neuron_mask_uses_the_weight_norm_of_each_column():
    w = torch.tensor([[1.0, 10.0], [0.0, 0.0]])  # column norms 1 and 10
    nm = NeuronMaskedLinear(w, 2.0)
    h = torch.tensor([[3.0, 0.3]])  # scores 3 and 3: both kept
    torch.testing.assert_close(nm(h), h @ w.T)
    h = torch.tensor([[3.0, 0.1]])  # scores 3 and 1: the second dropped
    torch.testing.assert_close(nm(h), torch.tensor([[3.0, 0.0]]))
    assert NeuronMaskedLinear(w, 2.0, weight_norm=False)(torch.tensor([[3.0, 0.3]]))[0, 0] == 3.0


def test_shared_basis_serves_q_k_v_in_any_order_and_counts_once():
    lin, x, a, b = _fitted(d_out=24)
    tau = float((x @ b.T).square().median())
    stacked = RankAdapter(a, b, tau, lin.bias)
    basis = SharedBasis(b, tau, 24)
    parts = [SharedRankSlice(basis, a[lo:hi], lin.bias[lo:hi]) for lo, hi in ((0, 8), (8, 16), (16, 24))]
    outs = {i: parts[i](x) for i in (2, 0, 1)}
    torch.testing.assert_close(torch.cat([outs[0], outs[1], outs[2]], -1), stacked(x), rtol=1e-5, atol=1e-5)
    assert basis.tokens == len(x) and basis.flops_per_token() == pytest.approx(stacked.flops_per_token())


def test_neuron_adapter_mlp_skips_masked_neurons():
    g = torch.Generator().manual_seed(0)
    gate, up, down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
    x = torch.randn(30, 8, generator=g)
    cats = NeuronAdapterMLP(gate, up, down, nn.functional.silu, 0.2)
    a = nn.functional.silu(gate(x))
    m = a.abs() >= 0.2
    torch.testing.assert_close(cats(x), down(a * m * up(x)))
    assert cats.flops_per_token() == pytest.approx(2 * 8 * 16 + 2 * (8 + 8) * m.sum().item() / 30)
    fast = NeuronAdapterMLP(gate, up, down, nn.functional.silu, 0.2).eval()
    fast.prepare_decode()
    for t in range(4):
        torch.testing.assert_close(fast(x[t].view(1, 1, -1)), cats(x[t].view(1, 1, -1)), rtol=1e-5, atol=1e-6)
    cats.t.fill_(-1.0)  # nothing masked: the dense MLP
    torch.testing.assert_close(cats(x), down(a * up(x)))


def test_shared_basis_recomputes_when_the_input_changes_in_place_or_grad_mode_flips():
    lin, x, a, b = _fitted()
    basis = SharedBasis(b, 0.0, 24)
    part = SharedRankSlice(basis, a, None)
    with torch.no_grad():
        y0 = part(x)
    x.mul_(2)  # same object, new values
    with torch.no_grad():
        torch.testing.assert_close(part(x), 2 * y0, rtol=1e-5, atol=1e-5)
    y = part(x)  # grad mode on now: a fresh graph reaches B
    y.sum().backward()
    assert basis.b.grad is not None and basis.b.grad.abs().sum() > 0


def test_decode_copies_follow_changes_of_the_weights():
    lin, x, a, b = _fitted()
    ad = RankAdapter(a, b, float((x @ b.T).square().median()), lin.bias).eval()
    ad.prepare_decode()
    xt = x[0].view(1, 1, -1)
    with torch.no_grad():
        ad(xt)
        ad.a.mul_(2)  # e.g. an optimizer step or load_state_dict
        fast = ad(xt)
        ad.fast = False
        torch.testing.assert_close(fast, ad(xt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (4, 1), (3, 6)])  # 18 tokens: past DECODE_TOKENS, the matmul
def test_decode_paths_equal_the_reference_for_several_tokens(shape):
    lin, x, a, b = _fitted()
    g = torch.Generator().manual_seed(1)
    xt = torch.randn(*shape, 16, generator=g)
    tau = float((x @ b.T).square().quantile(0.6))
    pairs = [(RankAdapter(a, b, tau, lin.bias), xt), (NeuronMaskedLinear(lin.weight.T.contiguous(), 0.4),
             torch.randn(*shape, 24, generator=g))]  # fmt: skip
    gate, up, down = nn.Linear(16, 20), nn.Linear(16, 20), nn.Linear(20, 16)
    for u in (up, None):
        pairs.append((NeuronAdapterMLP(gate, u, down if u is not None else nn.Linear(20, 16), torch.tanh, 0.3), xt))
    for mod, inp in pairs:
        ref = copy.deepcopy(mod).eval()
        fast = mod.eval()
        fast.prepare_decode()
        with torch.no_grad():
            torch.testing.assert_close(fast(inp), ref(inp), rtol=1e-5, atol=1e-5)
        assert fast.active == ref.active and fast.tokens == ref.tokens == shape[0] * shape[1]


def test_decode_layout_is_the_weights_own_storage_and_survives_loads_and_casts():
    lin, x, a, b = _fitted()
    tau = float((x @ b.T).square().median())
    ad, ref = RankAdapter(a, b, tau, lin.bias).eval(), RankAdapter(a, b, tau, lin.bias).eval()
    nm = NeuronMaskedLinear(lin.weight.T.contiguous(), 0.4).eval()
    ad.prepare_decode()
    nm.prepare_decode()
    # one copy of the weights: the rows the kernel streams are a view of the parameter, stored column-major
    assert ad._a_t.data_ptr() == ad.a.data_ptr() and ad._a_t.is_contiguous() and not ad.a.is_contiguous()
    assert nm._w_t.data_ptr() == nm.weight.data_ptr() and nm._w_t.is_contiguous()
    xt = x[:1].view(1, 1, -1)
    with torch.no_grad():
        torch.testing.assert_close(ad(xt), ref(xt), rtol=1e-5, atol=1e-5)
        ad.load_state_dict({k: 2 * v if k == "a" else v for k, v in ref.state_dict().items()})  # copied in place
        assert ad._decode_ready() and ad._a_t.data_ptr() == ad.a.data_ptr()
        torch.testing.assert_close(ad(xt) - lin.bias, 2 * (ref(xt) - lin.bias), rtol=1e-5, atol=1e-5)
        half = copy.deepcopy(ad).to(torch.bfloat16)  # a cast keeps the layout: still no second copy
        half(xt.bfloat16())
        assert half._a_t.data_ptr() == half.a.data_ptr() and half._a_t.dtype == torch.bfloat16
