"""eval.paired: Wilcoxon signed-rank and paired t-test across tasks, against hand computations
(exact sign-flip enumeration, the t statistic from its formula), and Holm's adjustment."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from lorafuse.eval.harness import ExampleScores
from lorafuse.eval.paired import (
    NOT_DISTINGUISHABLE,
    common_item_means,
    compare_pairs,
    holm,
    paired_table,
    paired_test,
)


def exact_wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided exact p of the signed-rank statistic by enumerating all 2^n sign flips
    (no zeros, no ties): P(|W+ - n(n+1)/4| >= observed)."""
    ranks = stats.rankdata(np.abs(d))
    centre = len(d) * (len(d) + 1) / 4
    observed = abs(ranks[d > 0].sum() - centre)
    flips = list(itertools.product([0, 1], repeat=len(d)))
    extreme = sum(
        abs(sum(r for r, s in zip(ranks, f, strict=True) if s) - centre) >= observed - 1e-12
        for f in flips
    )
    return extreme / len(flips)


def hand_t_p(d: np.ndarray) -> float:
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return 2 * stats.t.sf(abs(t), df=len(d) - 1)


@pytest.mark.parametrize(
    "a, b",
    [
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.5, 1.2, 2.9, 3.1, 4.0, 6.7]),
        ([0.9, 1.1, 0.7, 1.5, 2.2, 0.4, 1.3], [1.0, 1.5, 1.35, 1.05, 2.5, 1.2, 1.05]),
        ([2.0, 2.1, 2.3, 2.6, 3.0], [1.0, 1.2, 1.0, 1.1, 1.3]),  # all a > b: p = 2/32
    ],
)
def test_paired_test_matches_hand_computation(a, b) -> None:
    got = paired_test(a, b)
    d = np.array(a) - np.array(b)
    assert got["n"] == len(a)
    assert got["mean_diff"] == pytest.approx(d.mean())
    assert got["wilcoxon_p"] == pytest.approx(exact_wilcoxon_p(d), rel=1e-9)
    assert got["ttest_p"] == pytest.approx(hand_t_p(d), rel=1e-9)


def test_all_one_sign_gives_the_smallest_exact_p() -> None:
    got = paired_test([2.0, 2.1, 2.3, 2.6, 3.0], [1.0, 1.2, 1.0, 1.1, 1.3])
    assert got["wilcoxon_p"] == pytest.approx(2 / 2**5)


def test_degenerate_samples() -> None:
    assert paired_test([1.0], [2.0])["wilcoxon_p"] is None
    same = paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["wilcoxon_p"] == 1.0 and same["ttest_p"] == 1.0 and same["mean_diff"] == 0
    with pytest.raises(ValueError, match="one length"):
        paired_test([1.0, 2.0], [1.0])


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(.03, 2*.03), max(.06, 1*.04)
    assert holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_compare_pairs_verdicts_and_report_rows() -> None:
    tasks = [f"t{i}" for i in range(8)]
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 2, len(tasks))
    losses = {  # one item per task
        "good": base - 0.5 - 0.01 * np.arange(len(tasks)),
        "bad": base,
        "noise": base + np.array([0.1, -0.1] * 4),
    }
    scores = {row: ExampleScores(v, np.zeros(len(tasks), dtype=bool)) for row, v in losses.items()}
    pairs = [("x", "good", "bad"), ("y", "noise", "bad"), ("z", "good", "absent")]
    tests = compare_pairs(scores, tasks, pairs)
    assert [t["claim"] for t in tests] == ["x", "y"]  # rows not run are left out
    x, y = tests
    assert x["wilcoxon_p"] == pytest.approx(2 / 2**8)
    assert x["holm_p"] == pytest.approx(min(1, 2 * x["wilcoxon_p"]))
    assert x["verdict"] == "good lower"
    assert y["verdict"] == NOT_DISTINGUISHABLE and y["holm_p"] > 0.05
    table = paired_table(tests)
    assert table.count("\n") == 3 and "good lower" in table and NOT_DISTINGUISHABLE in table


def test_a_budgeted_row_is_paired_on_its_own_items() -> None:
    """A row scored on the first 2 items of each task is compared with the other row's
    mean over those same items, not over all of them."""
    tasks = [t for t in ("u", "v", "w", "x", "y", "z") for _ in range(4)]
    full = np.array([1.0, 1.0, 9.0, 9.0] * 6)  # its first two items of each task are easy
    budget = np.full(len(tasks), np.nan)
    budget[[i for i in range(len(tasks)) if i % 4 < 2]] = 2.0
    rows = {
        "full": ExampleScores(full, np.zeros(len(tasks), dtype=bool)),
        "budget": ExampleScores(budget, np.zeros(len(tasks), dtype=bool)),
    }
    la, lb, n = common_item_means(rows["budget"], rows["full"], tasks)
    assert la == [2.0] * 6 and lb == [1.0] * 6 and n == 12
    (test,) = compare_pairs(rows, tasks, [("c", "budget", "full")])
    # on the same items the budgeted row is worse (+1 per task); over all of the other
    # row's items (mean 5) it would have looked better
    assert test["mean_diff"] == pytest.approx(1.0) and test["items"] == 12
    assert test["n"] == 6 and test["verdict"] == "full lower"
    assert "| items |" in paired_table([test])


def test_a_budgeted_row_is_normalised_on_its_own_items() -> None:
    """norm = accuracy / the reference's accuracy on the same items (the reference gets the
    first two items of the task right and the last two wrong)."""
    from lorafuse.eval.run import summaries_of
    from lorafuse.tasks import Example

    examples = [Example("t", f"p{i}", "a") for i in range(4)]
    reference = ExampleScores(np.zeros(4), np.array([True, True, False, False]))
    budget = ExampleScores(np.array([0.0, 0.0, np.nan, np.nan]), np.array([True, False, 0, 0]))
    full = ExampleScores(np.zeros(4), np.array([True, False, False, False]))
    out = summaries_of(examples, {"budget": budget, "full": full}, reference=reference)
    assert out["budget"]["tasks"]["t"]["normalized"] == pytest.approx(0.5 / 1.0)
    assert out["full"]["tasks"]["t"]["normalized"] == pytest.approx(0.25 / 0.5)
