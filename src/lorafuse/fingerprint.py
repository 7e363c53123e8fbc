"""Stamps: what a resumable artefact belongs to, so a resume never mixes two runs.

A :class:`Stamp` is three short hashes: the **configuration** (every setting that changes
the result), the **data** (the examples, in order) and the **model** (base weights, the
layer split, a starting adapter). Every resumable artefact records the stamp of the run
that wrote it: training checkpoints, the ``library.json`` of a library being trained,
ELREA builds (``fingerprint.json``) and the lower-layer state shards. A resume compares
the stamps first; on a mismatch it either refuses with one line (:func:`refuse_mismatch`)
or restarts cleanly and says so (:func:`say`), never continues with a mix.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorafuse.errors import LorafuseError
from lorafuse.io import atomic_write_json

__all__ = [
    "FINGERPRINT_NAME",
    "Stamp",
    "digest",
    "examples_digest",
    "files_digest",
    "read_stamp",
    "refuse_mismatch",
    "say",
    "write_stamp",
]

FINGERPRINT_NAME = "fingerprint.json"
PARTS = ("config", "data", "model")


def digest(obj: Any) -> str:
    """A 16-hex hash of a JSON-able object (keys sorted, so dict order does not matter)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def examples_digest(encoded: Iterable[Any]) -> str:
    """The ordered examples by token ids and prompt length (``Encoded``-like objects)."""
    h = hashlib.sha1()
    for e in encoded:
        h.update(f"{list(e.ids)}:{e.prompt_len};".encode())
    return h.hexdigest()[:16]


def files_digest(paths: Iterable[str | Path]) -> str:
    """The bytes of some files (an adapter's config and weights), in the order given."""
    h = hashlib.sha1()
    for path in paths:
        with Path(path).open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Stamp:
    """Hashes of the configuration, the data and the model an artefact was made from."""

    config: str
    data: str
    model: str

    @classmethod
    def of(cls, config: Any, data: Any, model: Any) -> Stamp:
        """Hash each part (anything JSON-able; a string already a hash is hashed again)."""
        return cls(digest(config), digest(data), digest(model))

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> Stamp | None:
        """A stamp read back, or None when ``raw`` is not one (missing, older format)."""
        if not isinstance(raw, Mapping) or not all(isinstance(raw.get(p), str) for p in PARTS):
            return None
        return cls(**{p: raw[p] for p in PARTS})

    def differs(self, other: Stamp | None) -> list[str]:
        """The parts that differ (all three when ``other`` is None)."""
        if other is None:
            return list(PARTS)
        return [p for p in PARTS if getattr(self, p) != getattr(other, p)]


def read_stamp(path: str | Path) -> Stamp | None:
    """The stamp stored in a ``fingerprint.json`` (None when absent or unreadable)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Stamp.from_dict(raw)


def write_stamp(path: str | Path, stamp: Stamp, **extra: Any) -> None:
    """Write ``fingerprint.json`` atomically (``extra``: readable settings beside it)."""
    atomic_write_json(path, {**stamp.as_dict(), **extra})


def refuse_mismatch(
    path: str | Path, have: Stamp | None, want: Stamp, what: str, hint: str
) -> None:
    """One-line :class:`LorafuseError` unless ``have`` equals ``want``."""
    parts = want.differs(have)
    if parts:
        raise LorafuseError(f"{what} belongs to a different run ({mismatch(parts)}); {hint}", path)


def mismatch(parts: list[str]) -> str:
    """``config and data differ`` / ``no fingerprint recorded``."""
    if len(parts) == len(PARTS):
        return "no matching fingerprint"
    return f"{' and '.join(parts)} differ{'s' if len(parts) == 1 else ''}"


def say(message: str) -> None:
    """Tell the user what a resume did (stderr, one line, prefixed ``lorafuse:``)."""
    print(f"lorafuse: {message}", file=sys.stderr, flush=True)
