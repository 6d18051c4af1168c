"""Structured Q/K channel pruning of linear attention: per-head channel selectors (random, L1, Wanda, Taylor,
DRRQR) and the PCA rotation baseline (``selectors``, pure tensor functions on :mod:`drrl.linalg`), and
``prune_qk`` which calibrates and slices the DeltaNet layers of a model (``prune``)."""

from drrl.pruning.prune import LayerCalibration, calibrate, prune_qk, rotate_qk
from drrl.pruning.selectors import (
    SELECTORS,
    check_keep,
    pca_rotation,
    select_drrqr,
    select_l1,
    select_random,
    select_taylor,
    select_wanda,
    top_channels,
)

__all__ = [
    "SELECTORS",
    "LayerCalibration",
    "calibrate",
    "prune_qk",
    "rotate_qk",
    "check_keep",
    "pca_rotation",
    "select_drrqr",
    "select_l1",
    "select_random",
    "select_taylor",
    "select_wanda",
    "top_channels",
]
