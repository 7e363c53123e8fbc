"""lorafuse.merging: merge-method math (known answers), SVD compression, the registry, the
driver, and equivalence with PEFT's ``add_weighted_adapter``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils

from lorafuse.errors import LorafuseError
from lorafuse.library import LoraAdapter, LoraFactors, save_adapter
from lorafuse.merging import (
    MERGE_METHODS,
    MergeMethod,
    compress_dense,
    compress_factors,
    dense_methods,
    factor_svd,
    get_method,
    merge,
    register,
)
from lorafuse.merging.dense_methods import (
    generalized_task_arithmetic,
    largest_mask,
    magnitude_prune,
    random_drop,
)
from lorafuse.merging.factor_methods import lowrank_average
from lorafuse.merging.merge import DeltaBuffer, stack_deltas
from lorafuse.merging.registry import DenseParams, MergeParams
from lorafuse.merging.svd import gram_svd

INPUT_IDS = torch.tensor([[3, 17, 9, 88, 41, 5, 120, 64], [7, 7, 2, 99, 31, 11, 4, 60]])
TARGETS = ["q_proj", "v_proj"]  # q_proj is 32 x 32, v_proj 16 x 32 in the tiny Llama


def dense(method: str, deltas: list[torch.Tensor], weights: list[float], **kw: Any):
    """Run a registered dense method's function directly (its settings + ``kw``)."""
    return get_method(method).fn(deltas, weights, **kw)


def random_factors(rank: int, scaling: float, seed: int, d_out: int = 12, d_in: int = 10):
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(
        A=torch.randn(rank, d_in, generator=gen, dtype=torch.float64),
        B=torch.randn(d_out, rank, generator=gen, dtype=torch.float64),
        scaling=scaling,
    )


# --------------------------------------------------------------------- dense: known answers
E1 = [0.9, -0.1, 0.3, -0.8]
E2 = [-0.5, 0.4, 0.2, -0.6]
E3 = [0.2, 0.7, -0.1, 0.3]
# density 0.5 keeps round(0.5 * 4) = 2 entries per expert:
#   t1 = [0.9, 0, 0, -0.8]   t2 = [-0.5, 0, 0, -0.6]   t3 = [0, 0.7, 0, 0.3]
# elected sign of t1 + t2 + t3 = [0.4, 0.7, 0, -1.1]  ->  [+, +, + (zero elects +), -]
# agreeing experts per entry: {1}, {3}, {} , {1, 2}


def test_ties_known_answer_unweighted() -> None:
    deltas = [torch.tensor([E1]), torch.tensor([E2]), torch.tensor([E3])]
    got = dense("ties", deltas, [1.0, 1.0, 1.0], density=0.5)
    # [0.9 / 1, 0.7 / 1, 0, (-0.8 - 0.6) / 2]
    torch.testing.assert_close(got, torch.tensor([[0.9, 0.7, 0.0, -0.7]]))
    scaled = dense("ties", deltas, [1.0, 1.0, 1.0], density=0.5, scale=2.0)
    torch.testing.assert_close(scaled, torch.tensor([[1.8, 1.4, 0.0, -1.4]]))


