"""The ``lorafuse`` command line: one-line errors with exit code 2, before any model loads.

The error cases call ``lorafuse.cli.main`` in-process (a subprocess spends ~8 s importing
torch and transformers); ``main`` is the console-script entry point, so exit codes and
stderr are the ones a user sees. ``--help`` also runs as a real ``python -m lorafuse``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import lorafuse.eval.run as run_mod
from lorafuse.cli import main
from lorafuse.errors import LorafuseError


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every case must fail before a model is loaded; loading one would be a test failure."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CLI tried to load a base model")

    monkeypatch.setattr(run_mod, "load_base_model", refuse)
    monkeypatch.setattr(run_mod, "embedded_model_dir", refuse, raising=False)
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path / "cache"))


def run_cli(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """Run ``lorafuse ARGS`` through ``main`` and return (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lorafuse", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def good_tasks(path: Path) -> Path:
    rows = [{"task": "t", "prompt": f"p{i}", "answer": "a"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_help_lists_commands() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lorafuse", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "eval", "demo"):
        assert command in proc.stdout


def test_missing_adapter_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no_such_adapter"
    code, out, err = run_cli(
        ["eval", "--adapter", str(missing), "--out", str(tmp_path / "x.json")],
        monkeypatch,
        capsys,
    )
    assert_one_line_error(code, out, err, str(missing), "not found")
    assert not (tmp_path / "x.json").exists()


def test_pickled_adapter_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "pickled"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.bin").write_bytes(b"not read: refused before loading")
    code, out, err = run_cli(
        ["eval", "--adapter", str(adapter), "--out", str(tmp_path / "x.json")],
        monkeypatch,
        capsys,
    )
    assert_one_line_error(code, out, err, "pickle", "--allow-pickle", str(adapter))


def test_bad_tasks_file_names_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"task": "t", "prompt": "p", "answer": "a"})
    bad.write_text(f"{good}\n{{oops\n{good}\n", encoding="utf-8")
    code, out, err = run_cli(
        ["eval", "--tasks", str(bad), "--out", str(tmp_path / "x.json")], monkeypatch, capsys
    )
    assert_one_line_error(code, out, err, str(bad), "line 2", "invalid JSON")


def test_nonexistent_base_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real ``load_base_model`` refuses a folder without config.json (no download)."""
    from lorafuse.models import load_base_model

    monkeypatch.setattr(run_mod, "load_base_model", load_base_model)
    tasks = good_tasks(tmp_path / "tasks.jsonl")
    missing = tmp_path / "nonexistent"
    code, out, err = run_cli(
        ["eval", "--base-model", str(missing), "--tasks", str(tasks), "--out", "x.json"],
        monkeypatch,
        capsys,
    )
    assert_one_line_error(code, out, err, str(missing), "config.json")


def test_debug_flag_raises_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["lorafuse", "--debug", "eval", "--adapter", "nope"])
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--out", str(tmp_path / "x.json")])
    with pytest.raises(LorafuseError, match="adapter directory not found"):
        main()


def test_usage_error_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["eval", "--no-such-option"], monkeypatch, capsys)
    assert code == 2
    assert "Traceback" not in out + err
    assert "--no-such-option" in err


def test_nan_adapter_refused_before_model_loads(
    tiny_llama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN weights are found by reading the factors up front, not after scoring."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "nan"
    cfg = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(tiny_llama, cfg).save_pretrained(adapter)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(k for k in tensors if "lora_B" in k)[-1]
    tensors[key][0, 0] = torch.nan
    save_file(tensors, weights)
    code, out, err = run_cli(
        [
            "eval",
            "--adapter",
            str(adapter),
            "--tasks",
            str(good_tasks(tmp_path / "t.jsonl")),
            "--out",
            str(tmp_path / "x.json"),
        ],
        monkeypatch,
        capsys,
    )
    assert_one_line_error(code, out, err, "NaN", str(adapter))
