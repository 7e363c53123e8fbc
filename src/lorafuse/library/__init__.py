"""Libraries of LoRA experts: single PEFT adapters, compatibility checks, the manifest."""

from __future__ import annotations

from lorafuse.factors import LoraFactors, module_factors, module_sort_key, union_modules
from lorafuse.library.adapter import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    LoraAdapter,
)
from lorafuse.library.compat import check_compatible, check_weights, load_adapters
from lorafuse.library.manifest import (
    MANIFEST_NAME,
    ExpertEntry,
    LibraryManifest,
    new_manifest,
    open_library,
    read_manifest,
    write_manifest,
)
from lorafuse.library.save import save_adapter

__all__ = [
    "CONFIG_NAME",
    "MANIFEST_NAME",
    "PICKLE_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "ExpertEntry",
    "LibraryManifest",
    "LoraAdapter",
    "LoraFactors",
    "check_compatible",
    "check_weights",
    "load_adapters",
    "module_factors",
    "module_sort_key",
    "new_manifest",
    "open_library",
    "read_manifest",
    "save_adapter",
    "union_modules",
    "write_manifest",
]
