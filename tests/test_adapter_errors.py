"""lorafuse.library on bad adapter folders: one clear error naming the file and the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_files import edit_config, edit_weights, expect_error, make_adapter
from safetensors.torch import load_file

from lorafuse.errors import LorafuseError
from lorafuse.library import (
    LoraAdapter,
)

PLAIN = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def adapter_dir(tiny_llama: torch.nn.Module, tmp_path: Path) -> Path:
    return make_adapter(tiny_llama, tmp_path / "adapter", **PLAIN)[1]


def test_missing_directory(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope", "not found", LoraAdapter.open, tmp_path / "nope")


def test_missing_config(adapter_dir: Path) -> None:
    (adapter_dir / "adapter_config.json").unlink()
    expect_error(adapter_dir / "adapter_config.json", "not found", LoraAdapter.open, adapter_dir)


def test_invalid_json(adapter_dir: Path) -> None:
    (adapter_dir / "adapter_config.json").write_text("{not json")
    expect_error(adapter_dir / "adapter_config.json", "invalid JSON", LoraAdapter.open, adapter_dir)


@pytest.mark.parametrize(
    ("changes", "keyword"),
    [
        ({"peft_type": "IA3"}, "only LORA"),
        ({"use_dora": True}, "DoRA (use_dora) is not supported"),
        ({"lora_bias": True}, "not supported"),
        ({"r": 8}, "rank mismatch"),
        ({"rank_pattern": {"q_proj": 2}}, "rank mismatch"),
    ],
)
def test_unsupported_or_inconsistent_config(
    adapter_dir: Path, changes: dict[str, Any], keyword: str
) -> None:
    edit_config(adapter_dir, **changes)
    path = adapter_dir / (
        "adapter_model.safetensors" if "rank" in keyword else "adapter_config.json"
    )
    expect_error(path, keyword, LoraAdapter.open, adapter_dir)


def test_missing_weights(adapter_dir: Path) -> None:
    (adapter_dir / "adapter_model.safetensors").unlink()
    expect_error(
        adapter_dir / "adapter_model.safetensors", "not found", LoraAdapter.open, adapter_dir
    )


def test_pickled_weights_refused_unless_allowed(adapter_dir: Path) -> None:
    original = LoraAdapter.open(adapter_dir)
    deltas = {m: original.delta(m) for m in original.module_names}
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    torch.save(tensors, adapter_dir / "adapter_model.bin")
    (adapter_dir / "adapter_model.safetensors").unlink()
    expect_error(adapter_dir / "adapter_model.bin", "allow_pickle", LoraAdapter.open, adapter_dir)
    adapter = LoraAdapter.open(adapter_dir, allow_pickle=True)
    assert adapter.module_names == original.module_names
    for module, delta in deltas.items():
        assert torch.equal(adapter.delta(module), delta)


def test_truncated_safetensors(adapter_dir: Path) -> None:
    weights = adapter_dir / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    expect_error(weights, "truncated", LoraAdapter.open, adapter_dir)


def test_nan_detected_when_factors_are_read(adapter_dir: Path) -> None:
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key][3, 1] = float("nan")

    edit_weights(adapter_dir, poison)
    adapter = LoraAdapter.open(adapter_dir)  # cheap open does not read tensor data
    adapter.factors("model.layers.0.self_attn.v_proj")
    err = expect_error(
        adapter_dir / "adapter_model.safetensors",
        "NaN",
        adapter.factors,
        "model.layers.1.self_attn.v_proj",
    )
    assert key in str(err)
    with pytest.raises(LorafuseError, match="NaN"):
        list(adapter.iter_factors())


def test_lora_a_without_lora_b(adapter_dir: Path) -> None:
    edit_weights(
        adapter_dir,
        lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
    )
    expect_error(
        adapter_dir / "adapter_model.safetensors",
        "no matching lora_B",
        LoraAdapter.open,
        adapter_dir,
    )


def test_non_lora_keys_not_supported(adapter_dir: Path) -> None:
    def add_head(tensors: dict[str, torch.Tensor]) -> None:
        tensors["base_model.model.lm_head.weight"] = torch.zeros(128, 32)

    edit_weights(adapter_dir, add_head)
    err = expect_error(
        adapter_dir / "adapter_model.safetensors", "not supported", LoraAdapter.open, adapter_dir
    )
    assert "lm_head.weight" in str(err)
