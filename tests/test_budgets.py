"""Budgets that keep compare at K = 48 inside its time: what is scored, and how."""

from __future__ import annotations

import numpy as np

from lorafuse.compare import ensemble_caps, on_subset
from lorafuse.eval.harness import ExampleScores, per_task
from lorafuse.tasks.example import Example


def test_ensembles_are_dense_up_to_16_experts_then_budgeted() -> None:
    assert ensemble_caps(8) == (None, 25)
    assert ensemble_caps(16) == (None, 25)
    assert ensemble_caps(48) == (5, 4)
    assert ensemble_caps(256) == (4, 4)


def test_a_subset_row_is_averaged_over_the_items_it_scored() -> None:
    examples = [Example(t, f"p{i}", "a") for i, t in enumerate("aabb")]
    sub = ExampleScores(np.array([1.0, 3.0]), np.array([1.0, 0.0]))
    full = on_subset(sub, [1, 2], 4)
    assert np.isnan(full.loss[0]) and np.isnan(full.loss[3])
    tasks = per_task(examples, full)
    assert (tasks["a"].loss, tasks["a"].accuracy, tasks["a"].n) == (1.0, 1.0, 1)
    assert (tasks["b"].loss, tasks["b"].accuracy, tasks["b"].n) == (3.0, 0.0, 1)
