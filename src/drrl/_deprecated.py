"""Old import paths of moved modules keep working for one release: importing one warns (DeprecationWarning)
and every name is looked up in the new home(s).

    # drrl/demo.py
    from drrl._deprecated import moved

    __getattr__ = moved(__name__, "drrl.recipes.demo")
"""

from __future__ import annotations

import importlib
import warnings


def moved(old: str, *new: str):
    """Warn that module ``old`` moved to ``new`` and return a module ``__getattr__`` that finds names there
    (the first of the new modules that has the name)."""
    warnings.warn(
        f"{old} moved to {' and '.join(new)}; the old import path will be removed in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    targets = [importlib.import_module(n) for n in new]

    def __getattr__(name: str):
        for t in targets:
            if hasattr(t, name):
                return getattr(t, name)
        raise AttributeError(f"module {old!r} (moved to {', '.join(new)}) has no attribute {name!r}")

    return __getattr__


def moved_names(old: str, names: dict[str, str]):
    """A module ``__getattr__`` for a module that still exists but whose ``names`` moved: ``{name: new module}``;
    using one warns (DeprecationWarning)."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"{old}.{name} moved to {names[name]}.{name}; the old path will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__
