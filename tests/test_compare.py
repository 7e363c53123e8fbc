"""``compare`` on the tiny model: every file written, every table value equal to evaluating that
method alone (through the registry, or PEFT for the exported merges), and the paired tests
equal to scipy's on the rows' per-task losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats
from tiny_workspace import tiny_workspace

from lorafuse.compare import PAIRED, run_compare
from lorafuse.core.mixture import ConstantMixer
from lorafuse.eval.harness import ExampleScores, model_log_probs, score_examples
from lorafuse.eval.run import summaries_of
from lorafuse.fusion.base import Fusion, evaluate
from lorafuse.methods import METHODS, STATIC_MERGES, build_fusion


def alone(ws, row: str) -> ExampleScores:
    """The row's method built and scored on its own (not in compare's shared passes)."""
    encoded, cache, model = ws.encoded("test"), ws.cache, ws.base.model
    if row == "base":
        return score_examples(model_log_probs(model, cache.split), encoded, cache)
    if row == "oracle":
        loss, correct = np.zeros(len(encoded)), np.zeros(len(encoded), dtype=bool)
        own = ws.own_subsets("test")
        for name, expert in ws.private.items():
            fusion = Fusion(name, "merging", [expert], ConstantMixer(torch.ones(1)))
            scores = evaluate(model, fusion, [encoded[i] for i in own[name]], cache)
            loss[own[name]], correct[own[name]] = scores.loss, scores.correct
        return ExampleScores(loss, correct)
    if row in STATIC_MERGES:
        method, params = STATIC_MERGES[row]
        params = dict(params)
        fusion = build_fusion(ws, "merge", seed=params.pop("seed", 0), method=method, **params)
    else:
        fusion = build_fusion(ws, row)
    return evaluate(model, fusion, encoded, cache)


def test_compare_writes_everything_and_each_row_is_its_method_alone(
    tiny_base, tiny_experts, tmp_path
) -> None:
    ws = tiny_workspace(tiny_base, tiny_experts, tmp_path)
    out = tmp_path / "out"
    results = run_compare(ws, out, distil=False)
    for name in ("results.json", "report.md", "report.html", "methods.png", "tasks.png"):
        assert (out / name).stat().st_size > 100, name
    assert json.loads((out / "results.json").read_text())["methods"].keys() == (
        results["methods"].keys()
    )
    rows = results["methods"]
    # the tiny experts' ranks differ (2, 4, 3): the low-rank average is left out, with a note
    assert any(n.startswith("lowrank_average left out: ") for n in results["notes"])
    static = set(STATIC_MERGES) - {"lowrank_average"}
    want_rows = {"base", "oracle", *static, "learned_global", "learned_per_layer"}
    want_rows |= {"ensemble_prob", "ensemble_logit", "ensemble_learned"}
    want_rows |= {"arrow", "hc_arrow", "learned_router", "twin", "twin_group"}
    assert set(rows) == want_rows
    for row in rows:
        assert row in ("base", "oracle") or row in STATIC_MERGES or row in METHODS
        assert (out / "merged" / row).is_dir() == (
            row in STATIC_MERGES or row.startswith("learned_") and row != "learned_router"
        )
    examples = ws.examples("test")
    for row, got in rows.items():
        want = summaries_of(examples, {row: alone(ws, row)})[row]
        assert got["mean_loss"] == pytest.approx(want["mean_loss"], rel=1e-4), row
        for task, t in want["tasks"].items():
            assert got["tasks"][task]["loss"] == pytest.approx(t["loss"], rel=1e-4), (row, task)
            assert got["tasks"][task]["accuracy"] == t["accuracy"], (row, task)

    tests = results["paired_tests"]
    made = [(c, a, b) for c, a, b in PAIRED if a in rows and b in rows]
    assert [(t["claim"], t["a"], t["b"]) for t in tests] == made and made
    for t in tests:
        tasks = list(rows[t["a"]]["tasks"])
        a = [rows[t["a"]]["tasks"][k]["loss"] for k in tasks]
        b = [rows[t["b"]]["tasks"][k]["loss"] for k in tasks]
        assert t["n"] == len(tasks) == 3
        assert t["wilcoxon_p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
        assert t["ttest_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
        assert t["verdict"] == "not distinguishable at this size"  # 3 tasks: p >= 0.25
    report = (out / "report.md").read_text()
    assert "## Paired tests across tasks" in report
    assert all(t["claim"] in report for t in tests)
    assert "<h2>Paired tests across tasks</h2>" in (out / "report.html").read_text()


def test_seed_method_rows_are_their_methods_alone(tiny_base, tiny_experts, tmp_path) -> None:
    from lorafuse.compare import SEED_ROWS

    ws = tiny_workspace(tiny_base, tiny_experts, tmp_path)
    results = run_compare(
        ws, tmp_path / "out", distil=False, seed_methods=True, skip=frozenset({"twin_group"})
    )
    rows = results["methods"]
    # the tiny experts' ranks differ (2, 4, 3): LoRAHub's composition is left out, with a note
    assert any(n.startswith("lorahub left out: ") for n in results["notes"])
    assert set(SEED_ROWS) - set(rows) == {"lorahub"}
    examples = ws.examples("test")
    for row in set(SEED_ROWS) - {"lorahub"}:
        want = summaries_of(examples, {row: alone(ws, row)})[row]
        assert rows[row]["mean_loss"] == pytest.approx(want["mean_loss"], rel=1e-4), row
        assert rows[row]["family"] == METHODS[row].family, row
