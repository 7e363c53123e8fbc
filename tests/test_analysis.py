"""Mode connectivity and expert selection on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafuse.analysis.connectivity import connectivity, interpolate_factors
from lorafuse.analysis.selection import (
    cluster_counts,
    cluster_selection,
    fuse,
    greedy_forward,
    mean_loss,
)
from lorafuse.core.encode import Encoded
from lorafuse.core.mixture import FactorSet
from lorafuse.core.states import StateCache
from lorafuse.errors import LorafuseError
from lorafuse.library import LoraFactors

SEQS = [(3, 17, 9, 88, 41, 5), (7, 7, 2, 99, 31, 11), (1, 2, 3, 4, 5, 6), (9, 8, 7, 6, 5, 4)]


@pytest.fixture
def setup(tiny_base):
    encoded = [Encoded(s, 3) for s in SEQS]
    cache = StateCache(tiny_base, 0, persist=False, progress=False)
    return tiny_base.model, encoded, cache


def same_rank_copy(expert, seed: int) -> FactorSet:
    """A second adapter with the first one's ranks and scalings, other weights."""
    gen = torch.Generator().manual_seed(seed)
    return FactorSet(
        "other",
        {
            m: LoraFactors(
                A=torch.randn(f.A.shape, generator=gen) * 0.3,
                B=torch.randn(f.B.shape, generator=gen) * 0.3,
                scaling=f.scaling,
            )
            for m in expert.module_names
            for f in [expert.factors(m)]
        },
    )


def test_connectivity_ends_are_the_experts(setup, tiny_experts) -> None:
    model, encoded, cache = setup
    a, b = tiny_experts[0], same_rank_copy(tiny_experts[0], 1)
    groups = {"first": [0, 1], "second": [2, 3], "both": [0, 1, 2, 3]}
    curves = connectivity(model, a, b, encoded, groups, cache, alphas=[0.0, 0.5, 1.0])
    ends = {
        name: mean_loss(model, [src], "average", encoded, cache)
        for name, src in (("a", a), ("b", b))
    }
    for path in ("delta", "factors"):
        assert curves[path]["both"][0] == pytest.approx(ends["a"], abs=1e-6)
        assert curves[path]["both"][-1] == pytest.approx(ends["b"], abs=1e-6)
    # in between, the two paths differ (cross-terms of the factor path)
    assert abs(curves["delta"]["both"][1] - curves["factors"]["both"][1]) > 1e-5


def test_factor_interpolation_needs_equal_ranks(tiny_experts) -> None:
    with pytest.raises(LorafuseError, match="equal ranks"):
        interpolate_factors(tiny_experts[0], tiny_experts[1], 0.5)


def test_greedy_selection_is_monotone_and_starts_with_the_best_single(setup, tiny_experts) -> None:
    model, encoded, cache = setup
    experts = [*tiny_experts, same_rank_copy(tiny_experts[0], 2)]
    sel = greedy_forward(model, experts, encoded, cache, how="average", progress=False)
    assert sel.losses == sorted(sel.losses, reverse=True)
    assert all(x > y for x, y in zip(sel.losses, sel.losses[1:], strict=False))
    singles = [mean_loss(model, [e], "average", encoded, cache) for e in experts]
    assert sel.kept[0] == int(np.argmin(singles))
    assert sel.losses[0] == pytest.approx(min(singles))
    capped = greedy_forward(model, experts, encoded, cache, how="arrow", k=1, progress=False)
    assert len(capped.kept) == 1


def test_cluster_selection_covers_every_count(setup, tiny_experts) -> None:
    model, encoded, cache = setup
    result = cluster_selection(model, tiny_experts, encoded, cache)
    assert sorted(result) == [1, 2, 3]
    assert result[3][0] == [[0], [1], [2]]
    assert result[3][1] == pytest.approx(mean_loss(model, tiny_experts, "average", encoded, cache))
    with pytest.raises(LorafuseError, match="unknown selection fusion"):
        fuse(tiny_experts, "vote")


def test_cluster_counts_budget_is_every_count_small_then_powers_of_two() -> None:
    assert cluster_counts(3) == [1, 2, 3]
    assert cluster_counts(16) == list(range(1, 17))
    assert cluster_counts(48) == [1, 2, 4, 8, 16, 32, 48]
    assert cluster_counts(64) == [1, 2, 4, 8, 16, 32, 64]


def test_cluster_selection_evaluates_only_the_counts_asked(setup, tiny_experts) -> None:
    model, encoded, cache = setup
    result = cluster_selection(model, tiny_experts, encoded, cache, counts=[1, 3])
    assert sorted(result) == [1, 3]
    assert result[1][0] == [[0, 1, 2]]
