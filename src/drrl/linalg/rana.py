"""Moved to :mod:`drrl.linalg.adaptive_lowrank` (the name says what the math is, not which paper uses it)."""

from drrl._deprecated import moved

__getattr__ = moved(__name__, "drrl.linalg.adaptive_lowrank")
