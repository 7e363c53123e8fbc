"""Re-compression that is never silent: what truncating a merged delta to a rank loses.

A merge whose result is re-compressed to rank ``r`` (every dense method; a factor method with
``rank`` below the exact rank) keeps the top ``r`` singular triplets of each module's merged
delta ``D``. Per module this records

* ``rel_error = ||D - D_r||_F / ||D||_F``, the relative Frobenius error of the stored LoRA;
* ``energy_kept = sum_{i<r} s_i^2 / ||D||_F^2``, the share of the squared norm kept
  (``1 - rel_error^2`` for an exact SVD);

and :func:`summarize` turns the modules' records into the line that merges print and write
into the model card (mean and max error, energy kept).

``rank: auto`` picks per module the smallest rank whose kept energy reaches ``energy``
(default 0.99), capped at ``max_rank`` (default: the rank the merge would use without
truncation, ``sum_k r_k`` or the exact rank).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lorafuse.library import LoraFactors
from lorafuse.merging.svd import compress_dense, factor_svd, split_triplets

__all__ = [
    "DEFAULT_ENERGY",
    "Truncation",
    "auto_rank",
    "dense_truncation",
    "factor_truncation",
    "format_summary",
    "summarize",
    "truncate_dense_auto",
    "records_json",
    "truncate_factors",
    "truncation_info",
]

DEFAULT_ENERGY = 0.99


@dataclass(frozen=True)
class Truncation:
    """What re-compressing one module's merged delta kept and lost."""

    rank: int  # the stored rank
    rel_error: float  # ||D - D_r||_F / ||D||_F
    energy_kept: float  # sum of kept s_i^2 / ||D||_F^2
    norm: float  # ||D||_F, so modules can be pooled by weight


def auto_rank(s: torch.Tensor, total: float, energy: float, max_rank: int) -> int:
    """The smallest ``k <= max_rank`` with ``sum_{i<k} s_i^2 >= energy * total`` (at least 1)."""
    if total <= 0.0 or s.numel() == 0:
        return 1
    kept = torch.cumsum(s.double() ** 2, 0) / total
    hit = torch.nonzero(kept >= energy - 1e-12)
    k = int(hit[0]) + 1 if hit.numel() else s.numel()
    return max(1, min(k, max_rank))


def truncate_factors(
    f: LoraFactors, rank: int | str, *, energy: float = DEFAULT_ENERGY, max_rank: int | None = None
) -> tuple[LoraFactors, Truncation]:
    """``f``'s delta at ``rank`` (an int, or ``"auto"``) from its exact SVD (factor space)."""
    u, s, vh = factor_svd(f)
    total = float((s.double() ** 2).sum())
    if rank == "auto":
        k = auto_rank(s, total, energy, max_rank or max(1, s.numel()))
    else:
        k = min(int(rank), s.numel())
    kept = float((s[:k].double() ** 2).sum())
    out = split_triplets(u, s, vh, max(k, 1), f.A.dtype)
    return out, _record(out.rank, total, kept, max(total - kept, 0.0))


def factor_truncation(full: LoraFactors, kept: LoraFactors) -> Truncation:
    """The record of ``kept`` (a truncated SVD of ``full``), from ``full``'s singular values."""
    _, s, _ = factor_svd(full)
    total = float((s.double() ** 2).sum())
    k = min(kept.rank, s.numel())
    energy = float((s[:k].double() ** 2).sum())
    return _record(kept.rank, total, energy, max(total - energy, 0.0))


def dense_truncation(delta: torch.Tensor, kept: LoraFactors) -> Truncation:
    """The record of ``kept`` as an approximation of the dense ``delta`` (residual computed)."""
    total = float(torch.linalg.matrix_norm(delta)) ** 2
    residual = torch.addmm(delta, kept.B.to(delta.dtype), kept.A.to(delta.dtype), alpha=-1.0)
    error = float(torch.linalg.matrix_norm(residual)) ** 2
    s = torch.linalg.vector_norm(kept.B.double(), dim=0) * abs(kept.scaling)
    s = s * torch.linalg.vector_norm(kept.A.double(), dim=1)  # rows of A = Vh are unit norm
    return _record(kept.rank, total, float((s**2).sum()), error)


