"""Input-adaptive low-rank adapters for linear layers (RaNA) and their baselines (neuron adapters, static SVD).

One file per job: ``sites`` (where adapters go, calibration inputs), ``fitting`` (what the low-rank methods
share), ``rana``/``cats``/``svd`` (one file per method), ``registry`` (the method table), ``model``
(``apply_rana`` and FLOP accounting), ``layers`` (the modules), ``export`` (save, reload, merge).
"""

from drrl.adapters.layers import NeuronAdapterMLP, NeuronMaskedLinear, RankAdapter, SharedBasis, SharedRankSlice
from drrl.adapters.model import (
    CompressionReport,
    adapter_modules,
    apply_rana,
    measured_flops,
    prepare_decode,
    reset_counts,
)
from drrl.adapters.registry import ADAPTERS, METHODS, TARGETS, Method
from drrl.adapters.sites import MLPSite, QKVSite, find_sites

__all__ = [
    "ADAPTERS",
    "METHODS",
    "TARGETS",
    "CompressionReport",
    "MLPSite",
    "Method",
    "NeuronAdapterMLP",
    "NeuronMaskedLinear",
    "QKVSite",
    "RankAdapter",
    "SharedBasis",
    "SharedRankSlice",
    "adapter_modules",
    "apply_rana",
    "find_sites",
    "measured_flops",
    "prepare_decode",
    "reset_counts",
]
