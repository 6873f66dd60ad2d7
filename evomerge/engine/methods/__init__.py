"""The merge-method registry: look a method up by its mergekit name, with a "did you mean".

Each method lives in its own module and declares its tunables once (see base.py). Importing this
package does not import torch; the arithmetic imports it when a merge actually runs.
"""

from __future__ import annotations

import difflib

from evomerge.errors import ConfigError
from evomerge.engine.methods.arcee_fusion import ArceeFusion
from evomerge.engine.methods.base import MergeMethod, Tunable
from evomerge.engine.methods.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from evomerge.engine.methods.dare import DareLinear, DareTies
from evomerge.engine.methods.della import Della, DellaLinear
from evomerge.engine.methods.karcher import Karcher
from evomerge.engine.methods.linear import Linear
from evomerge.engine.methods.model_stock import ModelStock
from evomerge.engine.methods.multislerp import MultiSlerp
from evomerge.engine.methods.nearswap import NearSwap
from evomerge.engine.methods.nuslerp import NuSlerp
from evomerge.engine.methods.passthrough import Passthrough
from evomerge.engine.methods.ram import Ram, RamPlusTl
from evomerge.engine.methods.sce import Sce
from evomerge.engine.methods.slerp import Slerp
from evomerge.engine.methods.task_arithmetic import TaskArithmetic
from evomerge.engine.methods.ties import Ties

_REGISTRY: dict[str, MergeMethod] = {
    m.name: m
    for m in (Linear(), Slerp(), TaskArithmetic(), Ties(), DareTies(), DareLinear(), Passthrough(),
              Breadcrumbs(), BreadcrumbsTies(), Della(), DellaLinear(), ModelStock(), NuSlerp(), MultiSlerp(),
              Karcher(), Sce(), NearSwap(), Ram(), RamPlusTl(), ArceeFusion())
}

__all__ = ["MergeMethod", "Tunable", "get", "names"]


def names() -> tuple[str, ...]:
    """Registered method names, in a stable order."""
    return tuple(_REGISTRY)


def get(name: str) -> MergeMethod:
    """The method called `name`, or ConfigError(where="merge_method") suggesting the closest."""
    method = _REGISTRY.get(name) if isinstance(name, str) else None
    if method is not None:
        return method
    known = names()
    text = str(name)
    close = difflib.get_close_matches(text.lower().replace("-", "_"), known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"unknown merge method {name!r}",
        where="merge_method",
        fix=f"{hint}known methods: {', '.join(known)}",
    )
