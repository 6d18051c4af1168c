"""Rank controllers (and, later, the RL agent). Depends only on torch and :mod:`drrl.linalg`; attention
modules import the controllers from here, so nothing in this package imports attention or models."""

from drrl.rl.controllers import (
    EnergyController,
    FixedController,
    RandomController,
    RankController,
    SegmentStats,
    available_controllers,
    build_controller,
)

__all__ = [
    "EnergyController",
    "FixedController",
    "RandomController",
    "RankController",
    "SegmentStats",
    "available_controllers",
    "build_controller",
]
