"""One linear module's LoRA update, ``delta = scaling * B @ A``, and model-order sorting."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LoraFactors", "module_sort_key"]


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
