"""Random and adversarial run configs: every one is either accepted or rejected with a ConfigError (a
one-line message naming the key), never another exception."""

from __future__ import annotations

import dataclasses
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drrl.errors import ConfigError
from drrl.train.config import RunConfig

SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _keys(section: str) -> list[str]:
    cls = type(getattr(RunConfig(), section))
    return [f.name for f in dataclasses.fields(cls)]


VALUES = st.one_of(
    st.integers(-(10**6), 10**6),
    st.sampled_from([0, -1, 1, 2**40, 3, 64, 256]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.5, 1e-30]),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.sampled_from(["full", "drrl", "deltanet", "gpt", "bogus", "", "shakespeare", "auto", "cpu", "bf16"]),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.sampled_from(["head_k_dim", "gated", "rank", "x"]), st.integers(-2, 300), max_size=2),
)


@st.composite
def configs(draw):
    data = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "bogus"]), unique=True, max_size=5)):
        if section == "bogus" or draw(st.integers(0, 9)) == 0:
            data[section] = draw(VALUES)
            continue
        keys = _keys(section) + ["not_a_key"]
        data[section] = draw(st.dictionaries(st.sampled_from(keys), VALUES, max_size=4))
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_any_config_is_accepted_or_a_config_error(data):
    try:
        cfg = RunConfig.from_dict(data)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        return
    # accepted: then it is sane enough to describe itself and round-trip
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    t = cfg.train
    assert math.isfinite(t.lr) and t.lr > 0 and t.batch_size > 0 and t.max_steps > 0
    assert cfg.model.d_model % cfg.model.n_head == 0
