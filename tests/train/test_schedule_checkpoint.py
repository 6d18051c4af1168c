import json
import math

import pytest
import torch

from drrl.errors import CheckpointError
from drrl.models import GPT, GPTConfig
from drrl.train import RunConfig, TrainConfig, latest_checkpoint, load_checkpoint, lr_at, save_checkpoint
from drrl.train.checkpoint import list_checkpoints, resolve_checkpoint
from drrl.train.loop import build_optimizer


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lr_at(0, TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=4)) == pytest.approx(1.0)
    assert math.isclose(lr_at(2, TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=4)), 0.5)


def _model_and_opt():
    torch.manual_seed(0)
    cfg = RunConfig.load(None, ["model.vocab_size=64", "model.n_layer=1", "model.d_model=16", "model.n_head=2"])
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.train)
    loss = model.loss(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    loss.backward()
    opt.step()
    return cfg, model, opt


def test_checkpoint_round_trip(tmp_path):
    cfg, model, opt = _model_and_opt()
    path = save_checkpoint(tmp_path, 5, model, opt, {"config": cfg.to_dict()})
    assert path.name == "step_0000005"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    ckpt = load_checkpoint(path)
    assert ckpt.step == 5 and ckpt.config == cfg.to_dict()
    model2 = GPT(GPTConfig(**{**cfg.to_dict()["model"]}))
    ckpt.load_model(model2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert model2.lm_head.weight is model2.wte.weight
    opt2 = build_optimizer(model2, cfg.train)
    ckpt.load_optimizer(opt2)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(torch.as_tensor(s1["state"][i][k]), torch.as_tensor(s2["state"][i][k]))


def test_keep_and_latest_skips_damaged(tmp_path, caplog):
    cfg, model, opt = _model_and_opt()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {"config": cfg.to_dict()}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    newest = tmp_path / "checkpoints" / "step_0000003" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated
    assert latest_checkpoint(tmp_path).step == 2
    assert "skipping damaged checkpoint" in caplog.text
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_checkpoint(newest.parent)


def test_corrupt_state_json_and_wrong_model(tmp_path):
    cfg, model, opt = _model_and_opt()
    path = save_checkpoint(tmp_path, 1, model, opt, {"config": cfg.to_dict()})
    state = json.loads((path / "state.json").read_text())
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_checkpoint(path).load_model(GPT(GPTConfig(vocab_size=64, n_layer=2, d_model=16, n_head=2)))
    (path / "state.json").write_text(json.dumps(state)[:50])
    with pytest.raises(CheckpointError, match="unreadable state.json"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "checkpoints")


class _Payload:
    """Unpickling this would run os.system: the loader must refuse the file before any unpickling."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickled_payload_is_refused(tmp_path, writer, monkeypatch):
    import pickle

    from drrl.utils import sha256_file

    cfg, model, opt = _model_and_opt()
    path = save_checkpoint(tmp_path, 1, model, opt, {"config": cfg.to_dict()})
    weights = path / "model.safetensors"
    if writer == "pickle":
        weights.write_bytes(pickle.dumps({"w": _Payload()}))
    else:
        torch.save({"w": torch.zeros(2)}, weights)
    state = json.loads((path / "state.json").read_text())
    state["files"]["model.safetensors"] = sha256_file(weights)  # even with a matching hash
    (path / "state.json").write_text(json.dumps(state))
    called = []
    monkeypatch.setattr("os.system", lambda *a: called.append(a))
    with pytest.raises(CheckpointError, match="never unpickles"):
        resolve_checkpoint(path)
    assert not called


def test_pickle_sniffing_never_flags_a_safetensors_file(tmp_path):
    """A safetensors file starts with its header length: 256 lengths cover a first byte of 0x80 too."""
    from safetensors.torch import save_file

    from drrl.utils import pickle_kind

    lengths = set()
    for n in range(1, 300):
        save_file({"x" * n: torch.zeros(1)}, tmp_path / "a.safetensors")
        lengths.add((tmp_path / "a.safetensors").read_bytes()[0])
        assert pickle_kind(tmp_path / "a.safetensors") is None, n
    assert 0x80 in lengths
