"""EMR-Merging (Huang et al., NeurIPS 2024): Elect, Mask and Rescale.

One unified task vector for all tasks plus, per task, a binary mask and a scalar rescaler:

1. **elect** the unified sign ``gamma = sgn(sum_t tau_t)`` and magnitude
   ``eps = max_t |tau_t|`` over the tasks whose sign agrees with ``gamma`` (0 if none);
   ``tau_uni = gamma * eps``;
2. **mask** ``M_t = (tau_t * tau_uni > 0)``: where task ``t`` agrees with the unified vector;
3. **rescale** ``lambda_t = sum |tau_t| / sum |M_t * tau_uni|`` (sums over every parameter of
   the model, so one scalar per task), restoring task ``t``'s mean magnitude.

At inference task ``t`` runs ``W + lambda_t M_t * tau_uni``, chosen per input by task labels
(the paper's setting) or by a router. Elect and mask are per entry, so they are computed one
module at a time (:func:`emr_module`); ``lambda_t`` needs the whole model's sums, which
:func:`emr_module` returns for the caller to add up (:func:`rescalers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["EmrModule", "emr_module", "rescalers", "task_delta"]


@dataclass
class EmrModule:
    """One module's unified vector, the K masks, and the K rescaler sums (numerators
    ``sum |tau_t|`` and denominators ``sum |M_t tau_uni|``) of this module."""

    unified: torch.Tensor  # (d_out, d_in)
    masks: torch.Tensor  # (K, d_out, d_in) bool
    abs_task: torch.Tensor  # (K,)
    abs_masked: torch.Tensor  # (K,)


def emr_module(deltas: Sequence[torch.Tensor] | torch.Tensor) -> EmrModule:
    """Elect and mask one module's (K, d_out, d_in) task deltas (module doc, steps 1-2)."""
    tau = torch.stack(list(deltas)) if not isinstance(deltas, torch.Tensor) else deltas
    sign = torch.sign(tau.sum(0))
    agree = (torch.sign(tau) == sign) & (sign != 0)
    eps = torch.where(agree, tau.abs(), torch.zeros_like(tau)).amax(0)
    unified = sign * eps
    masks = tau * unified > 0
    abs_task = tau.abs().flatten(1).sum(1)
    abs_masked = (masks * unified.abs()).flatten(1).sum(1)
    return EmrModule(unified, masks, abs_task, abs_masked)


def rescalers(abs_task: torch.Tensor, abs_masked: torch.Tensor) -> torch.Tensor:
    """``lambda_t`` from the model-wide sums (K,); 0 for a task whose mask keeps nothing."""
    return torch.where(abs_masked > 0, abs_task / abs_masked.clamp(min=1e-30), 0.0)


def task_delta(module: EmrModule, t: int, rescaler: float) -> torch.Tensor:
    """Task ``t``'s delta in this module: ``lambda_t M_t * tau_uni``."""
    return rescaler * module.masks[t] * module.unified