def test_ties_known_answer_weighted_matches_peft() -> None:
    """Weights do not vote (the sign is elected on unweighted values, as in PEFT) and the
    disjoint mean divides by the number of agreeing experts."""
    deltas = [torch.tensor([E1]), torch.tensor([E2]), torch.tensor([E3])]
    weights = [1.0, 2.0, 0.5]
    got = dense("ties", deltas, weights, density=0.5)
    # entry 0: weighted votes 0.9 - 1.0 < 0 would elect -, but unweighted 0.4 elects +:
    #   1 * 0.9 / 1 = 0.9;  entry 1: 0.5 * 0.7 / 1 = 0.35;  entry 3: (1 * -0.8 + 2 * -0.6) / 2
    torch.testing.assert_close(got, torch.tensor([[0.9, 0.35, 0.0, -1.0]]))
    peft = merge_utils.ties(deltas, torch.tensor(weights), 0.5, "total")
    torch.testing.assert_close(got, peft)


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_dense_methods_match_peft_merge_utils(sign: str) -> None:
    """Same math as ``peft.utils.merge_utils`` on random tensors; DARE with a generator seeded
    like PEFT's global RNG draws the same masks."""
    gen = torch.Generator().manual_seed(5)
    deltas = [torch.randn(6, 10, generator=gen) for _ in range(3)]
    w = [0.7, -0.4, 1.2]
    tw = torch.tensor(w)
    density = 0.3  # 0.3 * 60 = 18 entries: int() and round() agree
    torch.testing.assert_close(
        dense("ties", deltas, w, density=density, majority_sign=sign),
        merge_utils.ties(deltas, tw, density, sign),
    )
    torch.testing.assert_close(
        dense("magnitude", deltas, w, density=density),
        merge_utils.magnitude_prune(deltas, tw, density),
    )
    torch.manual_seed(11)
    peft_dare = merge_utils.dare_linear(deltas, tw, density)
    torch.testing.assert_close(dense("dare_linear", deltas, w, density=density, seed=11), peft_dare)
    torch.manual_seed(12)
    peft_dt = merge_utils.dare_ties(deltas, tw, density, sign)
    torch.testing.assert_close(
        dense("dare_ties", deltas, w, density=density, seed=12, majority_sign=sign), peft_dt
    )


def test_magnitude_prune_keeps_round_density_n() -> None:
    x = torch.randn(7, 9, generator=torch.Generator().manual_seed(0))
    for density in (0.1, 0.3, 0.5, 0.77, 1.0):
        kept = magnitude_prune(x, density)
        assert int((kept != 0).sum()) == round(density * 63)
        survivors = kept[kept != 0].abs()
        dropped = x[kept == 0].abs()
        if len(dropped) and len(survivors):
            assert survivors.min() >= dropped.max()
    # ties at the threshold: exactly round(density * n) kept all the same
    assert int((magnitude_prune(torch.ones(10), 0.5) != 0).sum()) == 5
    # round, not int(): int(0.29 * 100) == 28
    assert int((magnitude_prune(torch.randn(100), 0.29) != 0).sum()) == 29


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """The reference: per row, the entries ``torch.topk`` keeps (what PEFT prunes with)."""
    mask = torch.zeros(values.shape, dtype=torch.bool)
    for row in range(values.shape[0]):
        if k > 0:
            mask[row, torch.topk(values[row], k).indices] = True
    return mask


