"""DR-RL dynamic low-rank attention: the rank of each layer's score matrix is chosen per segment of T tokens.

Per head, scores S = Q Kᵀ are replaced by (Q P_q[:, :r])(K P_k[:, :r])ᵀ with d × r_max maps from
:mod:`drrl.linalg` and a rank r from a small bucket set, chosen by a rank controller from prefix
statistics. The rank-r queries and keys go straight to SDPA with the scale 1/√d_head of the original
logits; the (L, L) score matrix is never formed.

Bases (``basis=``):
  * ``calibrated`` — fixed maps per layer and head from calibration data (``with calibrating(model): ...``),
    the exact Eckart–Young maps of the calibration Grams. No decomposition at run time.
  * ``online`` — segment s uses a basis refreshed from the prefix Grams of segments < s by warm-started
    subspace iteration (two steps from the previous basis, in whitened coordinates), and only when the basis
    is stale: when the exact kept score energy of the basis in use (drrl.linalg.truncation_errors, exact for
    any stale basis, so no bound is needed) has dropped by more than ``refresh_tol`` at some bucket since its
    refresh. Segment 0 uses the calibrated maps when there are some, else full rank.

Package map: kernels (SDPA paths), basis (calibration, statistics, online refresh), plan (what a
forward pass executes), guard (per-row error certificates), sensitivity (each layer's output Fisher, from which
the feedback estimates the KL a decision costs), layer (the module), cache (decode cache and export).

Causality: the basis and the rank used at positions of segment s depend only on tokens of the same
sequence before segment s (or on calibration data): bases, statistics and ranks are planned per
sequence, so no row of a batch sees another row's tokens (in training mode every row of a batch warm-starts its
online refreshes from the basis of the previous call, never from another row's). Keys of all earlier positions are
projected with the basis of the queries' segment, once per basis version at its largest rank; every segment runs
at its own rank (a slice of those keys: basis columns are ordered), one attention call per run of consecutive
segments with equal rank, so the executed score FLOPs are the planned ones.

Kernel paths (``kernel_path``): on CPU, SDPA runs its fused kernel only when q, k and v share a width,
so rank-r queries and keys are zero-padded back to d_head (identical result, full cost: CPU prefill
cannot gain from rank, it must only not lose); on CUDA the narrow q/k go to the efficient or cuDNN
backend. A run of segments that starts at an offset is computed as a causal diagonal block merged with
an unmasked off-diagonal block through their log-sum-exps (CPU, inference), or with an explicit mask.
"""

from drrl.attention.drrl.basis import calibrating, lowrank_modules
from drrl.attention.drrl.cache import ExportedLowRankAttention, LowRankKVCache
from drrl.attention.drrl.kernels import attend_offset, kernel_path, sdpa_lowrank
from drrl.attention.drrl.layer import BASIS_MODES, DynamicLowRankAttention
from drrl.attention.drrl.plan import Plan, naive_lowrank_attention
from drrl.attention.drrl.sensitivity import measuring_output_fisher

__all__ = [
    "BASIS_MODES",
    "DynamicLowRankAttention",
    "ExportedLowRankAttention",
    "LowRankKVCache",
    "Plan",
    "attend_offset",
    "calibrating",
    "kernel_path",
    "lowrank_modules",
    "measuring_output_fisher",
    "naive_lowrank_attention",
    "sdpa_lowrank",
]
