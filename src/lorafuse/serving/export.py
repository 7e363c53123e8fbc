"""Export an adapter so that a serving engine computes what lorafuse computes.

``--for vllm``: vLLM reads ``r``, ``lora_alpha`` (and ``use_rslora``) from the config and
ignores ``rank_pattern``/``alpha_pattern``, so an adapter whose modules have different ranks
or scalings (every lorafuse merge, many users' adapters) would be served silently wrong. The
export writes one uniform rank ``R`` from vLLM's allowed set (:data:`VLLM_RANKS`): each
module's scaling folded into ``B``, ``lora_alpha = R`` (scaling 1), a module of rank below
``R`` padded with zeros (exact), one above it re-compressed by truncated SVD (the loss is
reported per module, see ``merging.truncation``). The config holds nothing vLLM ignores or
refuses: no patterns, no DoRA, no ``modules_to_save``, no bias, only the base's linear
projections (refused at load otherwise, see ``library.adapter_config``).

``--for peft``: the plain PEFT adapter (patterns allowed), optionally re-compressed to at
most ``rank``. ``full_model``: the deltas added into the base's weights, a Hugging Face folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from lorafuse.errors import LorafuseError
from lorafuse.io import atomic_dir
from lorafuse.library import LoraAdapter, LoraFactors, module_sort_key, save_adapter
from lorafuse.library.adapter_config import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME
from lorafuse.merging.truncation import Truncation, format_summary, truncate_factors

__all__ = ["VLLM_RANKS", "ExportResult", "export_adapter", "uniform_factors", "vllm_config"]

VLLM_RANKS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 320, 512)
Target = Literal["vllm", "peft"]


@dataclass
class ExportResult:
    """Where the export went, at which rank, and what re-compression lost per module."""

    path: Path
    rank: int | None
    truncation: dict[str, Truncation] = field(default_factory=dict)

    def summary(self) -> str:
        rank = f" at rank {self.rank}" if self.rank else ""
        return f"wrote {self.path}{rank}; {format_summary(self.truncation)}"


def vllm_rank(ranks: list[int], rank: int | None) -> int:
    """``rank`` if allowed, else the smallest allowed rank holding every module (or 512)."""
    if rank is not None:
        if rank not in VLLM_RANKS:
            allowed = ", ".join(map(str, VLLM_RANKS))
            raise LorafuseError(f"--rank {rank} is not one vLLM serves (allowed: {allowed})")
        return rank
    need = max(ranks)
    return next((r for r in VLLM_RANKS if r >= need), VLLM_RANKS[-1])


def uniform_factors(
    f: LoraFactors, rank: int, *, pad: bool = True
) -> tuple[LoraFactors, Truncation | None]:
    """``f`` at exactly ``rank`` with scaling 1 (folded into B): zero-padded when smaller
    (``pad``), re-compressed by truncated SVD when larger (with its :class:`Truncation`)."""
    if f.rank > rank:
        out, lost = truncate_factors(f, rank)
        if out.rank < rank and pad:  # the delta's own rank is below ``rank``
            out = _pad(out, rank)
        return out, lost
    folded = LoraFactors(A=f.A, B=f.B * f.scaling, scaling=1.0)
    return (_pad(folded, rank) if pad else folded), None


def _pad(f: LoraFactors, rank: int) -> LoraFactors:
    extra = rank - f.rank
    A = torch.cat([f.A, f.A.new_zeros(extra, f.d_in)], 0)
    B = torch.cat([f.B, f.B.new_zeros(f.d_out, extra)], 1)
    return LoraFactors(A=A.contiguous(), B=B.contiguous(), scaling=f.scaling)


def vllm_config(rank: int, modules: list[str], base_model: str | None) -> dict[str, Any]:
    """The adapter config vLLM reads as written: one rank, alpha = rank, leaf target names."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def export_adapter(
    src: str | Path,
    out: str | Path,
    *,
    target: Target = "vllm",
    rank: int | None = None,
    full_model: bool = False,
    base_model: str | None = None,
    allow_pickle: bool = False,
    report: Callable[[str], None] = print,
) -> ExportResult:
    """Export the adapter at ``src`` to ``out`` for ``target`` (see the module docstring)."""
    adapter = LoraAdapter.open(src, allow_pickle=allow_pickle)
    modules = adapter.module_names
    out = Path(out)
    if full_model:
        return _export_full(adapter, out, base_model, report)
    if target == "vllm":
        r = vllm_rank([adapter.module_rank(m) for m in modules], rank)
        factors, lost = _at_rank(adapter, r, pad=True)
        _write_vllm(out, factors, r, adapter.base_model)
    elif target == "peft":
        r = rank
        if r is not None and r < 1:
            raise LorafuseError(f"--rank must be positive, got {r}")
        factors, lost = _at_rank(adapter, r, pad=False)
        save_adapter(out, factors, base_model=adapter.base_model)
    else:
        raise LorafuseError(f"unknown export target {target!r} (known: vllm, peft)")
    result = ExportResult(out, r, lost)
    report(result.summary())
    return result


def _at_rank(
    adapter: LoraAdapter, rank: int | None, *, pad: bool
) -> tuple[dict[str, LoraFactors], dict[str, Truncation]]:
    factors: dict[str, LoraFactors] = {}
    lost: dict[str, Truncation] = {}
    for module, f in adapter.iter_factors():
        if rank is None:
            factors[module] = f
            continue
        factors[module], info = uniform_factors(f, rank, pad=pad)
        if info is not None:
            lost[module] = info
    return factors, lost


def _write_vllm(
    out: Path, factors: dict[str, LoraFactors], rank: int, base_model: str | None
) -> None:
    tensors = {}
    for module in sorted(factors, key=module_sort_key):
        f = factors[module]
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = f.A.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = f.B.detach().cpu().contiguous()
    config = vllm_config(rank, list(factors), base_model)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(
            f"LoRA exported by lorafuse for vLLM: rank {rank}, scaling folded into B "
            f"(lora_alpha = r). Serve with `--enable-lora --max-lora-rank {rank}`.\n",
            encoding="utf-8",
        )


def _export_full(
    adapter: LoraAdapter, out: Path, base_model: str | None, report: Callable[[str], None]
) -> ExportResult:
    from lorafuse.merging.run import save_full_model

    spec = base_model or adapter.base_model
    if not spec:
        raise LorafuseError(
            "no base model: the adapter names none (base_model_name_or_path); pass --base-model",
            adapter.path / CONFIG_NAME,
        )
    factors = dict(adapter.iter_factors())
    card = f"Base model `{spec}` with the LoRA `{adapter.path}` merged in by lorafuse.\n"
    save_full_model(spec, factors, out, card)
    result = ExportResult(out, None)
    report(f"wrote {out} (full model, exact)")
    return result
