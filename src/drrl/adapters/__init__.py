"""Input-adaptive low-rank adapters for linear layers (RaNA) and their baselines (neuron adapters, static SVD)."""

from drrl.adapters.layers import NeuronAdapterMLP, NeuronMaskedLinear, RankAdapter, SharedBasis, SharedRankSlice
from drrl.adapters.rana import (
    METHODS,
    CompressionReport,
    adapter_modules,
    apply_rana,
    find_sites,
    measured_flops,
    reset_counts,
)

__all__ = [
    "METHODS",
    "CompressionReport",
    "NeuronAdapterMLP",
    "NeuronMaskedLinear",
    "RankAdapter",
    "SharedBasis",
    "SharedRankSlice",
    "adapter_modules",
    "apply_rana",
    "find_sites",
    "measured_flops",
    "reset_counts",
]
