"""Merging at scale (held-in / held-out curves) on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch  # noqa: F401
from test_analysis import same_rank_copy

from lorafuse.analysis.scale import plot_scale, scale_study, split_experts, study_sizes
from lorafuse.analysis.selection import mean_loss
from lorafuse.core.encode import Encoded
from lorafuse.core.states import StateCache
from lorafuse.errors import LorafuseError


def test_sizes_and_split_are_nested_and_seeded() -> None:
    assert study_sizes(40) == [2, 4, 8, 16, 32, 40]
    assert study_sizes(8) == [2, 4, 8]
    out, pool = split_experts([f"e{i}" for i in range(10)], 3, seed=1)
    assert len(out) == 3 and len(pool) == 7 and not set(out) & set(pool)
    assert (out, pool) == split_experts([f"e{i}" for i in range(10)], 3, seed=1)
    with pytest.raises(LorafuseError, match="cannot hold out"):
        split_experts(["a", "b"], 1, seed=0)


def test_scale_study_uniform_curve_equals_the_mean_of_the_first_n(tiny_base, tiny_experts):
    rng = np.random.default_rng(0)
    names = [f"t{i}" for i in range(5)]
    experts = {n: same_rank_copy(tiny_experts[0], 20 + i) for i, n in enumerate(names)}
    test, tasks = [], []
    for t in names:  # 2 examples per task: per-task mean of means == mean over examples
        for _ in range(2):
            test.append(Encoded(tuple(int(x) for x in rng.integers(2, 120, 7)), 4))
            tasks.append(t)
    cache = StateCache(tiny_base, 0, persist=False, progress=False)
    result = scale_study(
        tiny_base.model,
        experts,
        {n: n for n in names},
        test,
        tasks,
        test,
        tasks,
        cache,
        held_out=1,
        sizes=(2,),
        methods=("uniform", "ties", "learned"),
        learn_steps=2,
        progress=False,
    )
    assert result["sizes"] == [2, 4]
    [held_out] = result["held_out_tasks"]
    assert held_out not in result["order"]
    for i, n in enumerate(result["sizes"]):
        chosen = result["order"][:n]
        idx = [j for j, t in enumerate(tasks) if t in chosen]
        want = mean_loss(
            tiny_base.model, [experts[e] for e in chosen], "average", [test[j] for j in idx], cache
        )
        assert result["held_in"]["uniform"][i] == pytest.approx(want, rel=1e-5)
    # TIES is a different merge: its curve is not the uniform one
    assert result["held_in"]["ties"] != pytest.approx(result["held_in"]["uniform"], rel=1e-3)
    assert all(np.isfinite(result["held_out"]["learned"]))


def test_plot_scale_writes_a_png(tmp_path) -> None:
    result = {
        "sizes": [2, 4],
        "methods": ["uniform"],
        "held_in": {"uniform": [1.0, 1.2]},
        "held_out": {"uniform": [2.0, 1.9]},
        "base": {"held_out": 2.5},
    }
    path = plot_scale(result, tmp_path / "scale.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
