"""lorafuse.library: reading PEFT adapters, saving them back, compatibility, manifests."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_files import edit_config, expect_error, make_adapter
from peft import LoraConfig, PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from lorafuse.library import (
    ExpertEntry,
    LibraryManifest,
    LoraAdapter,
    LoraFactors,
    check_compatible,
    load_adapters,
    module_factors,
    module_sort_key,
    new_manifest,
    open_library,
    read_manifest,
    save_adapter,
    union_modules,
    write_manifest,
)

INPUT_IDS = torch.arange(3, 19).reshape(2, 8)

PLAIN = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
RSLORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "use_rslora": True}
PATTERNS = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj", "up_proj"],
    "rank_pattern": {"model.layers.1.self_attn.q_proj": 2, "up_proj": 6},
    "alpha_pattern": {"v_proj": 3},
}
KINDS = {"plain": PLAIN, "rslora": RSLORA, "patterns": PATTERNS}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_delta_matches_peft_merge(tiny_llama: torch.nn.Module, tmp_path: Path, kind: str) -> None:
    peft_model, path = make_adapter(tiny_llama, tmp_path / kind, **KINDS[kind])
    adapter = LoraAdapter.open(path)
    merged = dict(peft_model.merge_and_unload().named_modules())
    base = dict(tiny_llama.named_modules())
    lora_modules = {n.removeprefix("base_model.model.") for n, _ in peft_model.named_parameters()}
    assert len(adapter.module_names) == len(KINDS[kind]["target_modules"]) * 2
    for module in adapter.module_names:
        expected = merged[module].weight - base[module].weight
        assert expected.abs().max() > 1e-3  # the adapter really changes this layer
        torch.testing.assert_close(adapter.delta(module), expected, atol=1e-6, rtol=0)
    assert set(adapter.module_names) <= {n.rsplit(".", 1)[0] for n in lora_modules}


def test_scaling_and_ranks_follow_patterns(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    _, path = make_adapter(tiny_llama, tmp_path / "a", **PATTERNS)
    adapter = LoraAdapter.open(path)
    q1, v0, up0 = (
        "model.layers.1.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        ("model.layers.0.mlp.up_proj"),
    )
    assert adapter.module_rank(q1) == 2 and adapter.scaling(q1) == 8 / 2
    assert adapter.module_rank(v0) == 4 and adapter.scaling(v0) == 3 / 4
    assert adapter.module_rank(up0) == 6 and adapter.scaling(up0) == 8 / 6
    assert adapter.module_shape(up0) == (64, 32)
    factors = adapter.factors(up0, dtype=torch.float64)
    assert factors.A.dtype == torch.float64 and (factors.rank, factors.d_in, factors.d_out) == (
        6,
        32,
        64,
    )
    rs = LoraAdapter.open(make_adapter(tiny_llama, tmp_path / "rs", **RSLORA)[1])
    assert rs.scaling("model.layers.0.self_attn.q_proj") == 16 / math.sqrt(8)


def test_module_names_in_model_order(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    _, path = make_adapter(tiny_llama, tmp_path / "a", **PATTERNS)
    adapter = LoraAdapter.open(path)
    assert adapter.module_names[:3] == [
        "model.layers.0.mlp.up_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    assert [m for m, _ in adapter.iter_factors()] == adapter.module_names
    names = ["model.layers.10.q", "model.layers.2.q", "model.layers.2.k", "lm_head"]
    assert sorted(names, key=module_sort_key) == [
        "lm_head",
        "model.layers.2.k",
        "model.layers.2.q",
        "model.layers.10.q",
    ]


def test_metadata_properties(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    _, path = make_adapter(tiny_llama, tmp_path / "a", **PLAIN)
    edit_config(path, base_model_name_or_path="org/tiny")
    adapter = LoraAdapter.open(path)
    assert adapter.base_model == "org/tiny"
    assert adapter.target_modules == ["q_proj", "v_proj"]
    assert adapter.num_bytes == (path / "adapter_model.safetensors").stat().st_size
    assert adapter.path == path and adapter.config["r"] == 4


# ------------------------------------------------------------------------------ saving
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_save_round_trip_gives_identical_logits(
    tiny_llama: torch.nn.Module, tmp_path: Path, kind: str
) -> None:
    peft_model, path = make_adapter(tiny_llama, tmp_path / "orig", **KINDS[kind])
    adapter = LoraAdapter.open(path)
    out = save_adapter(tmp_path / "saved", dict(adapter.iter_factors()), base_model="org/tiny")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        reloaded = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), out).eval()
    torch.testing.assert_close(logits(reloaded), logits(peft_model), atol=1e-6, rtol=0)
    again = LoraAdapter.open(out)
    assert again.base_model == "org/tiny"
    if kind == "patterns":
        config = again.config
        assert (config["r"], config["lora_alpha"]) == (4, 8)
        assert config["rank_pattern"] == {
            "model.layers.0.mlp.up_proj": 6,
            "model.layers.1.self_attn.q_proj": 2,
            "model.layers.1.mlp.up_proj": 6,
        }
        assert set(config["alpha_pattern"]) == {
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.v_proj",
        }
    for module in adapter.module_names:
        assert again.scaling(module) == adapter.scaling(module)
        assert torch.equal(again.delta(module), adapter.delta(module))


def test_save_uniform_adapter_is_byte_faithful(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    for kind in ("plain", "rslora"):
        _, path = make_adapter(tiny_llama, tmp_path / kind, **KINDS[kind])
        out = save_adapter(
            tmp_path / f"{kind}-saved", dict(LoraAdapter.open(path).iter_factors()), base_model=None
        )
        original = (path / "adapter_model.safetensors").read_bytes()
        assert (out / "adapter_model.safetensors").read_bytes() == original
        config = json.loads((out / "adapter_config.json").read_text())
        want = KINDS[kind]
        assert (config["r"], config["lora_alpha"]) == (want["r"], want["lora_alpha"])
        assert config["use_rslora"] is bool(want.get("use_rslora"))
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
        assert config["target_modules"] == ["q_proj", "v_proj"]
        LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})  # valid for PEFT


def test_rslora_at_square_rank_is_saved_as_plain(
    tiny_llama: torch.nn.Module, tmp_path: Path
) -> None:
    _, path = make_adapter(tiny_llama, tmp_path / "rs4", **{**RSLORA, "r": 4})
    adapter = LoraAdapter.open(path)
    out = save_adapter(tmp_path / "saved", dict(adapter.iter_factors()), base_model=None)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 32, False)
    module = adapter.module_names[0]
    assert LoraAdapter.open(out).scaling(module) == adapter.scaling(module) == 8.0


def test_save_mixed_ranks_and_odd_scalings(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    """Per-module ranks and non-integral or negative scalings survive a PEFT load."""
    torch.manual_seed(3)
    layers = dict(tiny_llama.named_modules())
    plan = {
        "model.layers.0.self_attn.q_proj": (3, 0.37),
        "model.layers.1.self_attn.q_proj": (3, 0.1),
        "model.layers.0.mlp.down_proj": (5, -1.25),
        "model.layers.1.mlp.down_proj": (2, 2.0 / math.sqrt(7)),
    }
    factors = {}
    for module, (rank, scaling) in plan.items():
        out_f, in_f = layers[module].weight.shape
        factors[module] = LoraFactors(torch.randn(rank, in_f), torch.randn(out_f, rank), scaling)
    out = save_adapter(tmp_path / "mixed", factors, base_model=None, readme="# merged\n")
    assert (out / "README.md").read_text() == "# merged\n"
    adapter = LoraAdapter.open(out)
    assert adapter.module_names == sorted(plan, key=module_sort_key)
    for module, (rank, scaling) in plan.items():
        assert adapter.module_rank(module) == rank
        assert abs(adapter.scaling(module) - scaling) <= math.ulp(scaling)
    assert adapter.scaling("model.layers.0.mlp.down_proj") == -1.25  # representable: exact
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), out).eval()
    for module in factors:
        layer = peft_model.base_model.model.get_submodule(module)
        assert layer.scaling["default"] == adapter.scaling(module)
    expected = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for module, f in factors.items():
            expected.get_submodule(module).weight += f.delta()
    torch.testing.assert_close(logits(peft_model), logits(expected), atol=1e-5, rtol=0)


def test_save_partial_modules_targets_exactly_those(
    tiny_llama: torch.nn.Module, tmp_path: Path
) -> None:
    _, path = make_adapter(tiny_llama, tmp_path / "a", **PLAIN)
    adapter = LoraAdapter.open(path)
    only = "model.layers.1.self_attn.v_proj"
    out = save_adapter(tmp_path / "one", {only: adapter.factors(only)}, base_model=None)
    config = json.loads((out / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), out)
    wrapped = {n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {only}


def test_save_adapter_extra_config_and_replace(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    _, path = make_adapter(tiny_llama, tmp_path / "a", **PLAIN)
    factors = dict(LoraAdapter.open(path).iter_factors())
    out = tmp_path / "out"
    (out / "stale").mkdir(parents=True)
    save_adapter(out, factors, base_model="x", extra_config={"lorafuse": {"method": "ties"}})
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert json.loads((out / "adapter_config.json").read_text())["lorafuse"] == {"method": "ties"}
    with pytest.raises(ValueError, match="lora_alpha"):
        save_adapter(out, factors, base_model="x", extra_config={"lora_alpha": 1})
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------ compatibility
def test_different_target_modules_load_as_a_union(
    tiny_llama: torch.nn.Module, tmp_path: Path
) -> None:
    """Heterogeneous libraries: other targets are fine; a module one lacks is zero there."""
    _, a = make_adapter(tiny_llama, tmp_path / "a", **PLAIN)
    _, b = make_adapter(tiny_llama, tmp_path / "b", r=4, target_modules=["q_proj", "k_proj"])
    first, second = load_adapters([a, b])
    union = union_modules([first, second])
    assert set(union) == set(first.module_names) | set(second.module_names)
    v = "model.layers.0.self_attn.v_proj"
    zero, own = module_factors([second, first], v)
    assert not zero.delta().any() and zero.delta().shape == own.delta().shape


def test_different_base_model_names(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    _, a = make_adapter(tiny_llama, tmp_path / "a", **PLAIN)
    _, b = make_adapter(tiny_llama, tmp_path / "b", **PLAIN)
    _, c = make_adapter(tiny_llama, tmp_path / "c", **PLAIN)
    edit_config(a, base_model_name_or_path="org/one")
    edit_config(c, base_model_name_or_path="org/two")
    load_adapters([a, b])  # an unset name is not a conflict
    expect_error(c, "base_model_name_or_path", load_adapters, [a, b, c])


def test_different_ranks_are_compatible(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    _, a = make_adapter(tiny_llama, tmp_path / "a", **PLAIN)
    _, b = make_adapter(tiny_llama, tmp_path / "b", **{**PLAIN, "r": 2})
    adapters = load_adapters([a, b], base_model=tiny_llama)
    assert [x.module_rank("model.layers.0.self_attn.q_proj") for x in adapters] == [4, 2]


def test_module_shapes_differ_between_adapters(tmp_path: Path) -> None:
    module = "model.layers.0.self_attn.q_proj"
    a = save_adapter(
        tmp_path / "a",
        {module: LoraFactors(torch.ones(2, 32), torch.ones(32, 2), 1.0)},
        base_model=None,
    )
    b = save_adapter(
        tmp_path / "b",
        {module: LoraFactors(torch.ones(2, 48), torch.ones(32, 2), 1.0)},
        base_model=None,
    )
    expect_error(b, "(d_out, d_in)", load_adapters, [a, b])


def test_shape_mismatch_against_base_model(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    _, path = make_adapter(tiny_llama, tmp_path / "a", **PLAIN)
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(**{**tiny_llama.config.to_dict(), "hidden_size": 48}))
    expect_error(path, "base model", load_adapters, [path], base_model=wider)
    check_compatible([LoraAdapter.open(path)], tiny_llama)


def test_module_missing_or_not_linear_in_base_model(
    tiny_llama: torch.nn.Module, tmp_path: Path
) -> None:
    ghost = save_adapter(
        tmp_path / "ghost",
        {"model.layers.7.self_attn.q_proj": LoraFactors(torch.ones(2, 32), torch.ones(32, 2), 1.0)},
        base_model=None,
    )
    expect_error(
        ghost, "not found in the base model", load_adapters, [ghost], base_model=tiny_llama
    )
    norm = save_adapter(
        tmp_path / "norm",
        {"model.layers.0.input_layernorm": LoraFactors(torch.ones(2, 32), torch.ones(32, 2), 1.0)},
        base_model=None,
    )
    expect_error(norm, "nn.Linear", load_adapters, [norm], base_model=tiny_llama)


# ------------------------------------------------------------------------------ manifest
def build_library(tiny_llama: torch.nn.Module, root: Path) -> LibraryManifest:
    make_adapter(tiny_llama, root / "experts" / "qa", seed=1, **PLAIN)
    make_adapter(tiny_llama, root / "experts" / "sum", seed=2, **{**PLAIN, "r": 2})
    manifest = new_manifest(
        "org/tiny",
        [
            ExpertEntry(
                name="qa", path="experts/qa", tasks=["qa"], train={"steps": 10, "lr": 1e-3}
            ),
            ExpertEntry(
                name="sum",
                path="experts/sum",
                tasks=["sum", "qa"],
                kind="merged",
                metrics={"val_loss": 1.5},
            ),
        ],
        config={"seed": 0},
    )
    write_manifest(root, manifest)
    return manifest


def test_manifest_round_trip_and_open_library(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    manifest = build_library(tiny_llama, tmp_path)
    assert read_manifest(tmp_path) == manifest
    assert manifest.format_version == 1 and manifest.experts[0].kind == "private"
    loaded, adapters = open_library(tmp_path)
    assert loaded == manifest and list(adapters) == ["qa", "sum"]
    assert adapters["sum"].module_rank("model.layers.0.self_attn.q_proj") == 2
    _, merged_only = open_library(tmp_path, kinds={"merged"})
    assert list(merged_only) == ["sum"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(colour="red"), "colour: unknown field"),
        (lambda d: d["experts"][1].update(bogus=1), "experts.1.bogus: unknown field"),
        (lambda d: d["experts"][0].pop("tasks"), "experts.0.tasks: field required"),
        (
            lambda d: d["experts"][0].update(path="../outside"),
            "experts.0.path: must be a path inside",
        ),
        (lambda d: d["experts"][1].update(name="qa"), "duplicate expert name 'qa'"),
        (lambda d: d.update(format_version=2), "format_version: version 2 is not supported"),
    ],
)
def test_manifest_validation_errors(
    tiny_llama: torch.nn.Module, tmp_path: Path, edit: Any, message: str
) -> None:
    build_library(tiny_llama, tmp_path)
    path = tmp_path / "library.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    err = expect_error(path, message, read_manifest, tmp_path)
    assert str(err) == f"{path}: {message}" or str(err).startswith(f"{path}: {message}")


def test_manifest_missing_or_invalid(tmp_path: Path) -> None:
    expect_error(tmp_path / "library.json", "not found", read_manifest, tmp_path)
    (tmp_path / "library.json").write_text("[1,")
    expect_error(tmp_path / "library.json", "invalid JSON", read_manifest, tmp_path)
    expect_error(tmp_path / "absent", "not found", read_manifest, tmp_path / "absent")


def test_open_library_reports_missing_expert(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    build_library(tiny_llama, tmp_path)
    (tmp_path / "experts" / "sum" / "adapter_config.json").unlink()
    expect_error(
        tmp_path / "experts" / "sum" / "adapter_config.json", "not found", open_library, tmp_path
    )
