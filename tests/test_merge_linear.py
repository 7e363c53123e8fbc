"""lorafuse.merging.linear: the exact weighted sum of LoRA deltas as one stacked LoRA."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_merging import random_factors

from lorafuse.library import LoraAdapter, save_adapter
from lorafuse.merging import linear_merge
from lorafuse.merging.linear import concat_factors

INPUT_IDS = torch.tensor([[3, 17, 9, 88, 41, 5, 120, 64], [7, 7, 2, 99, 31, 11, 4, 60]])
TARGETS = ["q_proj", "v_proj", "up_proj"]


def test_concat_factors_is_weighted_sum_of_deltas() -> None:
    parts = [random_factors(2, 0.5, 0), random_factors(5, 3.0, 1), random_factors(1, 1 / 3, 2)]
    weights = [0.2, -1.5, 2.0]
    merged = concat_factors(parts, weights)
    assert merged.rank == 8 and merged.scaling == 1.0
    assert (merged.d_out, merged.d_in) == (12, 10)
    want = sum(w * (p.scaling * p.B @ p.A) for p, w in zip(parts, weights, strict=True))
    torch.testing.assert_close(merged.delta(), want, atol=1e-12, rtol=1e-12)
    # the inputs are not modified
    torch.testing.assert_close(parts[1].delta(), 3.0 * parts[1].B @ parts[1].A)


def test_concat_factors_weight_count_must_match() -> None:
    parts = [random_factors(2, 1.0, 0), random_factors(3, 1.0, 1)]
    with pytest.raises(ValueError):
        concat_factors(parts, [1.0])


def make_adapter(base: torch.nn.Module, path: Path, seed: int, r: int, alpha: float) -> Path:
    """A random (non-zero B) PEFT LoRA on a copy of ``base``, saved to ``path``."""
    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, r=r, lora_alpha=alpha, target_modules=TARGETS)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(path)
    return path


@pytest.fixture
def adapters(tiny_llama: torch.nn.Module, tmp_path: Path) -> list[LoraAdapter]:
    specs = [(1, 2, 4.0), (2, 4, 4.0), (3, 3, 7.0)]  # (seed, rank, alpha): different scalings
    paths = [make_adapter(tiny_llama, tmp_path / f"e{s}", s, r, a) for s, r, a in specs]
    return [LoraAdapter.open(p) for p in paths]


def model_with_deltas(
    base: torch.nn.Module, adapters: list[LoraAdapter], weights: list[float]
) -> torch.nn.Module:
    """A copy of ``base`` whose Linear weights get ``sum_k w_k delta_k`` added by hand."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for module in adapters[0].module_names:
            linear = model.get_submodule(module)
            for adapter, w in zip(adapters, weights, strict=True):
                f = adapter.factors(module)
                linear.weight += w * f.scaling * (f.B @ f.A)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


@pytest.mark.parametrize(
    ("k", "weights"), [(2, None), (3, [0.5, -0.25, 1.5]), (3, None)]
)  # fmt: skip
def test_linear_merge_through_peft_equals_hand_merged_weights(
    tiny_llama: torch.nn.Module,
    adapters: list[LoraAdapter],
    tmp_path: Path,
    k: int,
    weights: list[float] | None,
) -> None:
    """save_adapter(linear_merge(...)) loaded by PEFT == base weights + sum_k w_k delta_k."""
    chosen = adapters[:k]
    w = weights if weights is not None else [1.0 / k] * k
    merged = linear_merge(chosen, weights)
    assert set(merged) == set(chosen[0].module_names)
    assert len(merged) == 2 * 3  # 2 layers x 3 target modules
    rank = sum(a.module_rank(chosen[0].module_names[0]) for a in chosen)
    assert {f.rank for f in merged.values()} == {rank}
    for module in chosen[0].module_names:
        want = sum(wk * a.delta(module) for a, wk in zip(chosen, w, strict=True))
        torch.testing.assert_close(merged[module].delta(), want, atol=1e-6, rtol=1e-5)

    out = save_adapter(tmp_path / "merged", merged, base_model=chosen[0].base_model)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == rank and config["lora_alpha"] == rank  # scaling 1 folded into B
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(out)).eval()
    got = logits(peft_model)
    want_logits = logits(model_with_deltas(tiny_llama, chosen, w))
    torch.testing.assert_close(got, want_logits, atol=1e-5, rtol=1e-5)
    assert (got - logits(tiny_llama)).abs().max() > 1e-3  # the merge is not a no-op


def test_linear_merge_weight_count_must_match(adapters: list[LoraAdapter]) -> None:
    with pytest.raises(ValueError, match="2 weights for 3 adapters"):
        linear_merge(adapters, [0.5, 0.5])
