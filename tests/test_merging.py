"""lorafuse.merging: merge-method math (known answers) and the registry; the SVD
re-compression and the driver have their own files (test_merge_svd.py, test_merge_driver.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from adapter_files import random_factors
from peft.utils import merge_utils

from lorafuse.errors import LorafuseError
from lorafuse.library import LoraFactors
from lorafuse.merging import (
    MERGE_METHODS,
    MergeMethod,
    dense_methods,
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
from lorafuse.merging.registry import MergeParams


def dense(method: str, deltas: list[torch.Tensor], weights: list[float], **kw: Any):
    """Run a registered dense method's function directly (its settings + ``kw``)."""
    return get_method(method).fn(deltas, weights, **kw)


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
