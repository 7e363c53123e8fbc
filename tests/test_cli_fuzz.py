"""Bad inputs to every command: one line on stderr naming the culprit, exit code 2, no
traceback, and nothing written (the working folder is unchanged, the output absent).

The commands run in this process (``lorafuse.cli.main``, the console-script entry point)
on a tiny model folder and a library trained from it once for the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_cli import call, error_lines, make_tiny_model, task_file

B = ["--base-model", "model"]
T = ["--tasks", "tasks.jsonl"]
L = ["--library", "lib"]
EVAL = ["eval", *B, *L, *T, "--out", "o.json"]
ARROW = [*EVAL, "--method", "arrow"]
TRAIN = ["train", *B, *T, "--out", "newlib", "--steps", "2", "--multitask-steps", "2"]

FILES = {
    "dev.jsonl": [
        {"task": "t", "prompt": f"p{i}", "answer": "a", "split": "dev"} for i in range(6)
    ],
    "mixed.jsonl": [
        {"task": "t", "prompt": "p0", "answer": "a", "split": "train"},
        {"task": "t", "prompt": "p1", "answer": "a"},
    ],
    "noanswer.jsonl": [{"task": "t", "prompt": "p"}],
    "bad.yaml": "method: [\n",
    "unk.yaml": "method: nosuch\nexperts: [{path: lib/experts/up}]\n",
    "dens.yaml": "method: ties\nparameters: {density: abc}\nexperts: [{path: lib/experts/up}]\n",
    "unkp.yaml": "method: ties\nparameters: {bogus: 1}\nexperts: [{path: lib/experts/up}]\n",
    "noexp.yaml": "method: linear\nexperts: []\n",
    "missexp.yaml": "method: linear\nexperts: [{path: nowhere}]\n",
    "fullbad.yaml": "base_model: nowhere\nmethod: linear\nexperts: [{path: lib/experts/up}]\n",
    "weight.yaml": "method: linear\nexperts: [{path: lib/experts/up, weight: abc}]\n",
    "badjson.jsonl": '{"task": "t", "prompt": "p", "answer": "a"}\n{oops\n',
    "empty.jsonl": "\n",
    "afile.txt": "not a folder\n",
    "brokenlib/library.json": "{oops",
}

# (command line, text the one error line must contain)
CASES = [
    # train
    (["train", *B, "--tasks", "dev.jsonl", "--out", "newlib"], "'dev'"),
    ([*TRAIN, "--steps", "0"], "steps"),
    ([*TRAIN, "--rank", "abc"], "--rank"),
    ([*TRAIN, "--lr", "-1"], "lr"),
    (["train", *B, *T, "--out", "afile.txt"], "afile.txt"),
    (["train", *B, "--tasks", "nowhere.jsonl", "--out", "newlib"], "nowhere.jsonl"),
    (["train", "--base-model", "nowhere", *T, "--out", "newlib"], "nowhere"),
    (["train", *B, "--tasks", "badjson.jsonl", "--out", "newlib"], "line 2"),
    (["train", *B, *T, "--out", "lib", "--steps", "3"], "library.json"),  # another run's
    # eval / route / ensemble
    ([*ARROW, "--param", "top_k=abc"], "top_k"),
    ([*ARROW, "--param", "temperature=hot"], "temperature"),
    ([*ARROW, "--param", "bogus=1"], "bogus"),
    ([*ARROW, "--param", "noequals"], "noequals"),
    ([*EVAL, "--method", "nosuch"], "nosuch"),
    ([*EVAL, "--method", "merge", "--param", "method=ties", "--param", "density=abc"], "density"),
    ([*EVAL, "--split", "dev"], "dev"),
    ([*EVAL, "--seed", "abc"], "--seed"),
    (["eval", *B, *L, "--tasks", "dev.jsonl", "--out", "o.json"], "'dev'"),
    (["eval", *B, *L, "--tasks", "mixed.jsonl", "--out", "o.json"], "split"),
    (["eval", *B, *L, "--tasks", "noanswer.jsonl", "--out", "o.json"], "noanswer.jsonl"),
    (["eval", *B, *L, "--tasks", "empty.jsonl", "--out", "o.json"], "empty.jsonl"),
    (["eval", *B, *T, "--adapter", "nowhere", "--out", "o.json"], "nowhere"),
    (["eval", *B, *T, "--library", "afile.txt", "--out", "o.json"], "afile.txt"),
    (["eval", *B, *T, "--library", "brokenlib", "--out", "o.json"], "brokenlib"),
    (["route", *B, *L, *T, "--method", "ensemble_prob", "--out", "o.json"], "ensemble_prob"),
    (["ensemble", *B, *L, *T, "--method", "arrow", "--out", "o.json"], "arrow"),
    # merge
    (["merge", "bad.yaml", "--out", "m"], "bad.yaml"),
    (["merge", "unk.yaml", "--out", "m"], "nosuch"),
    (["merge", "dens.yaml", "--out", "m"], "density"),
    (["merge", "unkp.yaml", "--out", "m"], "bogus"),
    (["merge", "noexp.yaml", "--out", "m"], "experts"),
    (["merge", "missexp.yaml", "--out", "m"], "nowhere"),
    (["merge", "weight.yaml", "--out", "m"], "weight"),
    (["merge", "fullbad.yaml", "--out", "m", "--full-model"], "nowhere"),
    (["merge", "nofile.yaml", "--out", "m"], "nofile.yaml"),
    # library
    (["library", "create", "lib", "lib/experts/up"], "lib"),
    (["library", "create", "x", "nowhere"], "nowhere"),
    (["library", "create", "x", "lib/experts/up", "--name", "a", "--name", "b"], "--name"),
    (["library", "add", "model", "lib/experts/up"], "library.json"),
    (["library", "add", "lib", "lib/experts/up"], "'up'"),
    (["library", "show", "nowhere"], "nowhere"),
    # compare
    (["compare", "--library", "nowhere", "--out", "c"], "nowhere"),
    (["compare", *B, *L, "--tasks", "dev.jsonl", "--out", "c"], "'dev'"),
    (["compare", "--base-model", "nowhere", *L, *T, "--out", "c"], "nowhere"),
    # elrea
    (["elrea", *B, *L, *T, "--n-clusters", "0"], "n_clusters"),
    (["elrea", *B, *L, *T, "--clustering", "nosuch"], "clustering"),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("fuzz")
    env = {"LORAFUSE_CACHE": str(tmp_path_factory.mktemp("fuzz_cache"))}
    make_tiny_model(root / "model")
    task_file(root / "tasks.jsonl")
    for name, content in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            content = "".join(json.dumps(row) + "\n" for row in content)
        path.write_text(content)
    train = ["train", *B, *T, "--out", "lib", "--steps", "2", "--multitask-steps", "2"]
    code, _, err = call([*train, "--top-layers", "1"], root, env)
    assert code == 0, err[-2000:]
    return root, env


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


def test_enough_cases() -> None:
    commands = {args[0] for args, _ in CASES}
    assert len(CASES) >= 30
    assert commands >= {"train", "eval", "merge", "library", "compare"}


@pytest.mark.parametrize(("args", "culprit"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line(work, args: list[str], culprit: str) -> None:
    root, env = work
    before = snapshot(root)
    code, out, err = call(args, root, env)
    assert code == 2, (code, out, err[-3000:])
    assert "Traceback" not in out + err
    lines = error_lines(err)  # progress bars aside (transformers draws one while loading)
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: ")
    assert culprit in lines[0], lines[0]
    assert snapshot(root) == before  # nothing written, nothing touched


def test_export_if_present(work) -> None:
    import typer

    from lorafuse.cli import app

    if "export" not in typer.main.get_command(app).commands:
        pytest.skip("no export command on this branch")
    root, env = work
    before = snapshot(root)
    code, out, err = call(["export", "nowhere", "--out", "x"], root, env)
    assert code == 2 and len(error_lines(err)) == 1, err
    assert snapshot(root) == before
