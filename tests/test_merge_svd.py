"""lorafuse.merging SVD re-compression: the factor-space SVD, the Gram-matrix SVD and the
randomized dense path, each against a full dense SVD."""

from __future__ import annotations

import pytest
import torch
from adapter_files import random_factors

from lorafuse.merging import (
    compress_dense,
    compress_factors,
    factor_svd,
)
from lorafuse.merging.svd import gram_svd


# ------------------------------------------------------------------------------- SVD
def test_factor_svd_equals_dense_svd() -> None:
    f = random_factors(5, 0.7, 3)
    delta = f.delta()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    fu, fs, fvh = factor_svd(f)
    torch.testing.assert_close(fs, s[:5], atol=1e-10, rtol=1e-10)
    assert torch.all(s[5:] < 1e-10)  # the rest are zero
    torch.testing.assert_close(fu.T @ fu, torch.eye(5, dtype=torch.float64))
    for r in (1, 3):
        want = (u[:, :r] * s[:r]) @ vh[:r]
        got = compress_factors(f, r)
        assert got.rank == r and got.scaling == 1.0
        torch.testing.assert_close(got.delta(), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(compress_dense(delta, r).delta(), want, atol=1e-5, rtol=0)
    # full rank (and beyond) reproduces the delta exactly; rank is capped at r
    torch.testing.assert_close(compress_factors(f, 5).delta(), delta, atol=1e-10, rtol=0)
    assert compress_factors(f, 50).rank == 5
    torch.testing.assert_close(compress_dense(delta, 50).delta(), delta, atol=1e-10, rtol=0)


def test_factor_svd_rank_above_dims() -> None:
    f = random_factors(15, 1.5, 4, d_out=6, d_in=8)  # r > d_out, d_in
    got = compress_factors(f, 15)
    assert got.rank == 6
    torch.testing.assert_close(got.delta(), f.delta(), atol=1e-10, rtol=0)


def test_compress_dense_randomized_is_seeded_and_leaves_global_rng() -> None:
    delta = random_factors(4, 1.0, 5, d_out=40, d_in=30).delta().float()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = compress_dense(delta, 4, svd="randomized", seed=1)
    assert torch.equal(before, torch.get_rng_state())
    b = compress_dense(delta, 4, svd="randomized", seed=1)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    torch.testing.assert_close(a.delta(), delta, atol=1e-4, rtol=0)  # exact rank 4: recovered
    full = compress_dense(delta, 2)
    approx = compress_dense(delta, 2, svd="randomized", niter=4, seed=2)
    torch.testing.assert_close(approx.delta(), full.delta(), atol=1e-3, rtol=0)


def spectrum_test_matrix(d_out: int, d_in: int, seed: int, dtype=torch.float32):
    """A low-rank part plus full-rank noise (like a TIES merge), close singular values."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(d_out, 12, generator=gen) @ torch.randn(12, d_in, generator=gen)
    return (low + 0.5 * torch.randn(d_out, d_in, generator=gen)).to(dtype)


@pytest.mark.parametrize(("d_out", "d_in"), [(90, 40), (40, 90), (64, 64)])
def test_gram_svd_equals_full_svd_truncation(d_out: int, d_in: int) -> None:
    """Top singular values equal the full SVD's; the rank-r product is the full SVD's
    truncation, with the same reconstruction error to 1e-6 relative (float32 input)."""
    m = spectrum_test_matrix(d_out, d_in, 7)
    u_f, s_f, vh_f = torch.linalg.svd(m.double(), full_matrices=False)
    for r in (1, 5, 16, min(d_out, d_in) - 1):
        u, s, vh = gram_svd(m, r)
        assert u.shape == (d_out, r) and s.shape == (r,) and vh.shape == (r, d_in)
        torch.testing.assert_close(s, s_f[:r], rtol=1e-10, atol=0)
        torch.testing.assert_close(u.T @ u, torch.eye(r, dtype=torch.float64))
        torch.testing.assert_close(vh @ vh.T, torch.eye(r, dtype=torch.float64))
        want = (u_f[:, :r] * s_f[:r]) @ vh_f[:r]
        torch.testing.assert_close((u * s) @ vh, want, rtol=0, atol=1e-9)
        err_full = float(torch.linalg.matrix_norm(m.double() - want))
        if r > 16:  # the error is then at the level of the float32 factors' rounding
            continue
        for svd in ("gram", "full"):
            approx = compress_dense(m, r, svd=svd).delta().double()
            err = float(torch.linalg.matrix_norm(m.double() - approx))
            assert abs(err - err_full) <= 1e-6 * err_full, (svd, r)


def test_gram_svd_rank_deficient_and_full_rank() -> None:
    f = random_factors(5, 0.7, 8, d_out=30, d_in=20)  # float64, rank 5
    delta = f.delta()
    for r in (5, 20, 50):  # at and beyond the rank: the product is the delta
        torch.testing.assert_close(compress_dense(delta, r).delta(), delta, atol=1e-10, rtol=0)
        torch.testing.assert_close(
            compress_dense(delta.T.contiguous(), r).delta(), delta.T, atol=1e-10, rtol=0
        )
    assert compress_dense(delta, 50).rank == 20
    with pytest.raises(ValueError, match="unknown svd 'nope'"):
        compress_dense(delta, 2, svd="nope")  # type: ignore[arg-type]
