"""Write LoRA factors as a PEFT-loadable adapter directory (``save_adapter``)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lorafuse.factors import LoraFactors, module_sort_key
from lorafuse.io import atomic_dir
from lorafuse.library.adapter_config import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, pattern_value

__all__ = ["save_adapter"]


def save_adapter(
    path: str | Path,
    factors: Mapping[str, LoraFactors],
    *,
    base_model: str | None,
    target_modules: list[str] | None = None,
    extra_config: dict[str, Any] | None = None,
    readme: str | None = None,
) -> Path:
    """Write ``factors`` as a PEFT-loadable LoRA adapter directory at ``path``, atomically.

    A and B are stored unchanged (contiguous, same float dtype), so re-saving an adapter read
    with :class:`LoraAdapter` reproduces its weights file byte for byte. Each module's scaling
    goes into ``lora_alpha``/``alpha_pattern`` (ranks into ``r``/``rank_pattern``), with alpha
    chosen so that PEFT's ``alpha / r`` gives back the scaling: exactly whenever some alpha
    can (always for scalings that came from an ``alpha / r``), else to within one ulp. When all
    modules share one rank and alpha there are no patterns. ``use_rslora`` is written only if
    plain ``alpha / r`` needs non-integral alphas and ``alpha / sqrt(r)`` does not; so an
    rsLoRA adapter is usually re-saved as the equivalent plain one (same scaling, new alpha).

    ``target_modules`` defaults to the modules' leaf names (``["q_proj", "v_proj"]``) when the
    modules cover every layer index 0..max for each leaf, else to a regex matching exactly the
    given modules. ``extra_config`` keys are added to ``adapter_config.json`` (PEFT ignores
    unknown keys with a warning); they may not override the keys computed here.
    """
    tensors, ranks, scalings = _prepare_tensors(factors)
    config = _adapter_config(ranks, scalings, base_model, target_modules)
    for key, value in (extra_config or {}).items():
        if key in config:
            raise ValueError(f"extra_config may not override {key!r}")
        config[key] = value
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if readme is not None:
            (tmp / "README.md").write_text(readme, encoding="utf-8")
    return path


def _prepare_tensors(
    factors: Mapping[str, LoraFactors],
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """PEFT-keyed contiguous CPU tensors plus per-module rank and scaling."""
    if not factors:
        raise ValueError("save_adapter needs at least one module's factors")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    scalings: dict[str, float] = {}
    seen: set[int] = set()
    for module in sorted(factors, key=module_sort_key):
        f = factors[module]
        if not module or module.startswith(PEFT_PREFIX) or ".lora_" in module:
            raise ValueError(
                f"expected a bare module name like 'model.layers.0.q_proj': {module!r}"
            )
        if not math.isfinite(f.scaling):
            raise ValueError(f"scaling of {module!r} is not finite: {f.scaling}")
        for half, t in (("lora_A", f.A), ("lora_B", f.B)):
            if not t.is_floating_point():
                raise ValueError(f"{module}.{half} must be a float tensor, got {t.dtype}")
            t = t.detach().to("cpu").contiguous()
            if t.data_ptr() in seen:  # safetensors refuses tensors that share memory
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[f"{PEFT_PREFIX}{module}.{half}.weight"] = t
        ranks[module] = f.rank
        scalings[module] = float(f.scaling)
    return tensors, ranks, scalings


def _exact_alpha(scaling: float, rank: int, rslora: bool) -> tuple[float | int, bool]:
    """The alpha whose ``alpha / r`` (or ``/ sqrt(r)``) is closest to ``scaling``.

    Returns ``(alpha, integral)``, where integral means an int alpha reproduces the scaling
    exactly. Some scalings (e.g. 0.37 at r=3) have no float alpha with ``alpha / r == scaling``;
    then the nearest one is used, off by one ulp of the scaling.
    """
    denom = math.sqrt(rank) if rslora else rank
    raw = scaling * denom
    candidates: list[float | int] = [round(raw), raw]
    for direction in (math.inf, -math.inf):
        value = raw
        for _ in range(2):
            value = math.nextafter(value, direction)
            candidates.append(value)
    best = min(candidates, key=lambda alpha: abs(alpha / denom - scaling))
    return best, isinstance(best, int) and best / denom == scaling


def _most_common(values: list[Any]) -> Any:
    """The most frequent value; ties go to the smallest."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def _adapter_config(
    ranks: dict[str, int],
    scalings: dict[str, float],
    base_model: str | None,
    target_modules: list[str] | None,
) -> dict[str, Any]:
    """A minimal ``adapter_config.json`` that ``peft.LoraConfig`` loads."""
    use_rslora = False
    alphas = {m: _exact_alpha(scalings[m], ranks[m], False) for m in ranks}
    if not all(integral for _, integral in alphas.values()):
        rs_alphas = {m: _exact_alpha(scalings[m], ranks[m], True) for m in ranks}
        if all(integral for _, integral in rs_alphas.values()):
            alphas, use_rslora = rs_alphas, True
    alpha_of = {m: a for m, (a, _) in alphas.items()}
    r = _most_common(list(ranks.values()))
    lora_alpha = _most_common(list(alpha_of.values()))
    rank_pattern = _patterns({m: v for m, v in ranks.items() if v != r}, ranks, r)
    alpha_pattern = _patterns(
        {m: v for m, v in alpha_of.items() if v != lora_alpha}, alpha_of, lora_alpha
    )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": (
            sorted(set(target_modules)) if target_modules else _default_targets(list(ranks))
        ),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "lora_bias": False,
    }


def _patterns(overrides: dict[str, Any], wanted: dict[str, Any], default: Any) -> dict[str, Any]:
    """Per-module pattern keys: plain names when unambiguous under PEFT's regex, else anchored."""
    pattern = {m: overrides[m] for m in sorted(overrides, key=module_sort_key)}
    if all(pattern_value(pattern, m, default) == v for m, v in wanted.items()):
        return pattern
    return {"^" + re.escape(m): v for m, v in pattern.items()}


def _default_targets(modules: list[str]) -> list[str] | str:
    """Leaf names when they cover the same modules as the full names would, else a regex."""
    names = set(modules)
    layer = re.compile(r"\.(\d+)\.")  # the first numeric path component, e.g. ".3."
    indices = {int(m.group(1)) for m in map(layer.search, names) if m}
    for name in names:
        if layer.search(name) and any(
            layer.sub(f".{i}.", name, count=1) not in names for i in range(max(indices) + 1)
        ):
            return "^(?:" + "|".join(re.escape(m) for m in sorted(names)) + ")$"
    return sorted({name.rsplit(".", 1)[-1] for name in names})
