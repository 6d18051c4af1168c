"""DeltaNet and Gated DeltaNet in pure PyTorch: the delta-rule ops (recurrent, one decode step, chunkwise WY
form for training) with a float64 naive reference, and the state's per-token rank utilisation.

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,    o_t = s · S_tᵀ q_t.

``DeltaNet`` is the token mixer (flash-linear-attention's parameter names, short convolutions, per-head output
RMSNorm, optional gate), with ``slice_qk`` for structured Q/K pruning; the LM is ``drrl.models.DeltaNetLM``.
"""

from drrl.linear_attention.layers import DeltaNet, ShortConvolution
from drrl.linear_attention.ops import (
    delta_rule_chunked,
    delta_rule_recurrent,
    delta_rule_step,
    naive_delta_rule,
    state_rank_utilisation,
)

__all__ = [
    "DeltaNet",
    "ShortConvolution",
    "delta_rule_chunked",
    "delta_rule_recurrent",
    "delta_rule_step",
    "naive_delta_rule",
    "state_rank_utilisation",
]
