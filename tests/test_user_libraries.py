"""Users' own adapters end to end on the tiny model: any expert name (even ``double``, which
is also a torch attribute), plain folders with unknown tasks, and ``eval --split all``."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lorafuse.eval.run as run_mod
from lorafuse.analysis.run import connectivity_command, mbc_command
from lorafuse.cli import main
from lorafuse.compare import Table, references
from lorafuse.core.encode import encode_examples
from lorafuse.core.states import StateCache
from lorafuse.errors import LorafuseError
from lorafuse.eval.harness import model_log_probs, score_examples
from lorafuse.fusion.run import fusion_command
from lorafuse.library.create import create_library
from lorafuse.methods import build_fusion
from lorafuse.tasks import load_tasks
from lorafuse.workspace import open_workspace

TASKS = ("qa", "sum")
NAMES = ["double", "float"]  # torch.nn.Module attributes: PEFT adapter names would clash


class CharTokenizer:
    """One token per character (ids 3..122); no chat template, end of turn = eos (1)."""

    pad_token_id, eos_token_id, unk_token_id = 0, 1, 2
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[3 + ord(c) % 120 for c in text])

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.unk_token_id


@pytest.fixture
def base(tiny_base):
    return dataclasses.replace(tiny_base, tokenizer=CharTokenizer())


def task_file(path: Path, *, per_split: int = 2, split: bool = True) -> Path:
    rows = [
        {"task": t, "prompt": f"{t} {s} {i}", "answer": f"{i}", **({"split": s} if split else {})}
        for t in TASKS
        for s in ("train", "val", "test")
        for i in range(per_split)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["lorafuse", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def merged_losses(base, adapter, encoded, cache) -> np.ndarray:
    """Reference without PEFT: the adapter's deltas added into a copy of the weights."""
    model = copy.deepcopy(base.model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in adapter.module_names:
            modules[name].weight += adapter.delta(name)
    return score_examples(model_log_probs(model, cache.split), encoded, cache).loss


def test_eval_library_with_torch_attribute_names(
    base, tiny_experts, tmp_path: Path, monkeypatch, capsys
) -> None:
    """``double`` and ``float`` experts score exactly as their weights merged into the base."""
    lib = tmp_path / "lib"
    create_library(lib, [a.path for a in tiny_experts[:2]], names=NAMES, tasks=list(TASKS))
    tasks = task_file(tmp_path / "tasks.jsonl")
    monkeypatch.setattr(run_mod, "load_base_model", lambda spec: base)
    out = tmp_path / "results.json"
    args = ["eval", "--library", str(lib), "--tasks", str(tasks), "-o", str(out)]
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    results = json.loads(out.read_text())
    assert set(results["methods"]) == {"base", *NAMES, "oracle"}
    examples = load_tasks(str(tasks)).get("test")
    encoded = encode_examples(base.tokenizer, examples)
    cache = StateCache(base, 0, persist=False, progress=False)
    own = {}
    for name, adapter in zip(NAMES, tiny_experts, strict=False):
        loss = merged_losses(base, adapter, encoded, cache)
        for task in TASKS:
            idx = [i for i, ex in enumerate(examples) if ex.task == task]
            got = results["methods"][name]["tasks"][task]["loss"]
            assert got == pytest.approx(loss[idx].mean(), rel=1e-5, abs=1e-6)
        own[TASKS[NAMES.index(name)]] = results["methods"][name]["tasks"]
    oracle = results["methods"]["oracle"]["tasks"]
    assert oracle["qa"]["loss"] == pytest.approx(own["qa"]["qa"]["loss"])
    assert oracle["sum"]["loss"] == pytest.approx(own["sum"]["sum"]["loss"])


def test_compare_references_and_oracle_with_torch_attribute_names(
    base, tiny_experts, tmp_path: Path, monkeypatch
) -> None:
    """The compare path (own-task subsets, oracle) and ``eval --method --oracle``."""
    import lorafuse.workspace as ws_mod

    monkeypatch.setattr(ws_mod, "load_base_model", lambda spec: base)
    lib = tmp_path / "lib"
    create_library(lib, [a.path for a in tiny_experts[:2]], names=NAMES, tasks=list(TASKS))
    tasks = str(task_file(tmp_path / "tasks.jsonl"))
    ws = open_workspace(library=lib, tasks=tasks, base=base)
    table = Table()
    references(ws, table)
    assert "oracle" in table.scores and not table.notes
    encoded, examples = ws.encoded("test"), ws.examples("test")
    expected = np.zeros(len(examples))
    for name, adapter in zip(NAMES, tiny_experts, strict=False):
        loss = merged_losses(base, adapter, encoded, ws.cache)
        mine = [i for i, ex in enumerate(examples) if ex.task == ws.tasks_of[name][0]]
        expected[mine] = loss[mine]
    np.testing.assert_allclose(table.scores["oracle"].loss, expected, rtol=1e-5, atol=1e-6)
    results = fusion_command(
        methods=["arrow"],
        params={},
        base_model="tiny",
        library=lib,
        tasks=tasks,
        split="test",
        seed=0,
        out=tmp_path / "r.json",
        with_oracle=True,
    )
    assert "oracle" in results["methods"] and results["notes"] == []


def test_plain_folder_runs_and_names_what_needs_tasks(
    base, tiny_experts, tmp_path: Path, monkeypatch
) -> None:
    """A folder of adapters (no library.json) works wherever --library does; what needs each
    expert's task says so in one line."""
    folder = tmp_path / "adapters"
    for a, name in zip(tiny_experts, ["double", "to", "train"], strict=True):
        shutil.copytree(a.path, folder / name)
    tasks = str(task_file(tmp_path / "tasks.jsonl"))
    ws = open_workspace(library=folder, tasks=tasks, base=base)
    assert list(ws.private) == ["double", "to", "train"] and ws.untasked == list(ws.private)
    table = Table()
    references(ws, table)
    assert "oracle" not in table.scores
    (note,) = table.notes
    assert "the oracle row needs each expert's task" in note and str(folder) in note
    for method in ("twin", "twin_group"):
        with pytest.raises(LorafuseError, match="twin .* needs each expert's task") as err:
            build_fusion(ws, method)
        assert "\n" not in str(err.value) and "--task" in str(err.value)
    with pytest.raises(LorafuseError, match="own task needs each expert's task"):
        ws.own_subsets("test")
    with pytest.raises(LorafuseError, match=r"MBC \(one expert per task group\) needs"):
        mbc_command(ws, tmp_path / "mbc")
    with pytest.raises(LorafuseError, match="connectivity .* names none for double, to"):
        connectivity_command(ws, "double", "to", tmp_path / "conn")
    monkeypatch.setattr(run_mod, "load_base_model", lambda spec: base)
    out = tmp_path / "r.json"
    results = run_mod.evaluate_command(
        base_model="tiny", adapter=None, library=folder, tasks=tasks, split="test", seed=0, out=out
    )
    assert set(results["methods"]) == {"base", "double", "to", "train"}
    assert "oracle row needs each expert's task" in results["notes"][0]


def test_eval_split_all_scores_every_line(
    base, tiny_experts, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A 2-line file cannot be split; --split all scores both lines, in file order."""
    tasks = tmp_path / "small.jsonl"
    rows = [
        {"task": "t", "prompt": "ab", "answer": "c"},
        {"task": "t", "prompt": "ab", "answer": "d"},
    ]
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.setattr(run_mod, "load_base_model", lambda spec: base)
    adapter = tiny_experts[0].path
    out = tmp_path / "r.json"
    common = ["eval", "--adapter", str(adapter), "--tasks", str(tasks), "-o", str(out)]
    code, _, err = run_cli(common, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert str(tasks) in err and "task 't'" in err and "--split all" in err
    code, _, err = run_cli([*common, "--split", "all"], monkeypatch, capsys)
    assert code == 0, err
    results = json.loads(out.read_text())
    assert results["config"]["split"] == "all"
    encoded = encode_examples(base.tokenizer, load_tasks(str(tasks), all_lines=True).get("all"))
    assert len(encoded) == 2
    cache = StateCache(base, 0, persist=False, progress=False)
    loss = merged_losses(base, tiny_experts[0], encoded, cache)
    got = results["methods"][tiny_experts[0].name]["tasks"]["t"]
    assert got["loss"] == pytest.approx(loss.mean(), rel=1e-5) and got["n"] == 2
    code, _, err = run_cli([*common, "--split", "all", "--method", "arrow"], monkeypatch, capsys)
    assert code == 2 and "--split all" in err
