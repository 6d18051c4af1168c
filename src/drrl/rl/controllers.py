"""Moved: the controller interface and heuristics to :mod:`drrl.controllers`, the learned controller to
:mod:`drrl.rl.controller` (this path re-exports both for one release)."""

from drrl._deprecated import moved

__getattr__ = moved(__name__, "drrl.controllers", "drrl.rl.controller")
