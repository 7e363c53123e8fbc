"""Check that a set of adapters can be fused: same base, same modules, same layer shapes.

Ranks may differ between adapters; everything that decides *where* a delta lands and its
``(d_out, d_in)`` shape may not. Errors name the offending adapter's directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from lorafuse.errors import LorafuseError
from lorafuse.library.adapter import LoraAdapter, module_sort_key

__all__ = ["check_compatible", "load_adapters"]

_SHOW = 3  # module names listed in a message before "(+N more)"


def _few(names: Iterable[str]) -> str:
    """The first few names in model order, then a count of the rest."""
    ordered = sorted(names, key=module_sort_key)
    text = ", ".join(ordered[:_SHOW])
    return text + (f" (+{len(ordered) - _SHOW} more)" if len(ordered) > _SHOW else "")


def check_compatible(
    adapters: Sequence[LoraAdapter], base_model: torch.nn.Module | None = None
) -> None:
    """Raise ``LorafuseError`` unless all adapters (and ``base_model``, if given) agree.

    Compared with the first adapter: ``base_model_name_or_path`` (when both are set), the set
    of adapted modules, and each module's ``(d_out, d_in)``. With ``base_model``, every module
    must exist in it (names relative to the causal LM), be an ``nn.Linear``, and have a weight
    of shape ``(d_out, d_in)``.
    """
    if not adapters:
        return
    ref = adapters[0]
    _check_base_names(adapters)
    ref_modules = set(ref.module_names)
    for other in adapters[1:]:
        modules = set(other.module_names)
        if modules != ref_modules:
            parts = []
            if missing := ref_modules - modules:
                parts.append(f"missing {_few(missing)}")
            if extra := modules - ref_modules:
                parts.append(f"extra {_few(extra)}")
            raise LorafuseError(
                f"target modules differ from {ref.path}: {'; '.join(parts)}", other.path
            )
        for module in ref.module_names:
            if other.module_shape(module) != ref.module_shape(module):
                raise LorafuseError(
                    f"module {module} has (d_out, d_in) {other.module_shape(module)} but "
                    f"{ref.module_shape(module)} in {ref.path}",
                    other.path,
                )
    if base_model is not None:
        _check_against_model(ref, base_model)


def _check_base_names(adapters: Sequence[LoraAdapter]) -> None:
    """All adapters that name a base model must name the same one."""
    named = [a for a in adapters if a.base_model]
    for other in named[1:]:
        if other.base_model != named[0].base_model:
            raise LorafuseError(
                f"base_model_name_or_path {other.base_model!r} differs from "
                f"{named[0].base_model!r} in {named[0].path}",
                other.path,
            )


def _check_against_model(adapter: LoraAdapter, model: torch.nn.Module) -> None:
    """Each adapted module must be an ``nn.Linear`` of matching shape in ``model``."""
    layers = dict(model.named_modules())
    for module in adapter.module_names:
        layer = layers.get(module)
        if layer is None:
            raise LorafuseError(f"module {module} not found in the base model", adapter.path)
        if not isinstance(layer, torch.nn.Linear):
            raise LorafuseError(
                f"module {module} is a {type(layer).__name__} in the base model; only "
                "nn.Linear is supported",
                adapter.path,
            )
        expected = tuple(layer.weight.shape)
        if adapter.module_shape(module) != expected:
            raise LorafuseError(
                f"module {module} has (d_out, d_in) {adapter.module_shape(module)} but the base "
                f"model's weight is {expected}",
                adapter.path,
            )


def load_adapters(
    paths: Iterable[str | Path],
    *,
    allow_pickle: bool = False,
    base_model: torch.nn.Module | None = None,
) -> list[LoraAdapter]:
    """Open every adapter in ``paths`` and check they are mutually compatible."""
    adapters = [LoraAdapter.open(p, allow_pickle=allow_pickle) for p in paths]
    check_compatible(adapters, base_model)
    return adapters


def check_weights(adapters: Sequence[LoraAdapter]) -> None:
    """Read every factor once (one module at a time) so NaN/Inf or bad shapes fail early,
    naming the file, before a model is built from them."""
    for adapter in adapters:
        for _ in adapter.iter_factors():
            pass
