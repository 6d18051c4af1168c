"""Moved to :mod:`drrl.recipes.demo` (this path re-exports it for one release)."""

from drrl._deprecated import moved

__getattr__ = moved(__name__, "drrl.recipes.demo")
