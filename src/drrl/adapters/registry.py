"""The method table: which adapter methods ``apply_rana(method=...)`` knows and the functions that adapt a site
with each. A new method is one module with ``adapt_mlp`` (and ``adapt_qkv``, or none) plus one row in
:data:`ADAPTERS`; :data:`METHODS` (the names, in table order: what ``drrl compress --method all`` runs) and
argument checks follow from the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

# (``import ... as``, not ``from drrl.adapters import``: the package imports this module through ``model``)
import drrl.adapters.cats as cats
import drrl.adapters.rana as rana
import drrl.adapters.svd as svd


class Method(NamedTuple):
    """How one method adapts sites, in place. Both functions take ``(site, cols, keep, ctx)``: the site, the
    calibration collectors by input key (:func:`drrl.adapters.sites.collect`), the kept fraction of the site's
    FLOPs and a :class:`~drrl.adapters.fitting.FitContext`; they return the site's report entry (a dict).

    ``adapt_mlp`` may put a module replacing the whole MLP module under ``"replace"`` in its report (apply_rana
    installs it). ``adapt_qkv`` None: the method has no q/k/v form; q/k/v then stay dense and the MLPs carry
    the whole budget.
    """

    adapt_mlp: Callable[..., dict]
    adapt_qkv: Callable[..., dict] | None


ADAPTERS: dict[str, Method] = {
    "rana": Method(rana.adapt_mlp, rana.adapt_qkv),
    "cats": Method(cats.adapt_mlp, None),
    "svd": Method(svd.adapt_mlp, svd.adapt_qkv),
}

METHODS = tuple(ADAPTERS)
TARGETS = ("mlp", "mlp+qkv")
