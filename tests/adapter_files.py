"""Shared by the adapter-reading tests: random PEFT adapters on disk and edits to them."""

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
