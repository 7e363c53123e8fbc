"""``adapter_config.json``: read it, refuse what lorafuse does not compute, and PEFT's rules
for a module's rank and scaling.

The weight update of ``<module>`` is ``scaling * B @ A`` where ``scaling = alpha / r``
(``alpha / sqrt(r)`` with ``use_rslora``), and ``r``/``alpha`` may be overridden per module by
``rank_pattern``/``alpha_pattern`` (PEFT's key rule: a key matches a module name ending in it).
Only plain LoRA on the base's linear layers is supported; anything else is refused with one
line naming the file and the config field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorafuse.errors import LorafuseError
from lorafuse.io import read_json

__all__ = [
    "CONFIG_NAME",
    "PEFT_PREFIX",
    "PICKLE_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "embedding_or_head",
    "module_scaling",
    "pattern_value",
    "read_config",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# Config switches that change what the adapter computes; each must be off/empty.
_UNSUPPORTED_FEATURES: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "fan_in_fan_out": "transposed (Conv1D) weights (fan_in_fan_out)",
    "lora_bias": "LoRA bias (lora_bias)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}


def pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """Look ``module`` up in a PEFT ``rank_pattern``/``alpha_pattern`` the way PEFT does.

    PEFT takes the first key ``k`` for which ``(.*\\.)?(k)$`` matches the module name.
    """
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return pattern.get(module, default)


def read_config(path: Path) -> dict[str, Any]:
    """Load ``adapter_config.json`` and refuse anything that is not plain LoRA."""
    if not path.is_file():
        raise LorafuseError(f"{CONFIG_NAME} not found (not a PEFT adapter directory?)", path)
    config = read_json(path)
    if not isinstance(config, dict):
        raise LorafuseError("expected a JSON object", path)
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise LorafuseError(f"peft_type is {peft_type!r}; only LORA adapters are supported", path)
    for key, feature in _UNSUPPORTED_FEATURES.items():
        if config.get(key):
            raise LorafuseError(f"{feature} is not supported", path)
    _check_targets(path, config.get("target_modules"))
    if config.get("bias", "none") != "none":
        raise LorafuseError(f"bias={config['bias']!r} is not supported (only 'none')", path)
    _check_number(path, "r", config.get("r", 8), rank=True)
    _check_number(path, "lora_alpha", config.get("lora_alpha", 8), rank=False)
    for key, is_rank in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise LorafuseError(f"{key} must be a JSON object", path)
        for name, value in pattern.items():
            try:
                re.compile(name)
            except re.error as exc:
                raise LorafuseError(
                    f"{key} key {name!r} is not a valid regex: {exc}", path
                ) from exc
            _check_number(path, f"{key}[{name!r}]", value, rank=is_rank)
    return config


# Leaf names of the token embedding and the output head across families: LoRA there is not a
# linear update of the base's projections (vLLM serves it differently, if at all).
EMBEDDING_NAMES = frozenset({"embed_tokens", "embed_in", "wte", "wpe", "word_embeddings"})
HEAD_NAMES = frozenset({"lm_head", "embed_out", "output"})


def _check_targets(path: Path, targets: Any) -> None:
    """``target_modules`` may be a list of names, a regex string or ``all-linear``, but may not
    name the embeddings or the output head."""
    if targets is None or isinstance(targets, str):
        names = [targets] if isinstance(targets, str) else []
    elif isinstance(targets, list | tuple):
        names = [str(t) for t in targets]
    else:
        raise LorafuseError(
            f"target_modules must be a list of names or a regex string, got {targets!r}", path
        )
    for name in names:
        what = embedding_or_head(name.rsplit(".", 1)[-1])
        if what:
            raise LorafuseError(f"LoRA on {what} (target_modules {name!r}) is not supported", path)


def embedding_or_head(leaf: str) -> str | None:
    """``"embeddings"``/``"lm_head"`` if a module's leaf name is one of them, else None."""
    if leaf in EMBEDDING_NAMES:
        return "embeddings"
    if leaf in HEAD_NAMES:
        return "lm_head"
    return None


def _check_number(path: Path, what: str, value: Any, *, rank: bool) -> None:
    """Ranks must be positive integers; alphas any finite number (merges may negate)."""
    if rank:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LorafuseError(f"{what} must be a positive integer, got {value!r}", path)
    elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LorafuseError(f"{what} must be a finite number, got {value!r}", path)


def module_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling rule, honouring ``alpha_pattern`` and ``use_rslora``."""
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank
