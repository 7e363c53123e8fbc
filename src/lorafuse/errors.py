"""One exception type for every user-facing failure.

The CLI prints ``str(err)`` as a single line and exits non-zero; no traceback unless
``--debug`` is given. Messages name the file (or setting) and the problem.
"""

from __future__ import annotations

from pathlib import Path


class LorafuseError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
