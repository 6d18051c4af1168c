from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from drrl.config import FieldError, apply_overrides, from_dict, load_yaml, require
from drrl.errors import ConfigError
from drrl.train.config import RunConfig


@dataclass
class Inner:
    n: int = 1
    x: float = 0.5

    def __post_init__(self):
        require(self.n > 0, "n", f"must be > 0, got {self.n}")


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    mode: Literal["a", "b"] = "a"
    name: str | None = None
    flag: bool = False
    sizes: list[int] = field(default_factory=list)


def test_from_dict_builds_nested_and_coerces_int_to_float():
    o = from_dict(Outer, {"inner": {"n": 3, "x": 2}, "mode": "b", "sizes": [1, 2]})
    assert o.inner.n == 3 and o.inner.x == 2.0 and isinstance(o.inner.x, float)
    assert o.mode == "b" and o.sizes == [1, 2] and o.name is None


@pytest.mark.parametrize(
    "data, match",
    [
        ({"inner": {"m": 1}}, r"unknown key 'inner\.m'; allowed keys: n, x"),
        ({"bogus": 1}, r"unknown key 'bogus'"),
        ({"inner": {"n": "3"}}, r"inner\.n must be an integer, got '3'"),
        ({"inner": {"n": True}}, r"inner\.n must be an integer"),
        ({"inner": {"n": 2.5}}, r"inner\.n must be an integer"),
        ({"inner": {"x": float("nan")}}, r"inner\.x must be a finite number"),
        ({"inner": {"n": 0}}, r"inner\.n must be > 0, got 0"),
        ({"inner": 5}, r"inner must be a mapping"),
        ({"mode": "c"}, r"mode must be one of 'a', 'b'"),
        ({"flag": "yes"}, r"flag must be true or false"),
        ({"name": 3}, r"name must be a string or null"),
        ({"sizes": "12"}, r"sizes must be a list"),
        ({"sizes": [1, "x"]}, r"sizes\[1\] must be an integer"),
    ],
)
def test_from_dict_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Outer, data)


def test_field_error_direct_construction():
    with pytest.raises(FieldError, match="n must be > 0"):
        Inner(n=-1)


def test_apply_overrides_parses_yaml_values():
    d = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=3e-4", "model.n_layer=2", "data.corpus=text:a=b.txt"])
    assert d == {"train": {"lr": 3e-4}, "model": {"n_layer": 2}, "data": {"corpus": "text:a=b.txt"}}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_run_config_roundtrip_and_cross_checks(tmp_path):
    cfg = RunConfig.load("configs/shakespeare-gpt-tiny.yaml", ["train.max_steps=7"])
    assert cfg.train.max_steps == 7 and cfg.model.d_model == 256
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"eval\.context must be <= model\.context"):
        RunConfig.load(None, ["model.context=16", "eval.context=32"])
    with pytest.raises(ConfigError, match=r"train\.min_lr must be in"):
        RunConfig.load(None, ["train.lr=1e-4", "train.min_lr=1e-3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_config_is_valid(path):
    if "methods" in load_yaml(path):  # a classification table (drrl classify)
        from drrl.recipes.classify import ClassifyConfig

        cfg = ClassifyConfig.load(path)
        names = [m.method for m in cfg.methods]
        assert {"full", "drrl", "static", "performer", "nystrom", "linformer"} <= set(names)
        assert cfg.seeds == [0, 1, 2]
        return
    hf_type = (load_yaml(path).get("model") or {}).get("hf", {}).get("model_type")
    if hf_type:  # a transformers architecture: valid where the installed transformers has it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if hf_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            with pytest.raises(ConfigError, match=f"'{hf_type}' has no causal LM in transformers"):
                RunConfig.load(path)
            return
    cfg = RunConfig.load(path)
    assert cfg.train.max_steps > 0
    if "drrl-hybrid" in path.name:
        assert cfg.train.mode == "hybrid" and cfg.model.attention_kwargs["controller"] == "rl"
        assert cfg.rl.loss_weight == 0.1 and (cfg.rl.alpha, cfg.rl.beta, cfg.rl.gamma) == (1.0, 0.5, 0.1)
        assert cfg.rl.discount == 0.0  # per-decision rewards (see the config's header)
