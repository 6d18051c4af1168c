"""Moved: the ``drrl prune`` recipe is :mod:`drrl.recipes.prune` (PruneConfig, run_prune, report_markdown); its
measurements of models are :mod:`drrl.pruning` (state_ranks, decode_times). This path goes in the next release."""

from drrl._deprecated import moved

__getattr__ = moved(__name__, "drrl.recipes.prune", "drrl.pruning")
