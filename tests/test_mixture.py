"""The mixture-of-LoRA layer against PEFT: one-hot = that expert, constant = the merge,
per-item weights in one batch = each item alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from lorafuse.core.mixture import BatchMixer, ConstantMixer, mixture_of_loras
from lorafuse.library import LoraAdapter, save_adapter
from lorafuse.merging.linear import concat_factors, linear_merge

IDS = torch.tensor([[3, 17, 9, 88, 41, 5], [7, 7, 2, 99, 31, 11], [1, 2, 3, 4, 5, 6]])


@pytest.fixture
def experts(tiny_experts) -> list[LoraAdapter]:
    return tiny_experts


def _peft_logits(model, path: Path) -> torch.Tensor:
    peft_model = PeftModel.from_pretrained(model, str(path))
    try:
        with torch.no_grad():
            return peft_model(IDS).logits
    finally:
        peft_model.unload()


def _mixture_logits(model, experts, mixer) -> torch.Tensor:
    with mixture_of_loras(model, experts, mixer), torch.no_grad():
        return model(IDS).logits


def test_one_hot_weights_equal_that_expert(tiny_llama, experts) -> None:
    for k, expert in enumerate(experts):
        one_hot = torch.nn.functional.one_hot(torch.tensor(k), len(experts)).float()
        got = _mixture_logits(tiny_llama, experts, ConstantMixer(one_hot))
        torch.testing.assert_close(got, _peft_logits(tiny_llama, expert.path), atol=1e-5, rtol=0)


def test_constant_weights_equal_full_rank_merge(tiny_llama, experts, tmp_path: Path) -> None:
    w = [0.5, -0.3, 1.2]
    save_adapter(tmp_path / "merged", linear_merge(experts, w), base_model=None)
    got = _mixture_logits(tiny_llama, experts, ConstantMixer(torch.tensor(w)))
    torch.testing.assert_close(
        got, _peft_logits(tiny_llama, tmp_path / "merged"), atol=1e-5, rtol=0
    )


def test_per_layer_weights_equal_per_layer_merge(tiny_llama, experts, tmp_path: Path) -> None:
    w = torch.tensor([[0.2, 0.7, -0.1], [1.0, 0.0, 0.5]])
    merged = {
        m: concat_factors([e.factors(m) for e in experts], w[int(m.split(".")[2])].tolist())
        for m in experts[0].module_names
    }
    save_adapter(tmp_path / "merged", merged, base_model=None)
    got = _mixture_logits(tiny_llama, experts, ConstantMixer(w, layers=[0, 1]))
    torch.testing.assert_close(
        got, _peft_logits(tiny_llama, tmp_path / "merged"), atol=1e-5, rtol=0
    )


def assert_batch_equals_items_alone(model, experts, weights: torch.Tensor) -> None:
    """Per-item weights in one batch give each item's logits when run alone."""
    mixer = BatchMixer()
    mixer.current = weights
    batched = _mixture_logits(model, experts, mixer)
    for i in range(len(IDS)):
        with mixture_of_loras(model, experts, ConstantMixer(weights[i])), torch.no_grad():
            alone = model(IDS[i : i + 1]).logits
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=0)


def test_per_item_weights_equal_each_item_alone(tiny_llama, experts) -> None:
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, -1.0, 2.0]])
    assert_batch_equals_items_alone(tiny_llama, experts, weights)


def test_model_restored_after_mixture(tiny_llama, experts) -> None:
    with torch.no_grad():
        before = tiny_llama(IDS).logits
    with mixture_of_loras(tiny_llama, experts, ConstantMixer(torch.ones(3))) as layers:
        assert len(layers) == len(experts[0].module_names)
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(IDS).logits, before, atol=0, rtol=0)
    assert all(type(m).__name__ != "MixtureLinear" for m in tiny_llama.modules())


def test_hard_routing_per_item_equals_each_item_alone(tiny_llama, experts) -> None:
    """One expert per item (scaled, and one item with none): the gathered fast path."""
    weights = torch.tensor([[0.0, 0.7, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert_batch_equals_items_alone(tiny_llama, experts, weights)
