"""Budgets that keep compare at K = 48 inside its time: what is scored, and how."""

from __future__ import annotations

import numpy as np

from lorafuse.compare import ensemble_caps
from lorafuse.eval.harness import ExampleScores, per_task
from lorafuse.fusion.run import on_subset
from lorafuse.tasks.example import Example


def test_ensembles_are_dense_up_to_16_experts_then_budgeted() -> None:
    assert ensemble_caps(8) == (None, 25)
    assert ensemble_caps(16) == (None, 25)
    assert ensemble_caps(48) == (5, 4)
    assert ensemble_caps(256) == (4, 4)
    assert ensemble_caps(8, 50) == (50, 25)  # the demo's budget, at any K
    assert ensemble_caps(48, 3) == (3, 4)


def test_a_subset_row_is_averaged_over_the_items_it_scored() -> None:
    examples = [Example(t, f"p{i}", "a") for i, t in enumerate("aabb")]
    sub = ExampleScores(np.array([1.0, 3.0]), np.array([1.0, 0.0]))
    full = on_subset(sub, [1, 2], 4)
    assert np.isnan(full.loss[0]) and np.isnan(full.loss[3])
    tasks = per_task(examples, full)
    assert (tasks["a"].loss, tasks["a"].accuracy, tasks["a"].n) == (1.0, 1.0, 1)
    assert (tasks["b"].loss, tasks["b"].accuracy, tasks["b"].n) == (3.0, 0.0, 1)


def test_a_capped_method_scores_exactly_its_items_of_the_full_run(
    tiny_base, tiny_experts, tmp_path
) -> None:
    from tiny_workspace import tiny_workspace

    from lorafuse.fusion.run import run_methods

    ws = tiny_workspace(tiny_base, tiny_experts, tmp_path)
    rows = {"u": ("ensemble_prob", {})}
    full, _ = run_methods(ws, rows, "test")
    seen: list[int] = []

    def cap(n_adapters: int) -> int:
        seen.append(n_adapters)
        return 1

    capped, info = run_methods(ws, rows, "test", items_cap=cap)
    assert seen == [len(tiny_experts)]
    idx = ws.per_task("test", 1)
    assert len(idx) == 3
    kept = ~np.isnan(capped["u"].loss)
    assert np.flatnonzero(kept).tolist() == idx
    np.testing.assert_allclose(capped["u"].loss[idx], full["u"].loss[idx], rtol=1e-5)
    assert info["u"]["extra"]["items_per_task"] == 1


def test_heavy_rows_on_a_budget_score_the_first_items_of_the_full_run(
    tiny_base, tiny_experts, tmp_path
) -> None:
    from tiny_workspace import tiny_workspace

    from lorafuse.compare import ensembles, fusions
    from lorafuse.compare_report import Table

    ws = tiny_workspace(tiny_base, tiny_experts, tmp_path)
    idx = ws.per_task("test", 1)
    full, capped = Table(), Table()
    ensembles(ws, full, 0)
    ensembles(ws, capped, 0, items=1)
    fusions(ws, full, ["arrow"], 0, budget=True)
    fusions(ws, capped, ["arrow"], 0, budget=True, items=1)
    assert set(capped.scores) == set(full.scores) == {
        "ensemble_prob", "ensemble_logit", "ensemble_learned", "arrow"
    }  # fmt: skip
    for row, scores in capped.scores.items():
        kept = ~np.isnan(scores.loss)
        assert np.flatnonzero(kept).tolist() == idx, row
        np.testing.assert_allclose(scores.loss[idx], full.scores[row].loss[idx], rtol=1e-5)
        assert not np.isnan(full.scores[row].loss).any()
    assert any("first 1 test items per task" in n for n in capped.notes)
