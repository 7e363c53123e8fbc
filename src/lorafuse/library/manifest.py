"""The library manifest: ``library.json`` listing the experts stored beside it.

A library is a directory with ``library.json`` and one PEFT adapter subdirectory per
expert. The manifest records where each expert lives, which tasks it was trained on and
how (``train``), and what that cost or achieved (``metrics``), so fusion runs are
reproducible from the library alone. Unknown fields are errors, not silently dropped.

A plain folder whose subfolders are PEFT adapters is read as a library too: each adapter
subfolder is an expert named after it, with its tasks unknown (``tasks: []``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafuse import __version__
from lorafuse.errors import LorafuseError
from lorafuse.io import atomic_write_text, read_json
from lorafuse.library.adapter import LoraAdapter
from lorafuse.library.compat import check_compatible

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "UNKNOWN_BASE",
    "ExpertEntry",
    "LibraryManifest",
    "folder_manifest",
    "load_manifest",
    "new_manifest",
    "open_library",
    "read_manifest",
    "tasks_unknown",
    "untasked",
    "write_manifest",
]

MANIFEST_NAME = "library.json"
FORMAT_VERSION = 1
UNKNOWN_BASE = "unknown"  # base_model of a library whose adapters name none
_ADAPTER_CONFIG = "adapter_config.json"


class ExpertEntry(BaseModel):
    """One expert: a PEFT adapter directory inside the library."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)  # relative to the library directory
    tasks: list[str]
    kind: str = "private"  # private | multitask | cluster | merged ...
    train: dict[str, Any] = Field(default_factory=dict)  # steps, lr, seed, ...
    metrics: dict[str, Any] = Field(default_factory=dict)  # train_time_s, val_loss, ...

    @field_validator("path")
    @classmethod
    def _relative_inside(cls, value: str) -> str:
        """Keep experts inside the library so it can be moved or copied as one directory."""
        parts = PurePosixPath(value.replace("\\", "/"))
        if parts.is_absolute() or ".." in parts.parts:
            raise ValueError(f"must be a path inside the library directory, got {value!r}")
        return value


class LibraryManifest(BaseModel):
    """Contents of ``library.json``."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    base_model: str
    lorafuse_version: str
    created: str  # ISO 8601 time
    experts: list[ExpertEntry]
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if not 1 <= value <= FORMAT_VERSION:
            raise ValueError(f"version {value} is not supported (this lorafuse reads 1)")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> LibraryManifest:
        seen: set[str] = set()
        for expert in self.experts:
            if expert.name in seen:
                raise ValueError(f"duplicate expert name {expert.name!r}")
            seen.add(expert.name)
        return self


def new_manifest(
    base_model: str, experts: list[ExpertEntry], config: dict[str, Any] | None = None
) -> LibraryManifest:
    """A manifest stamped with this lorafuse version and the current UTC time."""
    return LibraryManifest(
        base_model=base_model,
        lorafuse_version=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        experts=experts,
        config=config or {},
    )


def _manifest_path(library_dir: str | Path) -> Path:
    path = Path(library_dir)
    return path if path.name == MANIFEST_NAME and path.is_file() else path / MANIFEST_NAME


def _first_error(exc: ValidationError) -> str:
    """Pydantic's errors as one line: ``experts.0.tasks: field required``."""
    errors = exc.errors()
    err = errors[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "missing":
        msg = "field required"
    elif err["type"] == "extra_forbidden":
        msg = "unknown field"
    else:
        msg = str(err["msg"]).removeprefix("Value error, ")
    more = f" (+{len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


def read_manifest(library_dir: str | Path) -> LibraryManifest:
    """Load and validate ``library_dir/library.json``."""
    path = _manifest_path(library_dir)
    if not path.parent.is_dir():
        raise LorafuseError("library directory not found", path.parent)
    if not path.is_file():
        raise LorafuseError(f"{MANIFEST_NAME} not found (not a lorafuse library?)", path)
    data = read_json(path)
    try:
        return LibraryManifest.model_validate(data)
    except ValidationError as exc:
        raise LorafuseError(_first_error(exc), path) from None


def folder_manifest(folder: str | Path) -> LibraryManifest:
    """The manifest of a plain folder of PEFT adapters: one private expert per subfolder
    holding ``adapter_config.json``, named after it, tasks unknown (sorted by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LorafuseError("library directory not found", folder)
    if (folder / _ADAPTER_CONFIG).is_file():
        raise LorafuseError(
            "is a single PEFT adapter, not a library (use --adapter, or make a library with "
            "lorafuse library create)",
            folder,
        )
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and (d / _ADAPTER_CONFIG).is_file())
    subdirs = [d for d in subdirs if not d.name.startswith(".")]  # temp dirs of atomic writes
    if not subdirs:
        raise LorafuseError(
            f"not a library: no {MANIFEST_NAME} and no subfolder holding a PEFT adapter "
            f"({_ADAPTER_CONFIG})",
            folder,
        )
    bases = {_named_base(d / _ADAPTER_CONFIG) for d in subdirs} - {None}
    experts = [ExpertEntry(name=d.name, path=d.name, tasks=[]) for d in subdirs]
    return new_manifest(min(bases) if bases else UNKNOWN_BASE, experts)  # type: ignore[type-var]


def _named_base(config: Path) -> str | None:
    data = read_json(config)
    value = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    return str(value) if value else None


def load_manifest(library_dir: str | Path) -> LibraryManifest:
    """``library.json`` if the directory has one, else the manifest of a plain folder of
    PEFT adapters (:func:`folder_manifest`)."""
    if _manifest_path(library_dir).is_file():
        return read_manifest(library_dir)
    return folder_manifest(library_dir)


def untasked(manifest: LibraryManifest) -> list[str]:
    """Private experts whose tasks the manifest does not name (e.g. a plain adapter folder)."""
    return [e.name for e in manifest.experts if e.kind == "private" and not e.tasks]


def tasks_unknown(what: str, library: str | Path, names: list[str]) -> str:
    """One line saying that ``what`` needs each expert's task and how to give them."""
    shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
    return (
        f"{what} needs each expert's task, but {library} names none for {shown}; give them "
        "with: lorafuse library create OUT ADAPTER_DIR... --task TASK ..."
    )


def write_manifest(library_dir: str | Path, manifest: LibraryManifest) -> None:
    """Write ``library_dir/library.json`` atomically."""
    atomic_write_text(Path(library_dir) / MANIFEST_NAME, manifest.model_dump_json(indent=2) + "\n")


def open_library(
    library_dir: str | Path, *, allow_pickle: bool = False, kinds: set[str] | None = None
) -> tuple[LibraryManifest, dict[str, LoraAdapter]]:
    """Read the manifest and open its experts (only ``kinds``, if given), checked compatible.

    ``library_dir`` is a lorafuse library or a plain folder of PEFT adapters
    (:func:`load_manifest`). Returns the full manifest and ``{expert name: adapter}`` in
    manifest order.
    """
    library_dir = Path(library_dir)
    manifest = load_manifest(library_dir)
    root = _manifest_path(library_dir).parent
    adapters = {
        e.name: LoraAdapter.open(root / e.path, allow_pickle=allow_pickle)
        for e in manifest.experts
        if kinds is None or e.kind in kinds
    }
    check_compatible(list(adapters.values()))
    return manifest, adapters
