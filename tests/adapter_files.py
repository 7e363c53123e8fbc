"""Shared by the adapter and merge tests: random PEFT adapters on disk, edits to them,
random LoRA factors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from lorafuse.errors import LorafuseError
from lorafuse.factors import LoraFactors


def make_adapter(
    base: torch.nn.Module, path: Path, seed: int = 1, **lora: Any
) -> tuple[PeftModel, Path]:
    """Wrap a copy of ``base`` in a random (non-zero B) LoRA and save it to ``path``."""
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora))
    model.eval()
    model.save_pretrained(path)
    return model, path


def edit_config(path: Path, **changes: Any) -> None:
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


def edit_weights(path: Path, edit: Any) -> None:
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)


def expect_error(path: Path, keyword: str, fn: Any, *args: Any, **kwargs: Any) -> LorafuseError:
    """``fn`` raises LorafuseError naming ``path`` and containing ``keyword``."""
    with pytest.raises(LorafuseError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    assert keyword.lower() in message.lower(), message
    assert "\n" not in message
    return info.value


def random_factors(rank: int, scaling: float, seed: int, d_out: int = 12, d_in: int = 10):
    """Seeded float64 LoRA factors of one module (tests of the merge math)."""
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(
        A=torch.randn(rank, d_in, generator=gen, dtype=torch.float64),
        B=torch.randn(d_out, rank, generator=gen, dtype=torch.float64),
        scaling=scaling,
    )
