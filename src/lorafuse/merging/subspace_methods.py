"""Merges inside a small shared basis built from the experts' factors: KnOTS and Core Space.
LoRA factors in, one LoRA out; no d_out x d_in matrix is formed.

* **KnOTS** (Stoica et al., ICLR 2025): the SVD of the experts' deltas side by side,
  ``[delta_1 | ... | delta_T] = U S [V_1^T | ... | V_T^T]``, gives one basis ``U`` shared by all
  tasks; task ``i`` is ``U (S V_i^T)``. The coordinates ``S V_i^T`` (``s_on_V`` in the reference
  code) are merged entrywise with TIES (keep the top ``density`` magnitudes per task, elect
  signs, disjoint mean, weights ``w_i``), and the merge is ``scale * U merged``. The SVD comes
  from a QR of the stacked B's and of each A^T (block diagonal), so it costs O((d_out + d_in)
  R^2) for ``R = sum r_i``.
* **Core Space** (Panariello et al., NeurIPS 2025): reference bases ``U_B`` (left singular
  vectors of ``[B_1 .. B_T]``) and ``V_A`` (right singular vectors of ``[A_1; ..; A_T]``); each
  delta is exactly ``U_B M_i V_A^T`` with the small core ``M_i = U_B^T delta_i V_A`` (R x R),
  mixed ranks included. An ``inner`` method merges the cores and the result is mapped back:
  ``U_B M V_A^T``. Task arithmetic, TSV-M and Iso-C give the same delta as in full space (their
  operations commute with the orthonormal bases; TSV-M's per-task count ``k`` is then taken
  from the cores' size, ``floor(min(R_B, R_A) / T)``); entrywise methods (TIES, DARE) act on
  core entries, which is the point of the paper.

Singular vectors with (numerically) zero singular values carry no direction and are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from lorafuse.library import LoraFactors
from lorafuse.merging.dense_methods import MajoritySign, generalized_task_arithmetic
from lorafuse.merging.svd_methods import iso_c, tsv_m

__all__ = ["CORE_INNER", "core_bases", "core_space", "knots", "knots_basis"]

_RTOL = 1e-10

CoreInner = Literal["task_arithmetic", "ties", "dare_ties", "tsv_m", "iso_c"]
# Entrywise inner merges: settings of generalized_task_arithmetic on the stacked cores.
_GTA_INNER: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"sparsify": "none", "sign_consensus": False, "combine": "sum"},
    "ties": {"sparsify": "magnitude", "sign_consensus": True, "combine": "disjoint_mean"},
    "dare_ties": {"sparsify": "random", "sign_consensus": True, "combine": "disjoint_mean"},
}
# Factor-space inner merges: each core is handed over as the LoRA (B = I, A = M_i).
_FACTOR_INNER: dict[str, Callable[..., LoraFactors]] = {"tsv_m": tsv_m, "iso_c": iso_c}
CORE_INNER: tuple[str, ...] = (*_GTA_INNER, *_FACTOR_INNER)


def _nonzero(s: torch.Tensor) -> int:
    return int((s > _RTOL * s.max()).sum()) if s.numel() and s.max() > 0 else 0


def knots_basis(parts: Sequence[LoraFactors]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(U, [S V_1^T, ..., S V_T^T])`` of the thin SVD of ``[delta_1 | ... | delta_T]`` (float64,
    nonzero singular values only): ``delta_i = U @ (S V_i^T)``."""
    b_cat = torch.cat([p.scaling * p.B.to(torch.float64) for p in parts], dim=1)
    q_b, r_b = torch.linalg.qr(b_cat)
    qr_a = [torch.linalg.qr(p.A.to(torch.float64).T) for p in parts]  # A_i^T = Q_i R_i
    r_a = torch.block_diag(*[r for _, r in qr_a])  # [A_1 .. A_T] block diag = R_a^T Q^T
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = _nonzero(s)
    coords, start = [], 0
    for q, _ in qr_a:
        block = vh[:k, start : start + q.shape[1]]
        coords.append(s[:k, None] * (block @ q.T))
        start += q.shape[1]
    return q_b @ u[:, :k], coords


def knots(
    parts: Sequence[LoraFactors],
    weights: Sequence[float],
    *,
    density: float,
    majority_sign: MajoritySign = "total",
    scale: float = 1.0,
) -> LoraFactors:
    """KnOTS-TIES: TIES on the tasks' coordinates ``S V_i^T`` in the shared basis ``U``."""
    if len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights for {len(parts)} experts")
    u, coords = knots_basis(parts)
    dtype = parts[0].A.dtype
    if u.shape[1] == 0:  # all deltas zero
        return LoraFactors(
            A=parts[0].A.new_zeros(1, parts[0].d_in),
            B=parts[0].B.new_zeros(parts[0].d_out, 1),
            scaling=1.0,
        )
    merged = generalized_task_arithmetic(
        torch.stack(coords),
        weights,
        sparsify="magnitude",
        density=density,
        sign_consensus=True,
        majority_sign=majority_sign,
        combine="disjoint_mean",
        scale=scale,
    )
    return LoraFactors(A=merged.to(dtype).contiguous(), B=u.to(dtype).contiguous(), scaling=1.0)


def core_bases(parts: Sequence[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_B, V_A)``: orthonormal bases (float64) of the column space of ``[B_1 .. B_T]`` and
    of the row space of ``[A_1; ..; A_T]``, from their SVDs (nonzero singular values)."""
    u, s, _ = torch.linalg.svd(
        torch.cat([p.B.to(torch.float64) for p in parts], 1), full_matrices=False
    )
    _, s_a, vh = torch.linalg.svd(
        torch.cat([p.A.to(torch.float64) for p in parts], 0), full_matrices=False
    )
    return u[:, : _nonzero(s)], vh[: _nonzero(s_a)].T


def core_space(
    parts: Sequence[LoraFactors],
    weights: Sequence[float],
    *,
    inner: CoreInner = "ties",
    density: float | None = None,
    majority_sign: MajoritySign = "total",
    scale: float = 1.0,
    seed: int = 0,
) -> LoraFactors:
    """Merge the cores ``M_i = U_B^T delta_i V_A`` with ``inner``, map back with the bases.

    ``density`` is needed by ``ties`` and ``dare_ties`` (``seed`` seeds DARE's drops);
    weights are passed to the inner method.
    """
    if len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights for {len(parts)} experts")
    if inner not in CORE_INNER:
        raise ValueError(f"unknown inner method {inner!r} (known: {', '.join(CORE_INNER)})")
    u_b, v_a = core_bases(parts)
    cores = [
        p.scaling * (u_b.T @ p.B.to(torch.float64)) @ (p.A.to(torch.float64) @ v_a) for p in parts
    ]
    if inner in _GTA_INNER:
        if inner != "task_arithmetic" and density is None:
            raise ValueError(f"core_space with inner {inner!r} needs a density")
        merged = generalized_task_arithmetic(
            torch.stack(cores),
            weights,
            **_GTA_INNER[inner],
            density=1.0 if density is None else density,
            majority_sign=majority_sign,
            scale=scale,
            seed=seed,
        )
        b, a = u_b @ merged, v_a.T
    else:
        eye = torch.eye(u_b.shape[1], dtype=torch.float64)
        core_parts = [LoraFactors(A=m, B=eye, scaling=1.0) for m in cores]
        f = _FACTOR_INNER[inner](core_parts, weights, scale=scale)
        b, a = u_b @ f.B, f.A @ v_a.T
    dtype = parts[0].A.dtype
    return LoraFactors(A=a.to(dtype).contiguous(), B=b.to(dtype).contiguous(), scaling=1.0)
