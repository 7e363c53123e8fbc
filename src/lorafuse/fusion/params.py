"""``--param KEY=VALUE`` checked against the fusion methods before anything is loaded.

Each method's build function declares its parameters with types; a value of the wrong type
(``--param top_k=abc``) is a one-line error naming the parameter, the value and the type
wanted, instead of a TypeError deep inside the method after the model has loaded.
Parameters of ``merge`` other than its own (``method``) belong to the merge method and are
checked by its settings model.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from lorafuse.errors import LorafuseError
from lorafuse.fusion.methods import FUSION_METHODS, static_merge

__all__ = ["check_params"]

_IMPLICIT = {"ws", "seed"}  # given by the command, not by --param


def check_params(methods: Sequence[str], params: Mapping[str, Any]) -> dict[str, Any]:
    """Unknown methods, unknown parameters and mistyped values are :class:`LorafuseError`;
    returns ``params`` with values coerced where the type allows (``"2"`` -> 2)."""
    out = dict(params)
    for name in methods:
        if name not in FUSION_METHODS:
            have = ", ".join(FUSION_METHODS)
            raise LorafuseError(f"unknown fusion method {name!r} (have: {have})")
        build = FUSION_METHODS[name].build
        accepted = set(inspect.signature(build).parameters) - _IMPLICIT
        unknown = sorted(set(params) - accepted)
        if unknown and build is not static_merge:
            raise LorafuseError(
                f"--param {unknown[0]}: {name} has no such parameter "
                f"(have: {', '.join(sorted(accepted))})"
            )
        hints = typing.get_type_hints(build)
        for key in sorted(accepted & set(params)):
            if key in hints:
                out[key] = _typed(name, key, params[key], hints[key])
    return out


def _typed(method: str, key: str, value: Any, hint: Any) -> Any:
    try:
        return TypeAdapter(hint).validate_python(value)
    except ValidationError as err:
        why = err.errors()[0].get("msg", "invalid value")
        wanted = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        raise LorafuseError(f"--param {key}={value!r}: {method} wants {wanted} ({why})") from None
