"""``lorafuse merge`` YAML configs (a stable contract in the spirit of mergekit's)::

    base_model: embedded          # or a local model folder
    method: ties
    parameters: {density: 0.5, scale: 1.0, rank: 16, seed: 0}
    experts:
      - path: experts/larger      # relative to the YAML file
        weight: 1.0               # optional

Weights: when no expert gives one, the method's defaults apply (1/K for averages, 1 for
task arithmetic and TIES-style sums); otherwise a missing weight is 1.0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorafuse.errors import LorafuseError
from lorafuse.merging.registry import MERGE_METHODS, get_method


class ExpertSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    weight: float | None = Field(default=None, allow_inf_nan=False)


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = "embedded"
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    experts: list[ExpertSpec] = Field(min_length=1)

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in MERGE_METHODS:
            raise ValueError(f"unknown method '{value}' (known: {', '.join(MERGE_METHODS)})")
        return value

    def weights(self) -> list[float] | None:
        if all(e.weight is None for e in self.experts):
            return None
        return [1.0 if e.weight is None else e.weight for e in self.experts]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)


def load_merge_config(path: str | Path) -> tuple[MergeConfig, Path]:
    """Parse and validate a YAML config; returns it and the folder paths are relative to."""
    path = Path(path)
    if not path.is_file():
        raise LorafuseError("merge config not found", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise LorafuseError(f"{where}invalid YAML ({getattr(err, 'problem', err)})", path) from None
    if not isinstance(data, dict):
        raise LorafuseError("expected a mapping with method, experts, parameters", path)
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = {"missing": "field required", "extra_forbidden": "unknown field"}.get(
            first["type"], str(first["msg"]).removeprefix("Value error, ")
        )
        raise LorafuseError(f"{loc}: {msg}", path) from None
    try:
        get_method(config.method).parse_params(config.parameters)
    except LorafuseError as err:
        raise LorafuseError(f"parameters: {err}", path) from None
    return config, path.parent
