"""drrl.flops.attention_module counts every attention the same way: its own algorithm, all heads and the batch."""

import pytest

from drrl import flops
from drrl.attention import build_attention


@pytest.mark.parametrize(
    ("name", "causal", "kw"),
    [
        ("full", True, {}),
        ("performer", True, {"n_features": 32, "chunk": 32}),
        ("performer", False, {"n_features": 32}),
        ("nystrom", False, {"n_landmarks": 8}),
        ("linformer", False, {"max_len": 1024, "k": 16}),
    ],
)
def test_counts_are_positive_and_cheaper_than_exact_at_long_length(name, causal, kw):
    attn = build_attention(name, 64, 4, causal=causal, **kw)
    small, big = flops.attention_module(attn, 2, 64), flops.attention_module(attn, 2, 1024)
    assert all(v >= 0 for v in small.values()) and sum(big.values()) > sum(small.values())
    exact = sum(flops.full_attention(2, 4, 1024, 16, causal).values())
    if name != "full":  # every approximation is sub-quadratic: cheaper than exact at 1024 tokens
        assert sum(big.values()) < exact
    else:
        assert sum(big.values()) == exact


def test_data_dependent_attentions_point_to_their_plans():
    with pytest.raises(ValueError, match="pop_stats"):
        flops.attention_module(build_attention("drrl", 64, 4), 1, 64)
