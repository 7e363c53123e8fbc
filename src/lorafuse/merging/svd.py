"""Truncated SVD of LoRA deltas, back into LoRA factors.

Two entry points, one per space:

* :func:`compress_factors` (factor space): the SVD of ``scaling * B @ A`` computed from QR
  decompositions of ``B`` (d_out x R) and ``A^T`` (d_in x R) and the SVD of an R x R core,
  so no d_out x d_in matrix is ever formed. Cost O((d_out + d_in) R^2), done in float64.
* :func:`compress_dense` (dense space): the truncated SVD of a dense delta, by one of
  ``"gram"`` (:func:`gram_svd`, the default: exact top triplets from the eigendecomposition of
  the smaller Gram matrix in float64), ``"full"`` (``torch.linalg.svd``, all triplets) or
  ``"randomized"`` (``torch.svd_lowrank``, approximate, seeded without touching the global RNG).

Both keep the ``rank`` largest singular triplets and split them the way PEFT's ``*_svd``
merges do: ``B = U_r diag(S_r)``, ``A = Vh_r``, ``scaling = 1``. Any split with the same product
would do; this one makes the factors comparable with PEFT's. PEFT's optional ``svd_clamp``
(clamping U and Vh entries at a quantile, off by default) is not offered: it changes the
product and only makes sense for PEFT's particular split.
"""

from __future__ import annotations

import threading
from typing import Literal

import scipy.linalg
import torch

from lorafuse.library import LoraFactors
from lorafuse.merging.threads import blas_limit

__all__ = [
    "SVD_ALGORITHMS",
    "compress_dense",
    "compress_factors",
    "factor_svd",
    "gram_svd",
    "split_triplets",
]

SvdAlgorithm = Literal["gram", "full", "randomized"]
SVD_ALGORITHMS: tuple[str, ...] = ("gram", "full", "randomized")

_OVERSAMPLE = 10  # extra columns for the randomized range finder (Halko et al. 2011)
# torch.svd_lowrank draws from the global RNG: one seeded draw at a time across threads
_GLOBAL_RNG = threading.Lock()


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
    return split_triplets(u, s, vh, rank, f.A.dtype)


def gram_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k = min(rank, d_out, d_in)`` singular triplets ``(U, S, Vh)`` of a dense
    (d_out, d_in) ``delta``, in float64, from the Gram matrix of its shorter side.

    For a tall ``M`` (``d_out >= d_in``; a wide one is transposed), the right singular vectors
    are the eigenvectors of ``G = M^T M`` (d_in x d_in) and ``M V = U S``. ``G`` is formed in
    float64 from the (float32) entries, whose products are exact there, and only its top ``k``
    eigenpairs are computed (LAPACK ``syevr`` through SciPy, with as many BLAS threads as
    torch uses; ``torch.linalg.eigh`` off CPU).
    ``U S`` is then ``M V`` itself and ``S`` its column norms, so the rank-``k`` product
    ``U S Vh = M V V^T`` is the projection of ``M`` on the computed subspace. That subspace's
    angle to the exact one is about 1e-16 over the relative eigengap
    ``(sigma_k^2 - sigma_{k+1}^2) / sigma_1^2``, so even a gap of 1e-6 leaves the product
    within ~1e-10 of the full SVD's truncation, far below float32 rounding (and the
    reconstruction error moves only by the angle squared).

    Cost: one ``d_out x d_in x min(d)`` product plus an eigensolve of size ``min(d)`` (no
    full-size orthogonal factors), several times cheaper than ``torch.linalg.svd``.
    ``S`` is descending. Where ``S`` is (numerically) zero, ``U``'s column is only noise
    normalised (zero if ``S`` is exactly 0), which leaves the product ``U S Vh`` exact.
    """
    _check_rank(rank)
    if delta.ndim != 2:
        raise ValueError(f"gram_svd needs a 2-D delta, got shape {tuple(delta.shape)}")
    tall = delta.shape[0] >= delta.shape[1]
    m = (delta if tall else delta.T).detach().to(torch.float64)  # (long, short)
    short = m.shape[1]
    k = min(rank, short)
    if m.device.type == "cpu":
        a = m.numpy()
        with blas_limit(torch.get_num_threads()):
            gram = a.T @ a  # numpy runs A^T A as a symmetric rank-k update (syrk)
            _, vecs = scipy.linalg.eigh(
                gram, subset_by_index=[short - k, short - 1], driver="evr", check_finite=False
            )
        v = torch.from_numpy(vecs[:, ::-1].copy())  # descending
    else:
        _, vecs = torch.linalg.eigh(m.T @ m)
        v = vecs[:, short - k :].flip(1)
    us = m @ v  # (long, k) = U S
    s = torch.linalg.vector_norm(us, dim=0)
    u = us / torch.where(s > 0, s, 1.0)
    if tall:  # M = U S V^T
        return u, s, v.T
    return v, s, u.T  # M^T = U' S V'^T  ->  M = V' S U'^T


def compress_dense(
    delta: torch.Tensor,
    rank: int,
    *,
    svd: SvdAlgorithm = "gram",
    niter: int = 2,
    seed: int = 0,
) -> LoraFactors:
    """The rank-``rank`` truncated SVD of a dense (d_out, d_in) ``delta`` as LoRA factors.

    ``svd="gram"`` (:func:`gram_svd`) and ``"full"`` (``torch.linalg.svd``) are exact and
    agree to rounding; ``"gram"`` is much cheaper when ``rank << min(d_out, d_in)``.
    ``"randomized"`` uses ``torch.svd_lowrank`` with ``niter`` power iterations and
    ``rank + 10`` probe columns (approximate: its error exceeds the optimum's unless the
    spectrum decays fast); ``seed`` makes it reproducible, and the global RNG is left as it
    was. The result's rank is ``min(rank, d_out, d_in)``; its dtype is ``delta``'s.
    """
    _check_rank(rank)
    if delta.ndim != 2:
        raise ValueError(f"compress_dense needs a 2-D delta, got shape {tuple(delta.shape)}")
    k = min(rank, *delta.shape)
    if svd == "gram":
        u, s, vh = gram_svd(delta, k)
    elif svd == "randomized":
        q = min(k + _OVERSAMPLE, *delta.shape)
        devices = [delta.device] if delta.device.type == "cuda" else []
        with _GLOBAL_RNG, torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)
        vh = v.T
    elif svd == "full":
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        raise ValueError(f"unknown svd {svd!r} (known: {', '.join(SVD_ALGORITHMS)})")
    return split_triplets(u, s, vh, k, delta.dtype)


def split_triplets(
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