def truncate_dense_auto(
    delta: torch.Tensor,
    *,
    energy: float = DEFAULT_ENERGY,
    max_rank: int,
    svd: str = "gram",
    niter: int = 2,
    seed: int = 0,
) -> tuple[LoraFactors, Truncation]:
    """The smallest-rank truncated SVD of ``delta`` keeping ``energy``, within ``max_rank``."""
    top = compress_dense(delta, max(1, max_rank), svd=svd, niter=niter, seed=seed)  # type: ignore[arg-type]
    s = torch.linalg.vector_norm(top.B.double(), dim=0)  # B = U S
    total = float(torch.linalg.matrix_norm(delta)) ** 2
    k = auto_rank(s, total, energy, top.rank)
    out = LoraFactors(A=top.A[:k].contiguous(), B=top.B[:, :k].contiguous(), scaling=1.0)
    return out, dense_truncation(delta, out)


def _record(rank: int, total: float, kept: float, error_sq: float) -> Truncation:
    if total <= 0.0:
        return Truncation(rank=rank, rel_error=0.0, energy_kept=1.0, norm=0.0)
    return Truncation(
        rank=rank,
        rel_error=math.sqrt(max(error_sq, 0.0) / total),
        energy_kept=min(kept / total, 1.0),
        norm=math.sqrt(total),
    )


def summarize(records: Mapping[str, Truncation]) -> dict[str, Any]:
    """Mean and max relative error (with the worst module), energy kept (mean over modules and
    pooled over all of them: sum of kept over sum of squared norms), ranks used."""
    if not records:
        return {}
    errors = {m: t.rel_error for m, t in records.items()}
    worst = max(errors, key=lambda m: errors[m])
    total = sum(t.norm**2 for t in records.values())
    kept = sum(t.energy_kept * t.norm**2 for t in records.values())
    ranks = [t.rank for t in records.values()]
    return {
        "modules": len(records),
        "rel_error_mean": sum(errors.values()) / len(errors),
        "rel_error_max": errors[worst],
        "worst_module": worst,
        "energy_kept_mean": sum(t.energy_kept for t in records.values()) / len(records),
        "energy_kept_total": kept / total if total > 0 else 1.0,
        "rank_min": min(ranks),
        "rank_max": max(ranks),
    }


def format_summary(records: Mapping[str, Truncation]) -> str:
    """One line: ``re-compressed 12 modules to rank 16: relative Frobenius error mean 0.33,
    max 0.41 (model.layers.1.mlp.up_proj); energy kept 0.89``."""
    s = summarize(records)
    if not s:
        return "no re-compression: the merge is stored exactly"
    ranks = (
        str(s["rank_min"])
        if s["rank_min"] == s["rank_max"]
        else (f"{s['rank_min']}..{s['rank_max']}")
    )
    return (
        f"re-compressed {s['modules']} modules to rank {ranks}: relative Frobenius error mean "
        f"{s['rel_error_mean']:.3f}, max {s['rel_error_max']:.3f} ({s['worst_module']}); "
        f"energy kept {s['energy_kept_total']:.3f} (mean per module {s['energy_kept_mean']:.3f})"
    )


def records_json(records: Mapping[str, Truncation]) -> dict[str, Any]:
    """The summary plus every module's record, for results files."""
    return {"summary": summarize(records), "modules": {m: asdict(t) for m, t in records.items()}}


def truncation_info(records: Mapping[str, Truncation]) -> dict[str, Any]:
    """Fields for a results row's ``info``: the summary's error and energy, if any."""
    s = summarize(records)
    if not s:
        return {}
    keys = ("rel_error_mean", "rel_error_max", "energy_kept_total", "rank_min", "rank_max")
    return {f"truncation_{k}": s[k] for k in keys}
