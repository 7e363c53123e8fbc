"""Re-compression is never silent: what truncation loses is measured right and reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafuse.library import LoraAdapter
from lorafuse.merging import merge
from lorafuse.merging.config import load_merge_config
from lorafuse.merging.run import run_merge
from lorafuse.merging.truncation import Truncation, auto_rank, format_summary, summarize


def optimal(delta: torch.Tensor, k: int) -> tuple[float, float]:
    """Eckart-Young: the relative error and energy kept of the best rank-k approximation."""
    s = torch.linalg.svdvals(delta.double())
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum())
    return ((total - kept) / total) ** 0.5, kept / total


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.5}), ("linear", {})])
def test_reported_error_is_the_truncation_error(tiny_experts, method, params):
    exact = merge(tiny_experts, method, progress=False, **params, rank=64)  # no truncation
    lost: dict[str, Truncation] = {}
    merged = merge(tiny_experts, method, progress=False, truncation=lost, **params, rank=2)
    assert set(lost) == set(merged)
    for module, record in lost.items():
        full = exact[module].delta()
        err, energy = optimal(full, 2)
        assert record.rank == merged[module].rank == 2
        assert record.rel_error == pytest.approx(err, rel=1e-4, abs=1e-6)
        assert record.energy_kept == pytest.approx(energy, rel=1e-4, abs=1e-6)
        actual = torch.linalg.matrix_norm(full - merged[module].delta()) / torch.linalg.matrix_norm(
            full
        )
        assert float(actual) == pytest.approx(err, rel=1e-3, abs=1e-6)


def test_exact_merges_report_nothing(tiny_experts):
    lost: dict[str, Truncation] = {}
    merge(tiny_experts, "linear", progress=False, truncation=lost)
    assert lost == {}
    assert "no re-compression" in format_summary(lost)


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_rank_auto_is_the_smallest_rank_keeping_the_energy(tiny_experts, method):
    params = {"density": 0.5} if method == "ties" else {}
    exact = merge(tiny_experts, method, progress=False, **params, rank=64)
    lost: dict[str, Truncation] = {}
    merged = merge(
        tiny_experts, method, progress=False, truncation=lost, **params, rank="auto", energy=0.9
    )
    for module, record in lost.items():
        s = torch.linalg.svdvals(exact[module].delta().double())
        share = torch.cumsum(s**2, 0) / (s**2).sum()
        want = int(torch.nonzero(share >= 0.9)[0]) + 1
        assert merged[module].rank == record.rank == want
        assert record.energy_kept >= 0.9 - 1e-6
    capped: dict[str, Truncation] = {}
    merge(
        tiny_experts,
        method,
        progress=False,
        truncation=capped,
        **params,
        rank="auto",
        energy=0.999999,
        max_rank=1,
    )
    assert {t.rank for t in capped.values()} == {1}


def test_auto_rank_rule():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert auto_rank(s, 14.0, 0.6, 4) == 1  # 9/14 = 0.64
    assert auto_rank(s, 14.0, 0.9, 4) == 2  # 13/14 = 0.93
    assert auto_rank(s, 14.0, 1.0, 4) == 3
    assert auto_rank(s, 14.0, 1.0, 2) == 2


def test_summary_pools_modules():
    records = {
        "a": Truncation(rank=2, rel_error=0.6, energy_kept=0.64, norm=1.0),
        "b": Truncation(rank=2, rel_error=0.0, energy_kept=1.0, norm=3.0),
    }
    s = summarize(records)
    assert s["rel_error_mean"] == pytest.approx(0.3)
    assert s["rel_error_max"] == 0.6 and s["worst_module"] == "a"
    assert s["energy_kept_total"] == pytest.approx((0.64 + 9.0) / 10.0)


def test_merge_command_prints_and_records_the_loss(tiny_experts, tmp_path: Path):
    body = "method: ties\nparameters: {density: 0.5, rank: 2}\nexperts:\n"
    body += "".join(f"  - path: {a.path}\n" for a in tiny_experts)
    (tmp_path / "m.yaml").write_text(body)
    cfg, root = load_merge_config(tmp_path / "m.yaml")
    lines: list[str] = []
    out = run_merge(cfg, tmp_path / "out", root=root, progress=False, report=lines.append)
    assert len(lines) == 1 and "relative Frobenius error mean" in lines[0]
    card = (out / "README.md").read_text()
    assert "## Re-compression" in card and lines[0] in card
    assert LoraAdapter.open(out).module_rank(LoraAdapter.open(out).module_names[0]) == 2
