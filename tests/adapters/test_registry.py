"""The method table behind apply_rana(method=...), and the old import paths of the split adapters room."""

import importlib
import sys
import warnings

import pytest
import torch

from drrl.adapters import ADAPTERS, METHODS, Method, apply_rana, find_sites, sites, svd
from drrl.adapters import model as model_mod
from drrl.models.gpt import GPT, GPTConfig


def _gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, context=64, n_layer=2, n_head=4, d_model=32)).eval()


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 97, (2, 24), generator=g) for _ in range(4)]


def test_every_method_is_in_the_table_in_order():
    assert METHODS == ("rana", "cats", "svd") == tuple(ADAPTERS)
    for name, m in ADAPTERS.items():
        assert isinstance(m, Method) and callable(m.adapt_mlp), name
        assert m.adapt_qkv is None or callable(m.adapt_qkv), name


def test_a_new_row_is_a_new_method(monkeypatch):
    """A method without a q/k/v form: q/k/v stay dense and the MLPs carry the whole budget."""
    keeps = []

    def adapt_mlp(site, cols, keep, ctx):
        keeps.append((keep, ctx.qkv_dense))
        return svd.adapt_mlp(site, cols, keep, ctx)

    monkeypatch.setitem(ADAPTERS, "svd-mlp", Method(adapt_mlp, None))
    model = _gpt()
    mlps, qkvs = find_sites(model)
    mlp_flops, qkv_flops = (sum(s.dense_flops() for s in x) for x in (mlps, qkvs))
    want = (0.8 * (mlp_flops + qkv_flops) - qkv_flops) / mlp_flops
    rep = apply_rana(model, 0.8, _data(), method="svd-mlp")
    assert keeps == [(pytest.approx(want), True)] * len(mlps)
    assert rep.method == "svd-mlp" and all(rep.sites[f"qkv:{s.name}"]["dense"] for s in qkvs)
    with pytest.raises(ValueError, match="svd-mlp"):  # the table is what the argument check lists
        apply_rana(_gpt(), 0.8, _data(), method="bogus")


def test_old_adapter_paths_still_work_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from drrl.adapters import rana as old

        assert old.apply_rana is apply_rana and old.METHODS == METHODS
        assert old.CompressionReport is model_mod.CompressionReport
        assert old._set_submodule is model_mod._set_submodule
        assert old.find_sites is sites.find_sites and old._forward is sites._forward
        assert old.collect is sites.collect and old.MLPSite is sites.MLPSite and old.QKVSite is sites.QKVSite
        for name in ("TARGETS", "adapter_modules", "reset_counts", "measured_flops", "_svd_adapter"):
            assert getattr(old, name) is not None
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018


def test_old_linalg_path_warns_and_resolves(monkeypatch):
    from drrl.linalg import adaptive_lowrank

    monkeypatch.delitem(sys.modules, "drrl.linalg.rana", raising=False)
    with pytest.warns(DeprecationWarning, match="drrl.linalg.adaptive_lowrank"):
        old = importlib.import_module("drrl.linalg.rana")
    assert old.allocate is adaptive_lowrank.allocate and old.data_aware_basis is adaptive_lowrank.data_aware_basis
