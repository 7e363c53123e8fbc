"""The one table of fusion methods by name, filled from above.

Each layer declares its own builders (``fusion.methods.FUSION_METHODS``,
``elrea.methods.ELREA_METHODS``); :mod:`lorafuse.methods`, which sees both, registers them
here, so this layer never imports the layers built on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorafuse.errors import LorafuseError

if TYPE_CHECKING:
    from lorafuse.fusion.base import Fusion
    from lorafuse.workspace import Workspace


@dataclass(frozen=True)
class FusionMethod:
    """A builder ``(ws, *, seed, **params) -> Fusion`` under a name, with its defaults.

    ``open_params``: the builder forwards parameters it does not name (static merges pass
    them to the merge method, which checks them itself).
    """

    name: str
    family: str  # "merging" | "ensembling" | "routing"
    build: Callable[..., Fusion]
    defaults: dict[str, Any]
    summary: str
    open_params: bool = False

    @property
    def params(self) -> list[str]:
        """The builder's own parameters (not ``ws`` or ``seed``)."""
        return [p for p in inspect.signature(self.build).parameters if p not in ("ws", "seed")]


def fusion_method(
    name: str, family: str, build: Callable[..., Fusion], *, open_params: bool = False, **defaults
) -> FusionMethod:
    """A :class:`FusionMethod` whose summary is the first line of the builder's docstring."""
    doc = (build.__doc__ or "").strip().splitlines()
    return FusionMethod(name, family, build, defaults, doc[0] if doc else "", open_params)


REGISTRY: dict[str, FusionMethod] = {}


def register_fusion(methods: Iterable[FusionMethod]) -> None:
    """Add methods to the registry (the same method again is a no-op; a clash is an error)."""
    for m in methods:
        if REGISTRY.get(m.name, m) != m:
            raise ValueError(f"fusion method {m.name!r} is registered twice")
        REGISTRY[m.name] = m


def build_fusion(ws: Workspace, name: str, *, seed: int = 0, **params: Any) -> Fusion:
    """Build the named method with its defaults overridden by ``params``; one-line errors."""
    if name not in REGISTRY:
        raise LorafuseError(f"unknown fusion method {name!r} (have: {', '.join(REGISTRY)})")
    spec = REGISTRY[name]
    allowed = set(spec.params)
    unknown = set(params) - allowed - {"seed"}
    if unknown and not spec.open_params:
        raise LorafuseError(
            f"{name}: unknown parameter(s) {', '.join(sorted(unknown))} "
            f"(have: {', '.join(sorted(allowed))})"
        )
    fusion = spec.build(ws, seed=seed, **{**spec.defaults, **params})
    fusion.name = name if name != "merge" else fusion.name
    return fusion


__all__ = ["REGISTRY", "FusionMethod", "build_fusion", "fusion_method", "register_fusion"]
