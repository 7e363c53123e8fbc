"""Truncated SVD of LoRA deltas, back into LoRA factors.

Two entry points, one per space:

* :func:`compress_factors` (factor space): the SVD of ``scaling * B @ A`` computed from QR
  decompositions of ``B`` (d_out x R) and ``A^T`` (d_in x R) and the SVD of an R x R core,
  so no d_out x d_in matrix is ever formed. Cost O((d_out + d_in) R^2), done in float64.
* :func:`compress_dense` (dense space): the SVD of a dense delta, full (``torch.linalg.svd``)
  or randomized (``torch.svd_lowrank``, seeded without touching the global RNG).

Both keep the ``rank`` largest singular triplets and split them the way PEFT's ``*_svd``
merges do: ``B = U_r diag(S_r)``, ``A = Vh_r``, ``scaling = 1``. Any split with the same product
would do; this one makes the factors comparable with PEFT's. PEFT's optional ``svd_clamp``
(clamping U and Vh entries at a quantile, off by default) is not offered: it changes the
product and only makes sense for PEFT's particular split.
"""

from __future__ import annotations

import torch

from lorafuse.library import LoraFactors

__all__ = ["compress_dense", "compress_factors", "factor_svd"]

_OVERSAMPLE = 10  # extra columns for the randomized range finder (Halko et al. 2011)


def factor_svd(f: LoraFactors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, Vh)`` of ``f.delta()`` without forming it, in float64.

    ``U`` is (d_out, k), ``S`` (k,) descending, ``Vh`` (k, d_in) with
    ``k = min(d_out, d_in, r)``; singular values beyond ``k`` are exactly zero.
    """
    B = f.B.to(torch.float64)
    A = f.A.to(torch.float64)
    q_b, r_b = torch.linalg.qr(B, mode="reduced")  # B = Q_B R_B,  R_B (k_b, r)
    q_a, r_a = torch.linalg.qr(A.T, mode="reduced")  # A^T = Q_A R_A, R_A (k_a, r)
    core = f.scaling * (r_b @ r_a.T)  # (k_b, k_a): delta = Q_B core Q_A^T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return q_b @ u, s, vh @ q_a.T


def compress_factors(f: LoraFactors, rank: int) -> LoraFactors:
    """The best rank-``rank`` approximation of ``f.delta()`` as LoRA factors (factor space).

    Exact when ``rank >= f.rank``. The result's rank is ``min(rank, r, d_out, d_in)``; its
    dtype is ``f.A``'s.
    """
    _check_rank(rank)
    u, s, vh = factor_svd(f)
    return _split(u, s, vh, rank, f.A.dtype)


def compress_dense(
    delta: torch.Tensor,
    rank: int,
    *,
    randomized: bool = False,
    niter: int = 2,
    seed: int = 0,
) -> LoraFactors:
    """The rank-``rank`` truncated SVD of a dense (d_out, d_in) ``delta`` as LoRA factors.

    ``randomized=True`` uses ``torch.svd_lowrank`` with ``niter`` power iterations and
    ``rank + 10`` probe columns (approximate, much cheaper for rank << min(d_out, d_in));
    ``seed`` makes it reproducible, and the global RNG is left as it was. The result's rank is
    ``min(rank, d_out, d_in)``.
    """
    _check_rank(rank)
    if delta.ndim != 2:
        raise ValueError(f"compress_dense needs a 2-D delta, got shape {tuple(delta.shape)}")
    k = min(rank, *delta.shape)
    if randomized:
        q = min(k + _OVERSAMPLE, *delta.shape)
        devices = [delta.device] if delta.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _split(u, s, vh, k, delta.dtype)


def _split(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, dtype: torch.dtype
) -> LoraFactors:
    """Keep the top ``rank`` triplets; ``B = U diag(S)``, ``A = Vh`` (PEFT's split)."""
    k = min(rank, s.shape[0])
    B = (u[:, :k] * s[:k]).to(dtype).contiguous()
    A = vh[:k].to(dtype).contiguous()
    return LoraFactors(A=A, B=B, scaling=1.0)


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
