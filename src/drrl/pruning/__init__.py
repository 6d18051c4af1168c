"""Structured Q/K channel pruning of linear attention: per-head channel selectors (random, L1, Wanda, Taylor,
DRRQR) and the PCA rotation baseline (``selectors``, pure tensor functions on :mod:`drrl.linalg`, and the
registry of selector names), ``prune_qk`` which calibrates and slices the DeltaNet layers of a model
(``prune``), and the measurements of a pruned model's states and decode step (``diagnostics``).

``SELECTORS`` is the tuple of registered selector names (``available_selectors()``); register another with
``@register_selector(name, needs=...)`` (:mod:`drrl.pruning.selectors`)."""

from drrl.pruning.diagnostics import decode_times, state_ranks
from drrl.pruning.prune import LayerCalibration, calibrate, kept_width, mixers, prune_qk, rotate_qk
from drrl.pruning.selectors import (
    Selector,
    SelectorInputs,
    available_selectors,
    check_keep,
    get_selector,
    pca_rotation,
    register_selector,
    select_drrqr,
    select_l1,
    select_random,
    select_taylor,
    select_wanda,
    top_channels,
    unregister_selector,
)


def __getattr__(name: str):
    if name == "SELECTORS":  # the registered names now, a tuple
        return available_selectors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SELECTORS",
    "LayerCalibration",
    "Selector",
    "SelectorInputs",
    "available_selectors",
    "calibrate",
    "decode_times",
    "get_selector",
    "kept_width",
    "mixers",
    "prune_qk",
    "register_selector",
    "rotate_qk",
    "check_keep",
    "pca_rotation",
    "select_drrqr",
    "select_l1",
    "select_random",
    "select_taylor",
    "select_wanda",
    "state_ranks",
    "top_channels",
    "unregister_selector",
]
