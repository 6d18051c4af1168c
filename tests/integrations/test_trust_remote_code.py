"""Hugging Face models run their repository's code only when the user passes --trust-remote-code."""

import pytest
import transformers

from drrl.cli import main


@pytest.fixture
def seen(monkeypatch):
    calls = []

    def fake_from_pretrained(path, **kwargs):
        calls.append(kwargs)
        raise OSError("stopped by the test")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    return calls


@pytest.mark.parametrize("command", ["demo", "compress"])
@pytest.mark.parametrize("flag", [False, True])
def test_trust_remote_code_only_with_the_flag(command, flag, seen, tmp_path, capsys):
    argv = [command, "--model", "some-org/custom-model", "--out", str(tmp_path / "out")]
    assert main(argv + (["--trust-remote-code"] if flag else [])) == 1
    assert [c["trust_remote_code"] for c in seen] == [flag]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("drrl: error: cannot load model 'some-org/custom-model'")
