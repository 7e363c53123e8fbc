"""Heterogeneous libraries against PEFT on the tiny model.

Each adapter configuration users bring (all layers, rsLoRA, q/v only on some layers, rank and
alpha patterns, a regex or ``all-linear`` target) is read with PEFT's deltas and computes
PEFT's logits; a set of them merges to the dense ``sum_k w_k dW_k`` with zeros where an
adapter has no delta; the mixture core under one-hot weights is each expert alone; what
lorafuse does not compute is refused in one line naming the file and the config field.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from lorafuse.core.mixture import ConstantMixer, mixture_of_loras
from lorafuse.errors import LorafuseError
from lorafuse.library import LoraAdapter, check_compatible, union_modules
from lorafuse.merging import merge
from lorafuse.merging.registry import get_method

INPUT_IDS = torch.arange(3, 19).reshape(2, 8)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIGS: dict[str, dict[str, Any]] = {
    "all_layers": dict(r=4, lora_alpha=8, target_modules=ALL),
    "rslora": dict(r=4, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "o_proj"]),
    "qv_layer1": dict(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]
    ),
    "patterns": dict(
        r=3,
        lora_alpha=6,
        target_modules=["q_proj", "v_proj", "up_proj"],
        # PEFT's key rule: a key matches any module whose name ends in it
        rank_pattern={"q_proj": 5, "layers.1.mlp.up_proj": 2},
        alpha_pattern={"v_proj": 1.5},
    ),
    "regex": dict(r=2, lora_alpha=2, target_modules=r".*\.mlp\.(gate|down)_proj"),
    "all_linear": dict(r=2, lora_alpha=5, target_modules="all-linear"),
}


def make(base: torch.nn.Module, path: Path, seed: int, **lora: Any) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_LLAMA_CONFIG

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA_CONFIG)).float().eval()


@pytest.fixture(scope="module")
def library(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hetero")
    return {n: make(base, root / n, 20 + i, **c) for i, (n, c) in enumerate(CONFIGS.items())}


def peft_model(base: torch.nn.Module, path: Path) -> PeftModel:
    return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def peft_deltas(base: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """PEFT's own delta of every LoRA layer (``get_delta_weight``)."""
    model = peft_model(base, path)
    inner = model.base_model.model
    return {
        name: layer.get_delta_weight("default").detach()
        for name, layer in inner.named_modules()
        if hasattr(layer, "lora_A") and "default" in layer.lora_A
    }


def loss(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), INPUT_IDS[:, 1:].reshape(-1)
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_config_reads_peft_deltas_and_computes_peft_logits(base, library, name):
    adapter = LoraAdapter.open(library[name])
    reference = peft_deltas(base, library[name])
    assert set(adapter.module_names) == set(reference)
    for module, delta in reference.items():
        torch.testing.assert_close(adapter.delta(module), delta, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        expected = peft_model(base, library[name])(input_ids=INPUT_IDS).logits
        model = copy.deepcopy(base)
        with mixture_of_loras(model, [adapter], ConstantMixer(torch.ones(1))):
            got = model(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss(got), loss(expected), rtol=1e-6, atol=1e-6)


def test_patterns_follow_peft_key_rule(library):
    adapter = LoraAdapter.open(library["patterns"])
    assert adapter.module_rank("model.layers.0.self_attn.q_proj") == 5
    assert adapter.module_rank("model.layers.1.mlp.up_proj") == 2
    assert adapter.module_rank("model.layers.0.mlp.up_proj") == 3
    assert adapter.scaling("model.layers.0.self_attn.v_proj") == pytest.approx(1.5 / 3)


def dense_reference(base, library, names, weights) -> dict[str, torch.Tensor]:
    """``sum_k w_k dW_k`` from PEFT's deltas, zero where an adapter has none."""
    out: dict[str, torch.Tensor] = {}
    for name, w in zip(names, weights, strict=True):
        for module, delta in peft_deltas(base, library[name]).items():
            out[module] = out.get(module, torch.zeros_like(delta)) + w * delta
    return out


def test_heterogeneous_linear_merge_is_the_dense_sum(base, library):
    names = list(CONFIGS)
    adapters = [LoraAdapter.open(library[n]) for n in names]
    check_compatible(adapters, base_model=base)  # different targets, ranks, alphas: fine
    weights = [0.5, -0.25, 1.0, 0.75, 0.3, 0.2]
    merged = merge(adapters, "linear", weights, progress=False)
    reference = dense_reference(base, library, names, weights)
    assert set(merged) == set(reference) == set(union_modules(adapters))
    for module, delta in reference.items():
        torch.testing.assert_close(merged[module].delta(), delta, rtol=1e-5, atol=1e-6)


def test_heterogeneous_dense_merge_sees_zeros_for_missing_modules(base, library):
    """TIES at full rank: the method applied to the zero-filled stack of PEFT's deltas."""
    names = ["qv_layer1", "regex", "patterns"]
    adapters = [LoraAdapter.open(library[n]) for n in names]
    merged = merge(adapters, "ties", [1.0, 1.0, 1.0], progress=False, density=0.5, rank=64)
    per = [peft_deltas(base, library[n]) for n in names]
    ties = get_method("ties")
    for module in union_modules(adapters):
        like = next(p[module] for p in per if module in p)
        stack = torch.stack([p.get(module, torch.zeros_like(like)) for p in per])
        expected = ties.fn(stack, [1.0, 1.0, 1.0], density=0.5)
        torch.testing.assert_close(merged[module].delta(), expected, rtol=1e-4, atol=1e-6)


def test_mixture_one_hot_is_each_expert_alone(base, library):
    names = list(CONFIGS)
    adapters = [LoraAdapter.open(library[n]) for n in names]
    model = copy.deepcopy(base)
    for k, name in enumerate(names):
        with torch.no_grad():
            expected = peft_model(base, library[name])(input_ids=INPUT_IDS).logits
            one_hot = F.one_hot(torch.tensor(k), len(names)).float()
            with mixture_of_loras(model, adapters, ConstantMixer(one_hot)):
                got = model(input_ids=INPUT_IDS).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


REFUSED = {
    "use_dora": (dict(use_dora=True), "use_dora"),
    "lora_bias": (dict(lora_bias=True), "lora_bias"),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    "fan_in_fan_out": (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    "peft_type": (dict(peft_type="IA3"), "peft_type"),
    "lm_head": (dict(target_modules=["q_proj", "lm_head"]), "lm_head"),
    "embeddings": (dict(target_modules=["embed_tokens"]), "embed"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_are_one_line_naming_file_and_field(library, tmp_path, case):
    import shutil

    changes, field = REFUSED[case]
    path = shutil.copytree(library["qv_layer1"], tmp_path / "a")
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LorafuseError) as info:
        LoraAdapter.open(path)
    message = str(info.value)
    assert "adapter_config.json" in message and field in message and "\n" not in message


@pytest.mark.parametrize("targets", [["lm_head"], ["embed_tokens"]])
def test_lora_tensors_on_head_or_embeddings_are_refused(base, tmp_path, targets):
    """Even with a config that hides it (a regex target), the tensors give it away."""
    path = make(base, tmp_path / "a", 1, r=2, lora_alpha=2, target_modules=targets)
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = ".*(" + targets[0] + ")"
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LorafuseError) as info:
        LoraAdapter.open(path)
    message = str(info.value)
    assert "adapter_model.safetensors" in message and "target_modules" in message
    assert "\n" not in message
