"""DELLA and Model Breadcrumbs: two more sparsify steps for the trim/drop -> sign consensus ->
combine family of :func:`~lorafuse.merging.dense_methods.generalized_task_arithmetic`.

Both prune each expert's dense delta on its own, then hand the pruned stack to
``generalized_task_arithmetic`` with ``sparsify="none"`` for the consensus and combine steps,
so they are settings of the same family as TIES and DARE (as in mergekit, where DELLA and
breadcrumbs are ``sparsification_method`` values of one generalized task arithmetic).

* **DELLA** (Deep et al. 2024, MagPrune): in each row of an expert's (d_out, d_in) delta,
  rank the entries by magnitude (``rank`` 0 for the smallest, ``n - 1`` for the largest) and
  keep entry ``i`` with probability ``p_i = density - epsilon + 2 * epsilon * rank_i / (n - 1)``
  (largest magnitudes are kept most often; the mean keep rate is ``density``); survivors are
  divided by their own ``p_i`` (unbiased). Then TIES's sign election and disjoint mean
  (``della``) or a plain weighted sum (``della_linear``), times ``scale`` (lambda).
* **Model Breadcrumbs** (Davari & Belilovsky 2023): per expert and module, drop the
  ``round(gamma * n)`` largest-magnitude entries (outliers) and then the smallest ones, so that
  ``round(density * n)`` entries stay; no rescaling. Then the weighted sum (``breadcrumbs``) or
  sign election + sum of the agreeing experts (``breadcrumbs_ties``, mergekit's setting:
  summed, not averaged), times ``scale``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafuse.merging.dense_methods import MajoritySign, generalized_task_arithmetic

__all__ = ["breadcrumbs", "breadcrumbs_prune", "della", "della_keep_probability", "della_prune"]


def della_keep_probability(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's per-entry keep probability for a (..., d_in) ``delta``, ranked per row.

    ``p = density - epsilon + 2 * epsilon * rank / (n - 1)`` with ``rank`` the position of
    ``|delta|`` in its row sorted ascending (ties by position, as a stable sort gives them);
    a row of one entry gets ``density``.
    """
    if not (0.0 < density - epsilon and density + epsilon <= 1.0):
        raise ValueError(
            f"DELLA needs 0 < density - epsilon and density + epsilon <= 1, "
            f"got density {density}, epsilon {epsilon}"
        )
    n = delta.shape[-1]
    if n == 1:
        return torch.full_like(delta, density)
    order = torch.argsort(delta.abs(), dim=-1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(n, device=delta.device).expand_as(order)
    ranks.scatter_(-1, order, positions)
    return (density - epsilon) + (2.0 * epsilon / (n - 1)) * ranks.to(delta.dtype)


def della_prune(
    deltas: torch.Tensor, density: float, epsilon: float, generator: torch.Generator
) -> torch.Tensor:
    """MagPrune: keep each entry with its :func:`della_keep_probability`, divide survivors by
    it. ``deltas`` is one (d_out, d_in) delta or a (K, d_out, d_in) stack (one draw, in order:
    the mask is ``torch.rand(...) < p`` from ``generator``). Returns a new tensor."""
    p = della_keep_probability(deltas, density, epsilon)
    u = torch.rand(deltas.shape, generator=generator, dtype=deltas.dtype, device=deltas.device)
    return torch.where(u < p, deltas / p, torch.zeros_like(deltas))


def breadcrumbs_prune(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """A copy of the 2-D ``delta`` keeping the ``round(density * n)`` entries that follow the
    ``round(gamma * n)`` largest magnitudes (fewer outliers are dropped when the two do not
    fit in ``n``). Order: ``|delta|`` descending, ties by position (stable sort).

    The two thresholds come from selection (``kthvalue``); only when a magnitude is tied at a
    threshold is the whole matrix sorted to break the tie by position.
    """
    n = delta.numel()
    keep = min(round(density * n), n)
    top = min(round(gamma * n), n - keep)
    a = delta.abs().reshape(n)
    mask = torch.ones(n, dtype=torch.bool, device=delta.device)
    untied = True
    for rank, side in ((top, "below"), (top + keep, "at_least")):
        if 0 < rank < n or (rank == n and side == "below"):
            t = torch.kthvalue(a, n - rank + 1).values  # the rank-th largest
            mask &= (a < t) if side == "below" else (a >= t)
            untied &= int((a == t).sum()) == 1
        elif rank == 0 and side == "at_least":
            mask.zero_()
    if not (untied and int(mask.sum()) == keep):
        order = torch.argsort(a, descending=True, stable=True)
        mask.zero_()
        mask[order[top : top + keep]] = True
    return delta * mask.reshape(delta.shape).to(delta.dtype)


def della(
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float],
    *,
    density: float,
    epsilon: float = 0.15,
    sign_consensus: bool = True,
    majority_sign: MajoritySign = "total",
    scale: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """DELLA: MagPrune each expert (:func:`della_prune`, one seeded generator, experts in
    order), then sign election + disjoint mean (``sign_consensus=True``) or a weighted sum,
    times ``scale``."""
    x = torch.stack(list(deltas)) if not isinstance(deltas, torch.Tensor) else deltas
    generator = torch.Generator(device=x.device).manual_seed(seed)
    pruned = della_prune(x, density, epsilon, generator)
    return generalized_task_arithmetic(
        pruned,
        weights,
        sign_consensus=sign_consensus,
        majority_sign=majority_sign,
        combine="disjoint_mean" if sign_consensus else "sum",
        scale=scale,
    )


def breadcrumbs(
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float],
    *,
    density: float,
    gamma: float = 0.01,
    sign_consensus: bool = False,
    majority_sign: MajoritySign = "total",
    scale: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """Model Breadcrumbs: :func:`breadcrumbs_prune` each expert, then the weighted sum of all
    (or, with ``sign_consensus``, of those agreeing with the elected sign), times ``scale``.
    Deterministic: ``seed`` (a dense-method parameter) is unused."""
    pruned = torch.stack([breadcrumbs_prune(d, density, gamma) for d in deltas])
    return generalized_task_arithmetic(
        pruned,
        weights,
        sign_consensus=sign_consensus,
        majority_sign=majority_sign,
        combine="sum",
        scale=scale,
    )