def topk_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The previous (and PEFT's) magnitude pruning: topk of |delta| + scatter."""
    k = round(density * delta.numel())
    return delta * topk_mask(delta.abs().reshape(1, -1), k).reshape(delta.shape)


def tied_values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Magnitudes on a coarse grid: many entries tie at any threshold."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 7, shape, generator=gen).float() / 4


# rows of 600 entries are searched whole; rows of 40_000 (>= 2**15) go through the sampled
# bracket around the threshold
@pytest.mark.parametrize("n", [600, 40_000])
@pytest.mark.parametrize("ties", [False, True])
def test_largest_mask_keeps_what_topk_keeps(n: int, ties: bool) -> None:
    """Same survivors as torch.topk, row by row, with and without ties at the threshold."""
    values = tied_values((3, n), 1) if ties else torch.randn(3, n).abs()
    if not ties:  # a few exact ties away from and at the threshold all the same
        values[1, :50] = values[1, 50]
        kth = torch.kthvalue(values[2], n // 2).values
        values[2, :3] = kth
    for k in (0, 1, n // 10, n // 2, n // 2 + 1, n - 1, n):
        got = largest_mask(values, k)
        assert got.sum(dim=1).tolist() == [k, k, k]
        assert torch.equal(got, topk_mask(values, k)), k


def test_largest_mask_missed_bracket_and_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bracket too narrow to hold the threshold falls back to the whole row, exactly; NaNs
    rank first, as in topk."""
    monkeypatch.setattr(dense_methods, "_BRACKET_SIGMAS", 0.0)
    values = torch.randn(6, 50_000, generator=torch.Generator().manual_seed(3)).abs()
    values[4, ::997] = float("nan")
    for k in (1_000, 25_000, 49_000):
        assert torch.equal(largest_mask(values, k), topk_mask(values, k))


@pytest.mark.parametrize("ties", [False, True])
def test_magnitude_prune_equals_topk_prune(ties: bool) -> None:
    for shape in ((7, 9), (200, 300)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
        if ties:
            x = tied_values(shape, 2) * x.sign()
        for density in (0.1, 0.3, 0.5, 0.77):
            assert torch.equal(magnitude_prune(x, density), topk_prune(x, density))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_drop_draws_bernoulli_masks(dtype: torch.dtype) -> None:
    """rand < density is the mask torch.bernoulli draws (PEFT's), from the same RNG stream."""
    x = torch.randn(3, 70, 50, dtype=dtype)
    for density in (0.1, 0.3, 0.5, 0.9, 0.123456789):
        ours, ref = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        got = random_drop(x, density, ours)
        masks = [torch.bernoulli(torch.full_like(e, density), generator=ref) for e in x]
        assert torch.equal(got, x * torch.stack(masks) / density)
        assert torch.equal(ours.get_state(), ref.get_state())  # as many numbers drawn


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_dense_methods_equal_peft_bitwise_on_stacks(ties: bool, sign: str) -> None:
    """A (K, d_out, d_in) stack as the driver passes it: PEFT's results to the bit (long rows:
    the sampled threshold path), and the input is left alone."""
    gen = torch.Generator().manual_seed(6)
    stack = torch.randn(4, 160, 250, generator=gen)
    if ties:
        stack = tied_values(tuple(stack.shape), 3) * stack.sign()
    before = stack.clone()
    deltas = list(stack)
    w = [0.7, -0.4, 1.2, 0.5]
    tw = torch.tensor(w)
    got = dense("ties", stack, w, density=0.5, majority_sign=sign)
    assert torch.equal(got, merge_utils.ties(deltas, tw, 0.5, sign))
    assert torch.equal(got, dense("ties", deltas, w, density=0.5, majority_sign=sign))
    assert torch.equal(
        dense("magnitude", stack, w, density=0.5), merge_utils.magnitude_prune(deltas, tw, 0.5)
    )
    torch.manual_seed(21)
    peft_dt = merge_utils.dare_ties(deltas, tw, 0.4, sign)
    assert torch.equal(
        dense("dare_ties", stack, w, density=0.4, seed=21, majority_sign=sign), peft_dt
    )
    torch.manual_seed(22)
    peft_dl = merge_utils.dare_linear(deltas, tw, 0.4)
    assert torch.equal(dense("dare_linear", stack, w, density=0.4, seed=22), peft_dl)
    assert torch.equal(stack, before)


def test_stack_deltas_equals_delta() -> None:
    parts = [random_factors(r, s, seed) for r, s, seed in ((2, 0.5, 1), (3, 2.0, 2))]
    assert torch.equal(stack_deltas(parts), torch.stack([p.delta() for p in parts]))
    # on a buffer reused across shapes: same values, one buffer grown to the largest
    buffer = DeltaBuffer()
    small = [random_factors(2, 1.5, seed, d_out=4, d_in=3) for seed in (5, 6)]
    for group in (parts, small, parts):
        got = stack_deltas(group, buffer)
        assert torch.equal(got, torch.stack([p.delta() for p in group]))
    assert got.untyped_storage().data_ptr() == stack_deltas(small, buffer).data_ptr()
    with pytest.raises(ValueError, match="shape"):
        stack_deltas([parts[0], random_factors(2, 1.0, 3, d_out=5)])


def test_dare_density_one_is_linear() -> None:
    gen = torch.Generator().manual_seed(1)
    deltas = [torch.randn(4, 5, generator=gen) for _ in range(3)]
    w = [0.5, -1.0, 2.0]
    want = sum(wk * d for wk, d in zip(w, deltas, strict=True))
    torch.testing.assert_close(dense("dare_linear", deltas, w, density=1.0, seed=3), want)


def test_dare_is_unbiased_and_seeded() -> None:
    gen = torch.Generator().manual_seed(2)
    deltas = [torch.randn(3, 4, generator=gen) for _ in range(2)]
    w = [0.6, 0.4]
    linear = w[0] * deltas[0] + w[1] * deltas[1]
    draws = [dense("dare_linear", deltas, w, density=0.5, seed=s) for s in range(2000)]
    mean = torch.stack(draws).mean(dim=0)
    torch.testing.assert_close(mean, linear, atol=0.1, rtol=0.0)  # std of mean ~0.02 here
    # entries are dropped (zero) or rescaled by 1/density
    one = dense("dare_linear", [deltas[0]], [1.0], density=0.5, seed=7)
    assert torch.all((one == 0) | torch.isclose(one, 2 * deltas[0]))
    assert 0 < int((one == 0).sum()) < 12
    # seeded: same seed, same result; another seed, another mask
    torch.testing.assert_close(draws[5], dense("dare_linear", deltas, w, density=0.5, seed=5))
    assert not torch.equal(draws[5], draws[6])


def test_disjoint_mean_without_consensus_averages_nonzero_entries() -> None:
    a, b = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[4.0, 0.0, 3.0]])
    got = generalized_task_arithmetic([a, b], [1.0, 1.0], combine="disjoint_mean")
    torch.testing.assert_close(got, torch.tensor([[3.0, 0.0, 1.0]]))


# ---------------------------------------------------------------------- factor space
def test_lowrank_average_known_answer_has_cross_terms() -> None:
    one = torch.tensor([[1.0, 0.0]])
    two = torch.tensor([[0.0, 1.0]])
    e1 = LoraFactors(A=one, B=one.T.clone(), scaling=1.0)  # delta diag(1, 0)
    e2 = LoraFactors(A=two, B=two.T.clone(), scaling=4.0)  # delta diag(0, 4)
    # average: A = 0.5 * [1, 0] + 0.5 * sqrt(4) * [0, 1] = [0.5, 1];  B = A^T
    got = lowrank_average([e1, e2], [0.5, 0.5])
    torch.testing.assert_close(got.delta(), torch.tensor([[0.25, 0.5], [0.5, 1.0]]))
    linear = 0.5 * e1.delta() + 0.5 * e2.delta()  # diag(0.5, 2): no cross-terms
    assert not torch.allclose(got.delta(), linear)
    # sqrt weighting (PEFT's "linear"): A = sqrt(0.5) [1, 2] -> diagonal equals the linear merge
    sq = lowrank_average([e1, e2], [0.5, 0.5], weighting="sqrt")
    torch.testing.assert_close(sq.delta(), torch.tensor([[0.5, 1.0], [1.0, 2.0]]))
    # a negative weight subtracts
    neg = lowrank_average([e1], [-1.0])
    torch.testing.assert_close(neg.delta(), -e1.delta())


def test_lowrank_average_needs_equal_ranks() -> None:
    with pytest.raises(LorafuseError, match=r"equal rank, got ranks \[2, 3\]"):
        lowrank_average([random_factors(2, 1.0, 0), random_factors(3, 1.0, 1)], [0.5, 0.5])


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


def test_gram_is_the_default_and_matches_full_through_the_driver(
    adapters: list[LoraAdapter],
) -> None:
    assert DenseParams().svd == "gram"
    gram = merge(adapters, "ties", density=0.5, rank=3, progress=False)
    full = merge(adapters, "ties", density=0.5, rank=3, svd="full", progress=False)
    rand = merge(adapters, "ties", density=0.5, rank=3, svd="randomized", progress=False)
    for module, f in gram.items():
        torch.testing.assert_close(f.delta(), full[module].delta(), atol=1e-5, rtol=0)
        assert rand[module].rank == 3


# ------------------------------------------------------------------------------ registry
def test_registry_table() -> None:
    assert {n: m.space for n, m in MERGE_METHODS.items()} == {
        "linear": "factors",
        "task_arithmetic": "factors",
        "lowrank_average": "factors",
        "ties": "dense",
        "dare_linear": "dense",
        "dare_ties": "dense",
        "magnitude": "dense",
        "della": "dense",
        "della_linear": "dense",
        "breadcrumbs": "dense",
        "breadcrumbs_ties": "dense",
        "pcb": "dense",
        "tsv_m": "svd",
        "tsv_c": "svd",
        "iso_c": "svd",
        "iso_cts": "svd",
        "knots": "svd",
        "core_space": "factors",
        "wudi": "factors",
    }
    for name, method in MERGE_METHODS.items():
        assert method.name == name and method.url.startswith("https://") and method.summary


def test_register_duplicate_raises() -> None:
    dup = MergeMethod("linear", "factors", lambda p, w: p[0], "dup", "https://x", MergeParams)
    with pytest.raises(ValueError, match="already registered"):
        register(dup)


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("nope", {}, r"unknown merge method 'nope' \(known: breadcrumbs, breadcrumbs_ties, "),
        ("ties", {"density": 0.5, "x": 1}, r"unknown parameter 'x' for method 'ties' \(known: "),
        ("ties", {"density": 0}, r"invalid parameter 'density' for method 'ties': .*greater"),
        ("ties", {"density": 1.5}, r"invalid parameter 'density' for method 'ties': .*less"),
        ("ties", {}, r"missing parameter 'density' for method 'ties'"),
        ("linear", {"rank": 0}, r"invalid parameter 'rank' for method 'linear'"),
        ("linear", {"rank": True}, r"invalid parameter 'rank' for method 'linear': .*boolean"),
        ("dare_ties", {"density": 0.5, "scale": float("nan")}, r"invalid parameter 'scale'"),
        ("ties", {"density": 0.5, "majority_sign": "x"}, r"invalid parameter 'majority_sign'"),
    ],
)
def test_bad_method_or_params(method: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(LorafuseError, match=message) as info:
        merge([], method, **params)
    assert "\n" not in str(info.value)


def test_unknown_parameter_lists_known() -> None:
    with pytest.raises(LorafuseError) as info:
        get_method("task_arithmetic").parse_params({"density": 0.5})
    assert str(info.value) == (
        "unknown parameter 'density' for method 'task_arithmetic' "
        "(known: energy, max_rank, rank, scale)"
    )


# ------------------------------------------------------------------- adapters and driver
def make_adapter(base: torch.nn.Module, path: Path, seed: int, r: int, alpha: float) -> Path:
    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, r=r, lora_alpha=alpha, target_modules=TARGETS)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(path)
    return path


