"""README snippets run as written (from a scratch folder holding a copy of configs/)."""

import re
import shutil
from pathlib import Path

import pytest
import yaml

from drrl.train.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_two_commands():
    head = "\n".join(README.splitlines()[:8])
    assert "make demo" in head and "make test" in head


def test_readme_config_example_is_valid():
    (example,) = blocks("yaml")
    cfg = RunConfig.from_dict(yaml.safe_load(example))
    assert cfg.model.d_model == 256 and cfg.train.max_steps == 320


PYTHON = [
    pytest.param(
        code, marks=[pytest.mark.slow] if ("drrl.fit(" in code or "load_causal_lm(" in code) else [], id=f"block{i}"
    )
    for i, code in enumerate(blocks("python"))
]


@pytest.mark.parametrize("code", PYTHON)
def test_readme_python_snippet_runs(code, tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    if "logits" in namespace:
        assert namespace["logits"].shape == (1, 7, 50304)
    if "layers" in namespace:  # the Hugging Face surgery snippet, then generation through the low-rank cache
        assert len(namespace["layers"]) == 30 and namespace["layers"][0].last_plan.ranks == [48] * 4
        n = namespace["new_tokens"].shape[1] - 64  # 16 unless the model stopped at its end-of-text token
        stats = namespace["model"].model.layers[0].self_attn.drrl_attention.pop_stats()
        assert 1 <= n <= 16 and stats["hf_cache_calls"] == n - 1 and not stats.get("hf_exact_calls")
    if "result" in namespace:
        assert namespace["result"]["ppl"] > 1 and "again from the checkpoint" in capsys.readouterr().out
        assert (tmp_path / "runs" / "readme" / "eval.json").is_file()
