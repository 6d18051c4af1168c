"""Rank controllers: the interface dynamic low-rank attention needs to choose a rank per segment
(:class:`RankController`, :class:`SegmentStats`, :class:`Feedback`), the registry that builds them by name,
:func:`attach_controller`, and the heuristics that learn nothing (fixed, random, energy, and a rank table per
(layer, segment)).

Learning controllers live in higher rooms (the RL policy in :mod:`drrl.rl`) and register themselves under a
name; this room never imports them (a registered name it has not seen yet is looked up through the
``drrl.controllers`` entry points, the way plugins are found)."""

from drrl.controllers.base import (
    Feedback,
    PendingController,
    RankController,
    SegmentStats,
    attach_controller,
    available_controllers,
    build_controller,
    controller_class,
    register_controller,
)
from drrl.controllers.heuristics import EnergyController, FixedController, RandomController, TableController

__all__ = [
    "EnergyController",
    "Feedback",
    "FixedController",
    "PendingController",
    "RandomController",
    "RankController",
    "SegmentStats",
    "TableController",
    "attach_controller",
    "available_controllers",
    "build_controller",
    "controller_class",
    "register_controller",
]
