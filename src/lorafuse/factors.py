"""One linear module's LoRA update, ``delta = scaling * B @ A``; model-order sorting; sets of
modules' factors (a PEFT adapter, a merge in memory) and their union, zeros where one has none."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["FactorSource", "LoraFactors", "module_factors", "module_sort_key", "union_modules"]


@dataclass(frozen=True)
class LoraFactors:
    """The low-rank update of one linear module: ``delta = scaling * B @ A``."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scaling: float

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LoraFactors needs A (r, d_in) and B (d_out, r); got A {tuple(self.A.shape)}, "
                f"B {tuple(self.B.shape)}"
            )

    @property
    def rank(self) -> int:
        """The LoRA rank ``r``."""
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        """Input features of the adapted linear layer."""
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        """Output features of the adapted linear layer."""
        return int(self.B.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense weight update ``scaling * B @ A``, shape ``(d_out, d_in)``.

        Multiplied in the same order as PEFT's merge so results agree to rounding.
        """
        return (self.B @ self.A) * self.scaling


def module_sort_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting modules in model order: numeric parts (layer indices) numerically."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in name.split("."))


class FactorSource(Protocol):
    """Anything with LoRA factors per module: a :class:`LoraAdapter`, a merge in memory."""

    @property
    def module_names(self) -> list[str]: ...

    def factors(self, module: str) -> LoraFactors: ...


def union_modules(sources: Sequence[FactorSource]) -> list[str]:
    """Every module any source adapts, in model order."""
    return sorted({m for s in sources for m in s.module_names}, key=module_sort_key)


def module_factors(
    sources: Sequence[FactorSource],
    module: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> list[LoraFactors]:
    """Each source's factors of ``module``; zeros for a source that does not adapt it.

    The zero factors have the largest rank among the sources that do (so a library of one
    rank stays of one rank, e.g. for ``lowrank_average``), scaling 1, and the shape, dtype and
    device of the first source that has the module. ``dtype``/``device`` convert all of them.
    """
    present = {id(s): s.factors(module) for s in sources if module in set(s.module_names)}
    if not present:
        raise ValueError(f"no source adapts {module!r}")
    like = next(iter(present.values()))
    rank = max(f.rank for f in present.values())
    out = []
    for s in sources:
        f = present.get(id(s))
        if f is None:
            f = LoraFactors(
                A=like.A.new_zeros(rank, like.d_in),
                B=like.B.new_zeros(like.d_out, rank),
                scaling=1.0,
            )
        if dtype is not None or device is not None:
            f = LoraFactors(
                A=f.A.to(device=device, dtype=dtype),
                B=f.B.to(device=device, dtype=dtype),
                scaling=f.scaling,
            )
        out.append(f)
    return out
