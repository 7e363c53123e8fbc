"""``compare --ray``: each row a Ray task, equal to the serial compare bit for bit; a rerun
reuses the finished rows; partial results of another configuration are refused.

A local 2-CPU Ray instance (started once for the module, ~5 s); skipped without Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_workspace import tiny_workspace

from lorafuse.compare import run_compare
from lorafuse.errors import LorafuseError

ONLY = ("references", "ties", "learned_global", "arrow")  # a shared pass, 2 merges, a router


def scores(methods: dict) -> dict:
    """Each row's scores (mean and per task), without the measured costs."""
    keep = ("mean_loss", "mean_accuracy", "n")
    return {
        row: ({k: s[k] for k in keep if k in s}, s["tasks"], s["family"])
        for row, s in methods.items()
    }


def test_compare_ray_equals_serial_and_rerun_reuses_finished_rows(
    ray_local, tiny_base, tiny_experts, tmp_path: Path
) -> None:
    from lorafuse.compare_ray import PARTIAL_DIR, run_compare_ray

    ws = tiny_workspace(tiny_base, tiny_experts, tmp_path)
    serial = run_compare(ws, tmp_path / "serial", distil=False)
    shards = {p: p.stat().st_mtime_ns for p in ws.cache.directory.glob("*.safetensors")}
    assert shards  # the serial run's states, on disk
    out = tmp_path / "ray"
    got = run_compare_ray(ws, out, distil=False, only=ONLY)
    # the workers read those states from the shared cache: nothing recomputed or rewritten
    assert {p: p.stat().st_mtime_ns for p in ws.cache.directory.glob("*.safetensors")} == shards
    rows = ["base", "oracle", "ties", "learned_global", "arrow"]
    assert list(got["methods"]) == rows and got["reused"] == []
    want = {row: serial["methods"][row] for row in rows}
    assert scores(got["methods"]) == scores(want)  # same seed, same states: bit for bit
    written = json.loads((out / "results.json").read_text())
    assert scores(written["methods"]) == scores(want)
    assert (out / "merged" / "ties" / "adapter_model.safetensors").is_file()

    # a rerun reads the finished rows back and runs only the missing one
    partial = out / PARTIAL_DIR
    assert sorted(p.stem for p in partial.glob("*.json")) == sorted([*ONLY, "fingerprint"])
    kept = {n: (partial / f"{n}.json").stat().st_mtime_ns for n in ONLY if n != "arrow"}
    (partial / "arrow.json").unlink()
    again = run_compare_ray(ws, out, distil=False, only=ONLY)
    assert sorted(again["reused"]) == sorted(kept)
    assert {n: (partial / f"{n}.json").stat().st_mtime_ns for n in kept} == kept
    assert scores(again["methods"]) == scores(want)
    assert again["paired_tests"] == got["paired_tests"]

    # partial results of another configuration (here: another seed) are refused
    with pytest.raises(LorafuseError, match=r"belongs to a different run \(config differs\)"):
        run_compare_ray(ws, out, seed=1, distil=False, only=ONLY)


def test_only_without_ray_is_one_line(monkeypatch, capsys) -> None:
    from tiny_cli import run_main

    code, _, err = run_main(["compare", "--only", "ties"], monkeypatch, capsys)
    assert code == 2 and err.strip() == (
        "error: --only needs --ray (the serial compare runs every method)"
    )
