"""prune_qk on DeltaNet models: calibration, slicing, the PCA rotation, config updates, export and reload; the
selector registry drives prune_qk and drrl prune's config; the state-rank and decode-time measurements."""

from __future__ import annotations

import copy

import pytest
import torch

from drrl.errors import ConfigError
from drrl.models import GPTConfig, build_model
from drrl.pruning import (
    SELECTORS,
    SelectorInputs,
    available_selectors,
    calibrate,
    decode_times,
    prune_qk,
    register_selector,
    rotate_qk,
    select_l1,
    state_ranks,
    unregister_selector,
)
from drrl.recipes.prune import PruneConfig

AXIS = [s for s in SELECTORS if s != "pca"]


def _model(gated=False, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(
        kind="deltanet", vocab_size=64, n_layer=2, n_head=2, d_model=32, context=48,
        deltanet={"head_k_dim": 8, "head_v_dim": 12, "gated": gated, "chunk_size": 16},
    )  # fmt: skip
    return build_model(cfg).double().eval()


def _batches(n=3, length=33, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, length), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def model_and_cal():
    m = _model()
    return m, calibrate(m, _batches(), rows=100)


def test_calibrate_records_activations_rms_and_gradients(model_and_cal):
    m, cal = model_and_cal
    assert len(cal) == 2
    for c, layer in zip(cal, m.mixers(), strict=True):
        q, k = torch.cat(c.q), torch.cat(c.k)
        assert q.shape[1:] == (2, 8) and k.shape == q.shape and 0 < q.shape[0] <= 192
        assert c.tokens == 3 * 2 * 32 and c.sq_sum.shape == (32,) and bool((c.sq_sum > 0).all())
        assert c.gq.shape == layer.q_proj.weight.shape and c.gk.shape == layer.k_proj.weight.shape
        assert layer.q_proj.weight.grad is None  # calibration leaves no gradients behind
    assert all(p.grad is None for p in m.parameters())  # and computes none for the other weights
    # the recorded gradients are those of the summed per-batch mean losses
    ref = copy.deepcopy(m)
    for b in _batches():
        ref.loss(b[:, :-1], b[:, 1:]).backward()
    torch.testing.assert_close(cal[0].gq, ref.mixers()[0].q_proj.weight.grad)


def test_calibrated_activations_are_the_post_conv_queries():
    m = _model()
    b = _batches(1)[0]
    cal = calibrate(m, [b], ("acts",), rows=10_000)
    layer, x = m.mixers()[0], {}
    h = layer.register_forward_pre_hook(lambda _m, a: x.__setitem__("x", a[0]))
    m.hidden(b[:, :-1])
    h.remove()
    want = layer.q_conv1d(layer.q_proj(x["x"])).flatten(0, 1).unflatten(-1, (2, 8))
    torch.testing.assert_close(torch.cat(cal[0].q).double(), want.float().double())


@pytest.mark.parametrize("selector", AXIS)
def test_ratio_zero_leaves_outputs_unchanged(model_and_cal, selector):
    m, cal = model_and_cal
    x = _batches(1, seed=5)[0]
    pruned = copy.deepcopy(m)
    info = prune_qk(pruned, 0.0, selector, cal)
    assert info["d_keep"] == 8
    assert torch.equal(pruned(x), m(x))


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_half_the_channels(selector, gated):
    m = _model(gated)
    cal = calibrate(m, _batches(), rows=100)
    pruned = copy.deepcopy(m)
    info = prune_qk(pruned, 0.5, selector, cal)
    assert info["d_keep"] == 4
    for layer in pruned.mixers():
        assert layer.head_k_dim == 4 and layer.q_proj.weight.shape == (8, 32) and layer.k_conv1d.weight.shape[0] == 8
        assert layer.scale == pytest.approx(8**-0.5)  # the original readout scale
    assert pruned.state_bytes() * 2 == m.state_bytes()
    assert pruned.cfg.deltanet.head_k_dim == 4 and pruned.cfg.deltanet.qk_scale == pytest.approx(8**-0.5)
    assert m.cfg.deltanet.head_k_dim == 8  # the unpruned model's config is untouched
    x = _batches(1, seed=5)[0]
    logits = pruned(x)
    assert torch.isfinite(logits).all() and not torch.allclose(logits, m(x))
    # the pruned model still decodes: prefill + step == forward
    last, caches = pruned.prefill(x[:, :20])
    torch.testing.assert_close(last, logits[:, 19])
    torch.testing.assert_close(pruned.step(x[:, 20], caches), logits[:, 20])


def test_kept_channels_are_the_selectors(model_and_cal):
    m, cal = model_and_cal
    pruned = copy.deepcopy(m)
    info = prune_qk(pruned, 0.5, "l1", cal)
    layer = m.mixers()[1]
    want = select_l1(layer.q_proj.weight.float(), layer.k_proj.weight.float(), 2, 4)
    assert info["kept"][1] == want.tolist()
    rows = (want + 8 * torch.arange(2).unsqueeze(1)).flatten()
    assert torch.equal(pruned.mixers()[1].q_proj.weight, layer.q_proj.weight[rows])


def test_rotation_by_a_selection_matrix_equals_slicing():
    """T = rows of the identity: the T²-mixed convolution is exact, so the rotation baseline equals slicing."""
    m = _model()
    idx = torch.tensor([[0, 3, 5, 6], [1, 2, 4, 7]])
    t = torch.eye(8, dtype=torch.float64)[idx]  # (H, d', d_k)
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    for layer in a.mixers():
        rotate_qk(layer, t)
    for layer in b.mixers():
        layer.slice_qk(idx)
    x = _batches(1, seed=3)[0]
    torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)


