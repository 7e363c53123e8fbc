"""Merge methods on singular vectors: TSV-M / TSV-C (task singular vectors) and Iso-C /
Iso-CTS (isotropic merging). Experts' LoRA factors in, one LoRA out.

Every SVD here is of a LoRA delta or of a sum of them, so it comes from the factors
(``svd.factor_svd``: QR of B and A^T, SVD of an r x r core, float64) and no d_out x d_in
matrix is formed. A LoRA delta of rank r has only r nonzero singular values; the singular
vectors of the zero ones are arbitrary, so they are dropped (``s <= _RTOL * s_max``), where the
papers, written for full fine-tuning, keep a fixed number of components per layer.

* **TSV-C** (Gargiulo et al., CVPR 2025): keep each task's top ``k`` singular triplets,
  ``k = floor(fraction * min(d_out, d_in))`` (``fraction`` default ``1/T`` for ``T`` tasks, as
  in the paper), and add the truncated deltas: ``scale * sum_i U_i S_i V_i^T``.
* **TSV-M**: the same triplets, concatenated ``U = [U_1 .. U_T]``, ``S``, ``V = [V_1 .. V_T]``,
  with ``U`` and ``V`` replaced by their nearest matrices with orthonormal columns (the polar
  factor ``P Q^T`` of ``U = P Sigma Q^T``, Procrustes; this whitening decorrelates the tasks):
  ``scale * U_perp diag(S) V_perp^T``.
* **Iso-C** (Marczak et al., ICML 2025): SVD of the task-arithmetic sum ``sum_i w_i delta_i =
  U S V^T``, every singular value replaced by their mean: ``scale * mean(S) * U V^T``.
* **Iso-CTS**: a common subspace (top ``k_c`` singular vectors of the sum) plus, per task, the
  top ``n`` singular vectors of its delta's residual ``(I - U_c U_c^T) delta_i``; all triplets
  concatenated, ``U`` and ``V`` orthogonalised as in TSV-M, every singular value set to their
  mean. Sizes as the reference code: ``N`` components in all, ``k_c = int(N * common_fraction)``
  adjusted so that ``N - k_c`` splits evenly, ``n = (N - k_c) / T``; here ``N = min(d_out, d_in,
  sum_i r_i)``, the rank the sum can have (the paper's ``N`` is ``min(d_out, d_in)``).

Weights ``w_i`` multiply the experts' deltas (default 1 each, as in the papers' sums).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafuse.library import LoraFactors
from lorafuse.merging.linear import concat_factors
from lorafuse.merging.svd import factor_svd

__all__ = ["iso_c", "iso_cts", "polar", "task_svd", "tsv_c", "tsv_m"]

_RTOL = 1e-10  # singular values below this fraction of the largest are zero (float64)

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def polar(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P Q^T`` of ``m = P Sigma Q^T`` (thin SVD): the matrix with
    orthonormal columns (or rows, if ``m`` is wide) nearest to ``m`` in Frobenius norm."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def task_svd(f: LoraFactors, weight: float = 1.0, k: int | None = None) -> Triplets:
    """The nonzero singular triplets ``(U, S, Vh)`` of ``weight * f.delta()`` (float64), the top
    ``k`` of them if given. A negative weight flips ``U``, so ``S`` stays nonnegative."""
    u, s, vh = factor_svd(f)
    keep = int((s > _RTOL * s.max()).sum()) if s.numel() and s.max() > 0 else 0
    if k is not None:
        keep = min(keep, k)
    sign = -1.0 if weight < 0 else 1.0
    return sign * u[:, :keep], abs(weight) * s[:keep], vh[:keep]


def _to_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, like: LoraFactors
) -> LoraFactors:
    """``u diag(s) vh`` as LoRA factors in ``like``'s dtype (``B = U S``, ``A = Vh``); a zero
    delta (no triplet) becomes one zero component, so the LoRA has rank >= 1."""
    dtype = like.A.dtype
    if s.numel() == 0:
        u, s, vh = u.new_zeros(like.d_out, 1), s.new_zeros(1), vh.new_zeros(1, like.d_in)
    return LoraFactors(A=vh.to(dtype).contiguous(), B=(u * s).to(dtype).contiguous(), scaling=1.0)


def _tsv_triplets(
    parts: Sequence[LoraFactors], weights: Sequence[float], fraction: float | None
) -> list[Triplets]:
    if len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights for {len(parts)} experts")
    frac = 1.0 / len(parts) if fraction is None else fraction
    k = max(1, int(min(parts[0].d_out, parts[0].d_in) * frac))
    return [task_svd(p, w, k) for p, w in zip(parts, weights, strict=True)]


def _cat(triplets: Sequence[Triplets]) -> Triplets:
    return (
        torch.cat([t[0] for t in triplets], dim=1),
        torch.cat([t[1] for t in triplets]),
        torch.cat([t[2] for t in triplets], dim=0),
    )


def tsv_c(
    parts: Sequence[LoraFactors],
    weights: Sequence[float],
    *,
    scale: float = 1.0,
    fraction: float | None = None,
) -> LoraFactors:
    """TSV-C: ``scale * sum_i`` of each task's top-``k`` truncation (module doc)."""
    u, s, vh = _cat(_tsv_triplets(parts, weights, fraction))
    return _to_factors(u, scale * s, vh, parts[0])


def tsv_m(
    parts: Sequence[LoraFactors],
    weights: Sequence[float],
    *,
    scale: float = 1.0,
    fraction: float | None = None,
) -> LoraFactors:
    """TSV-M: the tasks' top-``k`` singular vectors, decorrelated by the polar factor of their
    concatenation, with their own singular values (module doc)."""
    u, s, vh = _cat(_tsv_triplets(parts, weights, fraction))
    return _to_factors(polar(u), scale * s, polar(vh.T).T, parts[0])


def iso_c(
    parts: Sequence[LoraFactors], weights: Sequence[float], *, scale: float = 1.0
) -> LoraFactors:
    """Iso-C: the sum ``sum_i w_i delta_i`` with its spectrum flattened to the mean of its
    nonzero singular values."""
    u, s, vh = task_svd(concat_factors(parts, weights))
    mean = float(s.mean()) if s.numel() else 0.0
    return _to_factors(u, torch.full_like(s, scale * mean), vh, parts[0])


def iso_cts(
    parts: Sequence[LoraFactors],
    weights: Sequence[float],
    *,
    scale: float = 1.0,
    common_fraction: float = 0.8,
) -> LoraFactors:
    """Iso-CTS: common subspace of the sum plus each task's residual directions, orthogonalised,
    with a flat spectrum (module doc)."""
    t = len(parts)
    total = concat_factors(parts, weights)
    n_all = min(total.d_out, total.d_in, total.rank)
    k_c = int(n_all * common_fraction)
    per_task = round((n_all - k_c) / t)
    k_c = max(n_all - per_task * t, 0)
    u_c, s_c, vh_c = task_svd(total, k=k_c)
    pieces = []
    for p, w in zip(parts, weights, strict=True):
        b = (w * p.scaling) * p.B.to(torch.float64)
        residual = b - u_c @ (u_c.T @ b)  # (I - U_c U_c^T) delta_i, still a LoRA
        pieces.append(
            task_svd(LoraFactors(A=p.A.to(torch.float64), B=residual, scaling=1.0), k=per_task)
        )
    u, s, vh = _cat([*pieces, (u_c, s_c, vh_c)])
    flat = torch.full_like(s, scale * float(s.mean()) if s.numel() else 0.0)
    return _to_factors(polar(u), flat, polar(vh.T).T, parts[0])
