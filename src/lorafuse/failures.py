"""Every failure a user can cause, as one line on stderr and an exit code.

``lorafuse.cli.main`` hands any exception here: :class:`LorafuseError` (the message names
the file or setting), usage errors of the command line (bad option values, missing
options: the message and the command to ask for help), a pydantic ``ValidationError`` from
a settings model (its first problem), and ``OSError`` from the file system (the path and
the reason). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from lorafuse.errors import LorafuseError

__all__ = ["one_line"]

USAGE = 2


def _flat(text: str) -> str:
    return " ".join(str(text).split())


def one_line(err: BaseException) -> tuple[str, int] | None:
    """``(message, exit code)`` for a user-facing failure; None for a bug (re-raise it)."""
    if isinstance(err, LorafuseError):
        return f"error: {_flat(err)}", USAGE
    code = getattr(err, "exit_code", None)
    if callable(getattr(err, "format_message", None)) and isinstance(code, int):
        # typer 0.29 vendors click (typer._click): match click's exceptions by their shape
        ctx = getattr(err, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        return f"error: {where}{_flat(err.format_message())}{hint}", code
    if type(err).__name__ == "ValidationError" and callable(getattr(err, "errors", None)):
        first = err.errors()[0]  # pydantic: a bad setting
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"error: {where}: {_flat(first.get('msg', 'invalid value'))}", USAGE
    if isinstance(err, OSError) and err.strerror:
        path = err.filename if err.filename is not None else ""
        return f"error: {path}: {_flat(err.strerror)}" if path else f"error: {err.strerror}", USAGE
    return None
