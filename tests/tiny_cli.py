"""Run the real ``lorafuse`` CLI on a tiny model: in-process, or as killable subprocesses.

- :func:`make_tiny_model` writes a 2-layer Llama and a one-token-per-character tokenizer to a
  folder that ``--base-model`` loads like any local Hugging Face model.
- :func:`task_file` writes a JSONL task file with train/val/test splits.
- :func:`run_main` runs ``lorafuse ARGS`` in this process (exit code, stdout, stderr).
- :class:`Zygote` is a subprocess that imports torch, transformers and lorafuse once, then
  forks one child per command, so each command is a real process (``kill -9`` kills it)
  without paying the ~8 s import again. A child can kill itself with SIGKILL at the n-th
  call of a function (``os.replace`` = the n-th atomic publish, an optimiser step, ...), so
  kill points are deterministic; the parent can also kill it after a delay.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARS = ["\n", *[chr(c) for c in range(32, 127)]]
TINY_CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
)


def make_tiny_model(folder: Path) -> Path:
    """A seeded tiny Llama with a character tokenizer, saved as a local HF model folder."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).float().eval()
    model.config.name_or_path = "tiny-llama"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def task_file(path: Path, tasks=("up", "rev"), per_split=(12, 4, 4)) -> Path:
    """Tasks ``up`` (upper-case a word) and ``rev`` (reverse it), split train/val/test."""
    words = [f"w{i:02d}{'abcde'[i % 5]}" for i in range(sum(per_split))]
    rows = []
    for task in tasks:
        start = 0
        for split, n in zip(("train", "val", "test"), per_split, strict=True):
            for w in words[start : start + n]:
                answer = w.upper() if task == "up" else w[::-1]
                rows.append(
                    {"task": task, "prompt": f"{task} {w}", "answer": answer, "split": split}
                )
            start += n
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """``lorafuse ARGS`` through the console-script entry point, in this process."""
    from lorafuse.cli import main

    monkeypatch.setattr(sys, "argv", ["lorafuse", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


# --- the zygote ---------------------------------------------------------------------------

PRELOAD = (
    "lorafuse.cli",
    "lorafuse.training.library",
    "lorafuse.elrea.pipeline",
    "lorafuse.merging.run",
    "lorafuse.library.create",
    "lorafuse.eval.run",
    "lorafuse.fusion.run",
    "peft",
    "sklearn.cluster",
    "transformers.models.llama.modeling_llama",
    "transformers.tokenization_utils_fast",
)


class Zygote:
    """A preloaded Python that forks one child per :meth:`run` (children are killable)."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"zygote failed to start: {ready!r}")

    def run(
        self,
        args: list[str],
        *,
        cwd: Path,
        env: dict[str, str] | None = None,
        kill_at: tuple[str, int, bool] | None = None,
        kill_after_s: float | None = None,
        timeout_s: float = 900,
    ) -> tuple[int, str, str]:
        """Run ``lorafuse ARGS``; returns (exit code, stdout, stderr); -9 when killed.

        ``kill_at=(target, n, after)``: SIGKILL at the n-th call of ``target`` (a dotted
        name such as ``os.replace``), before it runs or (``after``) once it returned.
        A child still running after ``timeout_s`` is killed too (a hung command fails).
        """
        self.start(
            args, cwd=cwd, env=env, kill_at=kill_at, kill_after_s=kill_after_s, timeout_s=timeout_s
        )
        return self.wait()

    def start(self, args, *, cwd, env=None, kill_at=None, kill_after_s=None, timeout_s=900) -> None:
        """Start a child without waiting (several may run at once); :meth:`wait` for it."""
        cwd = Path(cwd)
        request = {
            "argv": list(args),
            "cwd": str(cwd),
            "env": env or {},
            "kill_at": kill_at,
            "kill_after_s": kill_after_s,
            "timeout_s": timeout_s,
            "stdout": str(cwd / f".out-{time.monotonic_ns()}"),
        }
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        self._pending = getattr(self, "_pending", []) + [request["stdout"]]

    def wait(self) -> tuple[int, str, str]:
        """The result of the oldest child not yet waited for."""
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("zygote died")
        result = json.loads(line)
        stem = self._pending.pop(0)
        out = Path(stem).read_text(errors="replace")
        err = Path(stem + ".err").read_text(errors="replace")
        Path(stem).unlink()
        Path(stem + ".err").unlink()
        return result["rc"], out, err

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _pythonpath() -> str:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def _install_kill(target: str, n: int, after: bool) -> None:
    """Make this process SIGKILL itself at the n-th call of ``target``."""
    import importlib

    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:-1]:
            owner = getattr(owner, attr)
        break
    original = getattr(owner, parts[-1])
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, parts[-1], wrapper)


def _child(request: dict) -> None:
    os.chdir(request["cwd"])
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stdout"] + ".err")):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    code = 1
    try:
        if request["kill_at"]:
            _install_kill(*request["kill_at"])
        from lorafuse.cli import main

        sys.argv = ["lorafuse", *request["argv"]]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve() -> None:
    """The zygote: preload, then fork a child per request line; answer each with its code."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    print("ready", flush=True)
    running: dict[int, tuple[dict, float]] = {}
    order: list[int] = []
    done: dict[int, int] = {}
    stdin_open = True
    os.set_blocking(sys.stdin.fileno(), False)
    buffer = ""
    while stdin_open or running or order:
        try:
            chunk = os.read(sys.stdin.fileno(), 65536).decode()
            if chunk == "":
                stdin_open = False
            buffer += chunk
        except BlockingIOError:
            pass
        while "\n" in buffer:
            line, buffer = buffer.split("\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(request)
            running[pid] = (request, time.monotonic())
            order.append(pid)
        for pid, (request, started) in list(running.items()):
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                del running[pid]
                done[pid] = (
                    -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                )
            else:
                limit = request["kill_after_s"] or request.get("timeout_s")
                if limit and time.monotonic() - started > limit:
                    os.kill(pid, signal.SIGKILL)
        while order and order[0] in done:  # answers in request order
            print(json.dumps({"rc": done.pop(order.pop(0))}), flush=True)
        time.sleep(0.005)


if __name__ == "__main__" and sys.argv[1:] == ["--zygote"]:
    _serve()


def call(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``lorafuse ARGS`` in this process from ``cwd`` (no pytest fixtures needed)."""
    import contextlib
    import io

    from lorafuse.cli import main

    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        os.chdir(cwd)
        os.environ.update(env or {})
        sys.argv = ["lorafuse", *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return code, out.getvalue(), err.getvalue()


_PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[|it/s\]|s/it\]")


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` a user reads as messages: progress bars (tqdm's, also the
    one transformers draws while loading weights) are left out."""
    parts = re.split(r"[\r\n]", stderr)
    return [p for p in parts if p.strip() and not _PROGRESS.search(p)]
