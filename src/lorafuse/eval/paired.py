"""Paired tests across tasks: is method A's per-task loss different from method B's?

Each task is one pair (A's mean answer loss on it, B's), so the tasks are the sample and
the test asks whether the difference holds across tasks, not across items of one task.
Two tests from scipy on the differences ``d_t = loss_A(t) - loss_B(t)``:

* Wilcoxon signed-rank (two-sided; exact distribution for small samples without ties):
  no assumption on the shape of the differences, the verdict's test;
* paired t-test (``ttest_rel``): assumes roughly normal differences, reported alongside.

A row scored on an item budget (NaN elsewhere) is compared with the other row on the same
items (:func:`compare_pairs`): per-task means over different items would mix the
methods' difference with the items' difficulty.

Each comparison is its own claim (from its own paper), so the verdict is per comparison at
``alpha``; Holm's step-down adjustment of the Wilcoxon p-values over the comparisons made
(family-wise error) is reported alongside, for the claims that must hold together. With n
tasks and no ties the smallest two-sided Wilcoxon p is ``2 / 2**n`` (0.0078 for 8 tasks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from lorafuse.eval.harness import ExampleScores

ALPHA = 0.05
NOT_DISTINGUISHABLE = "not distinguishable at this size"


def _finite(p: float) -> float | None:
    return float(p) if math.isfinite(p) else None


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Wilcoxon signed-rank and paired t-test of ``a`` against ``b`` (paired by position).

    Returns ``n``, ``mean_diff`` (mean of a - b), ``wilcoxon_p`` and ``ttest_p`` (None where
    undefined: fewer than two pairs, or a t-test on differences with no spread); all
    differences zero gives p = 1 for both.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1-D of one length, got {x.shape}, {y.shape}")
    d = x - y
    out: dict = {"n": len(d), "mean_diff": float(d.mean()) if len(d) else None}
    if len(d) < 2:
        return {**out, "wilcoxon_p": None, "ttest_p": None}
    if not np.any(d):
        return {**out, "wilcoxon_p": 1.0, "ttest_p": 1.0}
    out["wilcoxon_p"] = _finite(stats.wilcoxon(x, y).pvalue)
    out["ttest_p"] = _finite(stats.ttest_rel(x, y).pvalue)
    return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and is not counted)."""
    known = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    m = len(known)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(known)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def common_item_means(
    a: ExampleScores, b: ExampleScores, item_tasks: Sequence[str]
) -> tuple[list[float], list[float], int]:
    """Per-task mean losses of two rows over the items both scored (NaN = not scored: a row
    on an item budget), for the tasks where they share any; and how many items that is."""
    both = ~np.isnan(a.loss) & ~np.isnan(b.loss)
    task_of = np.asarray(item_tasks)
    la, lb = [], []
    for task in dict.fromkeys(item_tasks):
        mask = both & (task_of == task)
        if mask.any():
            la.append(float(a.loss[mask].mean()))
            lb.append(float(b.loss[mask].mean()))
    return la, lb, int(both.sum())


def compare_pairs(
    scores: Mapping[str, ExampleScores],
    item_tasks: Sequence[str],
    pairs: Sequence[tuple[str, str, str]],
    *,
    alpha: float = ALPHA,
) -> list[dict]:
    """Paired tests of each ``(claim, a, b)`` whose rows both exist, from per-item scores
    (``item_tasks``: each item's task): per-task mean losses over the items both rows scored
    (a row on an item budget against the other row on those same items).

    Each result names the claim and rows, holds :func:`paired_test`'s numbers, ``items``
    (how many items were paired), ``holm_p`` (over the comparisons made) and ``verdict``:
    ``"<row> lower"`` (the row with the lower mean loss, where the Wilcoxon p < ``alpha``)
    or :data:`NOT_DISTINGUISHABLE`.
    """
    made = []
    for claim, a, b in pairs:
        if a in scores and b in scores:
            la, lb, n = common_item_means(scores[a], scores[b], item_tasks)
            made.append({"claim": claim, "a": a, "b": b, "items": n, **paired_test(la, lb)})
    for entry, adjusted in zip(made, holm([e["wilcoxon_p"] for e in made]), strict=True):
        entry["holm_p"] = adjusted
        p = entry["wilcoxon_p"]
        if p is not None and p < alpha and entry["mean_diff"]:
            entry["verdict"] = f"{entry['a'] if entry['mean_diff'] < 0 else entry['b']} lower"
        else:
            entry["verdict"] = NOT_DISTINGUISHABLE
    return made


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def paired_table(tests: Sequence[dict]) -> str:
    """The tests as a Markdown table (loss differences are a - b; lower is better)."""
    items = any("items" in t for t in tests)
    head = ["comparison", "a", "b", "tasks", *(["items"] if items else [])]
    head += ["mean loss a - b", "Wilcoxon p", "t-test p", "Holm p", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tests:
        diff = "-" if t["mean_diff"] is None else f"{t['mean_diff']:+.4f}"
        cells = [t["claim"], t["a"], t["b"], str(t["n"])]
        cells += [str(t.get("items", "-"))] if items else []
        cells += [diff]
        cells += [_p(t["wilcoxon_p"]), _p(t["ttest_p"]), _p(t["holm_p"]), t["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "ALPHA",
    "NOT_DISTINGUISHABLE",
    "common_item_means",
    "compare_pairs",
    "holm",
    "paired_table",
    "paired_test",
]
