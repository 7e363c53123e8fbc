"""lorafuse.merging driver on PEFT adapters: weighted sums, every method through the driver,
and equivalence with PEFT's ``add_weighted_adapter`` (the merged adapter loads in PEFT)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lorafuse.errors import LorafuseError
from lorafuse.library import LoraAdapter, save_adapter
from lorafuse.merging import (
    MERGE_METHODS,
    compress_dense,
    merge,
)
from lorafuse.merging.registry import DenseParams

INPUT_IDS = torch.tensor([[3, 17, 9, 88, 41, 5, 120, 64], [7, 7, 2, 99, 31, 11, 4, 60]])
TARGETS = ["q_proj", "v_proj"]  # q_proj is 32 x 32, v_proj 16 x 32 in the tiny Llama


# ------------------------------------------------------------------- adapters and driver
def make_adapter(base: torch.nn.Module, path: Path, seed: int, r: int, alpha: float) -> Path:
    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, r=r, lora_alpha=alpha, target_modules=TARGETS)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(path)
    return path


SPECS = [(1, 4, 8.0), (2, 4, 4.0), (3, 2, 7.0)]  # (seed, rank, alpha): two of equal rank


@pytest.fixture
def adapter_paths(tiny_llama: torch.nn.Module, tmp_path: Path) -> list[Path]:
    return [make_adapter(tiny_llama, tmp_path / f"e{s}", s, r, a) for s, r, a in SPECS]


@pytest.fixture
def adapters(adapter_paths: list[Path]) -> list[LoraAdapter]:
    return [LoraAdapter.open(p) for p in adapter_paths]


def test_linear_and_task_arithmetic_are_weighted_sums(adapters: list[LoraAdapter]) -> None:
    w = [0.5, -0.25, 1.5]
    lin = merge(adapters, "linear", w, progress=False)
    ta = merge(adapters, "task_arithmetic", scale=0.3, progress=False)  # weights default 1
    mean = merge(adapters, "linear", progress=False)  # weights default 1/K
    for module in adapters[0].module_names:
        deltas = [a.delta(module) for a in adapters]
        assert lin[module].rank == 10  # exact: sum of ranks
        want = sum(wk * d for wk, d in zip(w, deltas, strict=True))
        torch.testing.assert_close(lin[module].delta(), want)
        torch.testing.assert_close(ta[module].delta(), 0.3 * sum(deltas))
        torch.testing.assert_close(mean[module].delta(), sum(deltas) / 3)
    # with a rank: the best rank-3 approximation of the same sum
    low = merge(adapters, "linear", w, rank=3, progress=False)
    module = adapters[0].module_names[0]
    want = compress_dense(lin[module].delta(), 3).delta()
    assert low[module].rank == 3
    torch.testing.assert_close(low[module].delta(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_method_runs_through_the_driver(adapters: list[LoraAdapter], method: str) -> None:
    """Output covers every module with the documented rank, deterministically."""
    chosen = adapters[:2] if method == "lowrank_average" else adapters
    params = {"density": 0.5} if "density" in MERGE_METHODS[method].params.model_fields else {}
    a = merge(chosen, method, progress=False, **params)
    b = merge(chosen, method, progress=False, **params)
    assert list(a) == chosen[0].module_names
    for module, f in a.items():
        assert torch.equal(f.A, b[module].A) and torch.equal(f.B, b[module].B)
        expected = {"linear": 10, "task_arithmetic": 10, "lowrank_average": 4}.get(method, 10)
        assert f.rank == expected and f.scaling == 1.0
        assert (f.d_out, f.d_in) == chosen[0].module_shape(module)
    with pytest.raises(LorafuseError, match="got 1 weights for"):
        merge(chosen, method, [1.0], progress=False, **params)


def test_dare_driver_seeds_per_module(adapters: list[LoraAdapter]) -> None:
    a = merge(adapters, "dare_linear", density=0.5, seed=1, rank=32, progress=False)
    b = merge(adapters, "dare_linear", density=0.5, seed=2, rank=32, progress=False)
    q0, q1 = (n for n in adapters[0].module_names if n.endswith("q_proj"))
    assert not torch.allclose(a[q0].delta(), b[q0].delta())  # another seed, other masks
    # rank 32 is full rank for q_proj (32 x 32): entries all experts dropped stay ~0, and the
    # two layers' masks differ (seeded from the module name, not shared)
    zeros0, zeros1 = (a[q].delta().abs() < 1e-5 for q in (q0, q1))
    assert zeros0.any() and not torch.equal(zeros0, zeros1)


def test_gram_is_the_default_and_matches_full_through_the_driver(
    adapters: list[LoraAdapter],
) -> None:
    assert DenseParams().svd == "gram"
    gram = merge(adapters, "ties", density=0.5, rank=3, progress=False)
    full = merge(adapters, "ties", density=0.5, rank=3, svd="full", progress=False)
    rand = merge(adapters, "ties", density=0.5, rank=3, svd="randomized", progress=False)
    for module, f in gram.items():
        torch.testing.assert_close(f.delta(), full[module].delta(), atol=1e-5, rtol=0)
        assert rand[module].rank == 3


# ------------------------------------------------------------------- equivalence with PEFT
def peft_with_adapters(base: torch.nn.Module, paths: list[Path]) -> PeftModel:
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name="e0")
    for i, p in enumerate(paths[1:], start=1):
        model.load_adapter(str(p), adapter_name=f"e{i}")
    return model


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize(
    ("combination", "method", "params", "svd_rank"),
    [
        ("svd", "linear", {}, 16),  # 16 >= sum of ranks: exact
        ("svd", "linear", {}, 4),  # truncated: factor-space SVD vs PEFT's dense SVD
        ("ties_svd", "ties", {"density": 0.5}, 16),
        ("dare_linear_svd", "dare_linear", {"density": 1.0}, 16),
        ("dare_ties_svd", "dare_ties", {"density": 1.0}, 16),
        ("magnitude_prune_svd", "magnitude", {"density": 0.25}, 16),
        ("linear", "lowrank_average", {"weighting": "sqrt"}, None),
    ],
)
def test_equals_peft_add_weighted_adapter(
    tiny_llama: torch.nn.Module,
    adapter_paths: list[Path],
    adapters: list[LoraAdapter],
    combination: str,
    method: str,
    params: dict[str, Any],
    svd_rank: int | None,
) -> None:
    """Our merged delta == PEFT's new adapter's delta, module by module.

    svd_rank 16 is full rank for v_proj (16 x 32) and truncates q_proj (32 x 32) for the
    elementwise methods, so truncation is compared too. PEFT's non-SVD "linear" needs equal
    ranks: the first two adapters.
    """
    k = 2 if combination == "linear" else 3
    weights = [0.7, -0.4, 1.2][:k]
    model = peft_with_adapters(tiny_llama, adapter_paths[:k])
    model.add_weighted_adapter(
        [f"e{i}" for i in range(k)],
        weights,
        "m",
        combination_type=combination,
        svd_rank=svd_rank,
        density=params.get("density"),
    )
    ours = merge(adapters[:k], method, weights, rank=svd_rank, progress=False, **params)
    for module in adapters[0].module_names:
        layer = model.get_submodule(f"base_model.model.{module}")
        want = layer.get_delta_weight("m")
        torch.testing.assert_close(ours[module].delta(), want, atol=1e-5, rtol=1e-5)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def test_merged_adapter_loads_in_peft(
    tiny_llama: torch.nn.Module, adapters: list[LoraAdapter], tmp_path: Path
) -> None:
    merged = merge(adapters, "ties", [1.0, 0.5, 2.0], density=0.4, rank=6, progress=False)
    out = save_adapter(tmp_path / "merged", merged, base_model=adapters[0].base_model)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(out)).eval()
    by_hand = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for module, f in merged.items():
            by_hand.get_submodule(module).weight += f.delta()
    got = logits(peft_model)
    torch.testing.assert_close(got, logits(by_hand), atol=1e-5, rtol=1e-5)
    assert (got - logits(tiny_llama)).abs().max() > 1e-3