def test_export_and_reload_give_identical_outputs(tmp_path, model_and_cal):
    from drrl.train.checkpoint import resolve_checkpoint, save_checkpoint
    from drrl.train.config import RunConfig

    m, cal = model_and_cal
    pruned = copy.deepcopy(m).float()
    prune_qk(pruned, 0.5, "drrqr", cal)
    cfg = RunConfig(model=pruned.cfg)
    save_checkpoint(tmp_path, 1, pruned, torch.optim.AdamW(pruned.parameters()), {"config": cfg.to_dict()})
    ckpt = resolve_checkpoint(tmp_path)  # what drrl.load does, without its GPT-2 vocabulary check
    loaded = build_model(RunConfig.from_dict(ckpt.config).model)
    ckpt.load_model(loaded)
    x = _batches(1, seed=5)[0]
    assert loaded.mixers()[0].head_k_dim == 4
    assert torch.equal(loaded(x), pruned(x))


def test_errors(model_and_cal):
    m, cal = model_and_cal
    with pytest.raises(ValueError, match="unknown selector"):
        prune_qk(copy.deepcopy(m), 0.5, "magic", cal)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        prune_qk(copy.deepcopy(m), 1.0, "l1", cal)
    acts_only = calibrate(m, _batches(1), ("acts",), rows=50)
    with pytest.raises(ValueError, match="taylor needs calibration"):
        prune_qk(copy.deepcopy(m), 0.5, "taylor", acts_only)
    gpt = build_model(GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, context=16))
    with pytest.raises(ValueError, match="no DeltaNet layers"):
        prune_qk(gpt, 0.5, "l1", [])


def test_one_registration_drives_prune_qk_and_the_prune_config():
    """A selector registered by a test is listed, accepted by PruneConfig and dispatched by prune_qk (with the
    calibration it asks for); unregistered, it is gone everywhere."""
    import drrl.pruning

    m = _model()
    seen = []

    @register_selector("first", needs=("rms",))
    def first(x: SelectorInputs, d_keep: int, generator: torch.Generator) -> torch.Tensor:
        seen.append((x.x_rms.shape, len(x.calibration.q)))
        return torch.arange(d_keep).expand(x.n_head, -1)

    @register_selector("first-rotated", rotates=True)
    def first_rotated(x: SelectorInputs, d_keep: int, generator: torch.Generator) -> torch.Tensor:
        return torch.eye(x.d_k, dtype=torch.float64)[:d_keep].expand(x.n_head, -1, -1)

    try:
        assert drrl.pruning.SELECTORS == (*SELECTORS, "first", "first-rotated") == available_selectors()
        assert PruneConfig(selectors=["first", "drrqr", "first-rotated"]).selectors[0] == "first"
        sliced, rotated = copy.deepcopy(m), copy.deepcopy(m)
        info = prune_qk(sliced, 0.5, "first", _batches())  # raw batches: calibrates what "first" needs only
        assert seen == [((32,), 0), ((32,), 0)]  # rms for both layers, no activations
        assert info["kept"] == [[[0, 1, 2, 3]] * 2] * 2
        assert prune_qk(rotated, 0.5, "first-rotated", [])["kept"] == [None, None]
        x = _batches(1, seed=5)[0]
        torch.testing.assert_close(rotated(x), sliced(x), rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="already registered"):
            register_selector("first")(first)
    finally:
        unregister_selector("first")
        unregister_selector("first-rotated")
    assert drrl.pruning.SELECTORS == SELECTORS == ("random", "l1", "wanda", "taylor", "pca", "drrqr")
    with pytest.raises(ConfigError, match="selectors must be among random, l1, wanda, taylor, pca, drrqr"):
        PruneConfig(selectors=["first"])
    with pytest.raises(ValueError, match="unknown selector 'first'"):
        prune_qk(copy.deepcopy(m), 0.5, "first", [])
    with pytest.raises(ValueError, match="unknown calibration"):
        register_selector("x", needs=("everything",))


def test_state_ranks_and_decode_times(model_and_cal):
    m, cal = model_and_cal
    ranks = state_ranks(m, _batches(1, length=20)[0][:, :16])
    assert ranks["utilisation"].shape == ranks["effective_rank"].shape == (2, 2, 16)  # (L, H, T)
    assert 0 < ranks["mean"] <= 1 and ranks["mean"] == pytest.approx(float(ranks["utilisation"].mean()))
    dense = copy.deepcopy(m).float()  # decode_times feeds float32 inputs
    pruned = copy.deepcopy(dense)
    prune_qk(pruned, 0.5, "l1", cal)
    t = decode_times({"dense": dense, "pruned": pruned}, batch=2, repeats=1)
    assert set(t) == {"dense", "pruned"} and all(set(v) == {"mixers", "model"} for v in t.values())
    assert all(s > 0 for v in t.values() for s in v.values())
