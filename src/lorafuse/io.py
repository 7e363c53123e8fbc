"""Atomic output: a reader never sees a half-written file or directory.

Files are written to a temporary sibling, fsync'ed, then ``os.replace``d into place, so an
interrupted run leaves either the old content or the new, never a mix. ``atomic_dir`` does
the same for whole directories (adapters, libraries). A crash can leave a hidden
``.<name>.tmp-*`` sibling behind; it is never mistaken for the real output.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafuse.errors import LorafuseError

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
]


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Persist a rename in ``path``; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; use ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (trailing newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root`` before it is published."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            file = Path(dirpath, name)
            if file.is_symlink() or not file.is_file():
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Build a directory in a temp sibling and move it to ``path`` only if the block succeeds.

    Yields the temp directory (``.<name>.tmp-XXXX`` next to ``path``). On success an existing
    ``path`` is renamed aside, the new directory renamed in, and the old one deleted. On an
    exception the temp directory is removed and an existing ``path`` is left untouched.
    ``replace=False`` (shared caches): the first writer wins; if another process published
    ``path`` meanwhile, this one's result is dropped and theirs, which readers may already
    be using, stays in place.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LorafuseError("exists and is not a directory; refusing to replace it", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        yield tmp
        _fsync_tree(tmp)
        if replace:
            _publish(tmp, path)
        elif not _publish_if_absent(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_if_absent(tmp: Path, path: Path) -> bool:
    """Rename ``tmp`` to ``path`` unless a non-empty ``path`` exists (atomic on POSIX)."""
    try:
        os.rename(tmp, path)
    except OSError:
        if path.is_dir():
            return False
        raise
    _fsync_dir(path.parent)
    return True


def _publish(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``, replacing an existing directory with a rollback on failure."""
    old: Path | None = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}")
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path for a writer that wants a file name (``torch.save``,
    ``safetensors.save_file``); on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        yield tmp
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_json(path: Path) -> Any:
    """Parse a JSON file; invalid JSON is a one-line LorafuseError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LorafuseError(f"invalid JSON: {' '.join(str(exc).split())}", path) from None
