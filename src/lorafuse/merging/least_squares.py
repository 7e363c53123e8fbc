"""Least-squares merging (RegMean; PLeaS's least-squares step for experts sharing a base).

Each module of expert ``i`` maps inputs ``X_i`` (its own layer inputs on its own task's data,
n_i x d_in) through ``W + delta_i``. The merged delta minimises the squared error of the
merged layer's outputs against every expert's outputs on that expert's inputs:

    delta* = argmin_D  sum_i || X_i D^T - X_i delta_i^T ||_F^2
           = (sum_i delta_i G_i) (sum_i G_i)^-1,        G_i = X_i^T X_i

(RegMean, Jin et al. ICLR 2023, eq. 3; PLeaS, Nasery et al. 2024, solves the same problem per
layer after its permutation step, which experts fine-tuned from one base do not need).
RegMean shrinks the Grams' off-diagonal entries, ``G~_i = alpha G_i + (1 - alpha) diag(G_i)``,
so that the sum is invertible with few tokens; ``alpha = 1`` is the plain least squares.

For LoRA experts the solution is stored exactly as a LoRA of rank ``sum_i r_i``:
``delta* = sum_i s_i B_i (A_i G~_i S^-1)`` with ``S = sum_i G~_i``, i.e. the stacked B's over the
stacked rows ``A_i G~_i S^-1``; no d_out x d_in matrix is formed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafuse.library import LoraFactors

__all__ = ["regmean", "shrink_gram"]


def shrink_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's ``alpha G + (1 - alpha) diag(G)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


def regmean(
    parts: Sequence[LoraFactors],
    grams: Sequence[torch.Tensor],
    *,
    alpha: float = 0.9,
    scale: float = 1.0,
) -> LoraFactors:
    """The least-squares merge of one module (module doc) as LoRA factors of rank sum r_i.

    ``grams[i]`` is ``X_i^T X_i`` (d_in x d_in) of expert ``i``'s own inputs. A singular sum
    (e.g. ``alpha=1`` with fewer tokens than d_in) is solved by the pseudo-inverse: the
    minimum-norm least-squares solution.
    """
    if len(grams) != len(parts):
        raise ValueError(f"{len(grams)} Gram matrices for {len(parts)} experts")
    shrunk = [shrink_gram(g.to(torch.float64), alpha) for g in grams]
    total = torch.stack(shrunk).sum(0)
    inv = torch.linalg.pinv(total, hermitian=True, rtol=1e-12)
    rows = [(p.A.to(torch.float64) @ g) @ inv for p, g in zip(parts, shrunk, strict=True)]
    dtype = parts[0].A.dtype
    A = torch.cat(rows, dim=0).to(dtype)
    B = torch.cat([scale * p.scaling * p.B for p in parts], dim=1).to(dtype)
    return LoraFactors(A=A.contiguous(), B=B.contiguous(), scaling=1.0)