SPECS = [(1, 4, 8.0), (2, 4, 4.0), (3, 2, 7.0)]  # (seed, rank, alpha): two of equal rank


@pytest.fixture
def adapter_paths(tiny_llama: torch.nn.Module, tmp_path: Path) -> list[Path]:
    return [make_adapter(tiny_llama, tmp_path / f"e{s}", s, r, a) for s, r, a in SPECS]


@pytest.fixture
def adapters(adapter_paths: list[Path]) -> list[LoraAdapter]:
    return [LoraAdapter.open(p) for p in adapter_paths]


def test_linear_and_task_arithmetic_are_weighted_sums(adapters: list[LoraAdapter]) -> None:
    w = [0.5, -0.25, 1.5]
    lin = merge(adapters, "linear", w, progress=False)
    ta = merge(adapters, "task_arithmetic", scale=0.3, progress=False)  # weights default 1
    mean = merge(adapters, "linear", progress=False)  # weights default 1/K
    for module in adapters[0].module_names:
        deltas = [a.delta(module) for a in adapters]
        assert lin[module].rank == 10  # exact: sum of ranks
        want = sum(wk * d for wk, d in zip(w, deltas, strict=True))
        torch.testing.assert_close(lin[module].delta(), want)
        torch.testing.assert_close(ta[module].delta(), 0.3 * sum(deltas))
        torch.testing.assert_close(mean[module].delta(), sum(deltas) / 3)
    # with a rank: the best rank-3 approximation of the same sum
    low = merge(adapters, "linear", w, rank=3, progress=False)
    module = adapters[0].module_names[0]
    want = compress_dense(lin[module].delta(), 3).delta()
    assert low[module].rank == 3
    torch.testing.assert_close(low[module].delta(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_method_runs_through_the_driver(adapters: list[LoraAdapter], method: str) -> None:
    """Output covers every module with the documented rank, deterministically."""
    chosen = adapters[:2] if method == "lowrank_average" else adapters
    params = {"density": 0.5} if "density" in MERGE_METHODS[method].params.model_fields else {}
    a = merge(chosen, method, progress=False, **params)
    b = merge(chosen, method, progress=False, **params)
    assert list(a) == chosen[0].module_names
    for module, f in a.items():
        assert torch.equal(f.A, b[module].A) and torch.equal(f.B, b[module].B)
        expected = {"linear": 10, "task_arithmetic": 10, "lowrank_average": 4}.get(method, 10)
        assert f.rank == expected and f.scaling == 1.0
        assert (f.d_out, f.d_in) == chosen[0].module_shape(module)
    with pytest.raises(LorafuseError, match="got 1 weights for"):
        merge(chosen, method, [1.0], progress=False, **params)


def test_dare_driver_seeds_per_module(adapters: list[LoraAdapter]) -> None:
    a = merge(adapters, "dare_linear", density=0.5, seed=1, rank=32, progress=False)
    b = merge(adapters, "dare_linear", density=0.5, seed=2, rank=32, progress=False)
    q0, q1 = (n for n in adapters[0].module_names if n.endswith("q_proj"))
    assert not torch.allclose(a[q0].delta(), b[q0].delta())  # another seed, other masks
    # rank 32 is full rank for q_proj (32 x 32): entries all experts dropped stay ~0, and the
    # two layers' masks differ (seeded from the module name, not shared)
    zeros0, zeros1 = (a[q].delta().abs() < 1e-5 for q in (q0, q1))
    assert zeros0.any() and not torch.equal(zeros0, zeros1)


# ------------------------------------------------------------------- equivalence with PEFT
def peft_with_adapters(base: torch.nn.Module, paths: list[Path]) -> PeftModel:
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name="e0")
    for i, p in enumerate(paths[1:], start=1):
        model.load_adapter(str(p), adapter_name=f"e{i}")
    return model


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize(
    ("combination", "method", "params", "svd_rank"),
    [
        ("svd", "linear", {}, 16),  # 16 >= sum of ranks: exact
        ("svd", "linear", {}, 4),  # truncated: factor-space SVD vs PEFT's dense SVD
        ("ties_svd", "ties", {"density": 0.5}, 16),
        ("dare_linear_svd", "dare_linear", {"density": 1.0}, 16),
        ("dare_ties_svd", "dare_ties", {"density": 1.0}, 16),
        ("magnitude_prune_svd", "magnitude", {"density": 0.25}, 16),
        ("linear", "lowrank_average", {"weighting": "sqrt"}, None),
    ],
)
def test_equals_peft_add_weighted_adapter(
    tiny_llama: torch.nn.Module,
    adapter_paths: list[Path],
    adapters: list[LoraAdapter],
    combination: str,
    method: str,
    params: dict[str, Any],
    svd_rank: int | None,
) -> None:
    """Our merged delta == PEFT's new adapter's delta, module by module.

    svd_rank 16 is full rank for v_proj (16 x 32) and truncates q_proj (32 x 32) for the
    elementwise methods, so truncation is compared too. PEFT's non-SVD "linear" needs equal
    ranks: the first two adapters.
    """
    k = 2 if combination == "linear" else 3
    weights = [0.7, -0.4, 1.2][:k]
    model = peft_with_adapters(tiny_llama, adapter_paths[:k])
    model.add_weighted_adapter(
        [f"e{i}" for i in range(k)],
        weights,
        "m",
        combination_type=combination,
        svd_rank=svd_rank,
        density=params.get("density"),
    )
    ours = merge(adapters[:k], method, weights, rank=svd_rank, progress=False, **params)
    for module in adapters[0].module_names:
        layer = model.get_submodule(f"base_model.model.{module}")
        want = layer.get_delta_weight("m")
        torch.testing.assert_close(ours[module].delta(), want, atol=1e-5, rtol=1e-5)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def test_merged_adapter_loads_in_peft(
    tiny_llama: torch.nn.Module, adapters: list[LoraAdapter], tmp_path: Path
) -> None:
    merged = merge(adapters, "ties", [1.0, 0.5, 2.0], density=0.4, rank=6, progress=False)
    out = save_adapter(tmp_path / "merged", merged, base_model=adapters[0].base_model)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(out)).eval()
    by_hand = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for module, f in merged.items():
            by_hand.get_submodule(module).weight += f.delta()
    got = logits(peft_model)
    torch.testing.assert_close(got, logits(by_hand), atol=1e-5, rtol=1e-5)
    assert (got - logits(tiny_llama)).abs().max() > 1e-3
