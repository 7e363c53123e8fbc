"""Sets of adapters: what they adapt together, and whether they can be fused.

A library may be heterogeneous: adapters may adapt different modules (other target modules,
other ``layers_to_transform``) with different ranks and scalings. Together they adapt the
union of their modules (:func:`~lorafuse.factors.union_modules`); an adapter that does
not touch a module has a zero delta there (:func:`~lorafuse.factors.module_factors`
gives zero factors in its place). What must agree is
where a delta lands and its ``(d_out, d_in)`` shape. Errors name the offending adapter's
directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from lorafuse.errors import LorafuseError
from lorafuse.library.adapter import LoraAdapter

__all__ = [
    "check_compatible",
    "check_weights",
    "load_adapters",
]


def check_compatible(
    adapters: Sequence[LoraAdapter], base_model: torch.nn.Module | None = None
) -> None:
    """Raise ``LorafuseError`` unless all adapters (and ``base_model``, if given) agree.

    Adapters may adapt different modules (the union is used, zeros where one has none) with
    different ranks and scalings; ``base_model_name_or_path`` (when set) and each shared
    module's ``(d_out, d_in)`` must agree. With ``base_model``, every adapted module must exist
    in it (names relative to the causal LM), be an ``nn.Linear``, and have a weight of shape
    ``(d_out, d_in)``.
    """
    if not adapters:
        return
    _check_base_names(adapters)
    first: dict[str, LoraAdapter] = {}
    for adapter in adapters:
        for module in adapter.module_names:
            ref = first.setdefault(module, adapter)
            if adapter.module_shape(module) != ref.module_shape(module):
                raise LorafuseError(
                    f"module {module} has (d_out, d_in) {adapter.module_shape(module)} but "
                    f"{ref.module_shape(module)} in {ref.path}",
                    adapter.path,
                )
    if base_model is not None:
        for adapter in adapters:
            _check_against_model(adapter, base_model)


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
