"""Pure tensor functions for dynamic low-rank attention: exact rank-r score factorisation without forming
the (L, L) score matrix, spectra, perturbation bounds and warm-started subspace iteration; and for the
input-adaptive low-rank adapters of linear layers (``adaptive_lowrank``: data-aware bases, the masked
low-rank map, the FLOP allocation between basis size and mask density).

Everything is batched over leading dimensions (heads), works in float32 and float64, and has a naive
reference (``naive_*``) that the tests compare against. No ``nn.Module`` lives here.
"""

from drrl.linalg.adaptive_lowrank import (
    Allocation,
    adapter_flops,
    allocate,
    allocate_many,
    data_aware_basis,
    masked_lowrank,
    naive_allocate,
    naive_data_aware_basis,
    naive_masked_lowrank,
    top_fraction_threshold,
    top_fraction_thresholds,
)
from drrl.linalg.bounds import (
    davis_kahan_sin_theta,
    output_error_bound,
    prob_error_bound,
    rank_transition_cost,
    sin_theta,
    spectral_norm_bounds,
    wedin_sin_theta,
    weyl_bound,
    yu_wang_samworth_sin_theta,
)
from drrl.linalg.factor import (
    gram,
    gram_root,
    lowrank_score_maps,
    lowrank_score_maps_from_qk,
    naive_lowrank_scores,
    naive_truncation_errors,
    truncation_errors,
)
from drrl.linalg.spectrum import (
    core_singular_values,
    effective_rank,
    energy_ratio,
    stable_rank,
    tail_energy,
)
from drrl.linalg.subspace import cholesky_qr2, subspace_iteration, subspace_residual, whiten

__all__ = [
    "Allocation",
    "adapter_flops",
    "allocate",
    "allocate_many",
    "cholesky_qr2",
    "core_singular_values",
    "data_aware_basis",
    "davis_kahan_sin_theta",
    "effective_rank",
    "energy_ratio",
    "gram",
    "gram_root",
    "lowrank_score_maps",
    "lowrank_score_maps_from_qk",
    "masked_lowrank",
    "naive_allocate",
    "naive_data_aware_basis",
    "naive_lowrank_scores",
    "naive_masked_lowrank",
    "naive_truncation_errors",
    "output_error_bound",
    "prob_error_bound",
    "rank_transition_cost",
    "sin_theta",
    "spectral_norm_bounds",
    "stable_rank",
    "subspace_iteration",
    "subspace_residual",
    "tail_energy",
    "top_fraction_threshold",
    "top_fraction_thresholds",
    "truncation_errors",
    "wedin_sin_theta",
    "weyl_bound",
    "whiten",
    "yu_wang_samworth_sin_theta",
]
