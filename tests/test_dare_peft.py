"""DARE through the merge driver equals PEFT's ``add_weighted_adapter`` at density < 1, module
by module, when PEFT draws the same masks: the driver seeds each module from
``(seed, module name)``; PEFT draws from the global RNG, so each of its calls is reseeded with
the seed of the module whose deltas it is given."""

from __future__ import annotations

import copy

import peft.tuners.lora.model as peft_lora
import pytest
import torch
from peft import PeftModel

from lorafuse.merging import merge
from lorafuse.merging.merge import module_seed

SEED = 5


def same_mask_peft(monkeypatch, name: str, experts, weights_of) -> list[str]:
    """Reseed PEFT's global RNG before each ``name`` call with the driver's module seed."""
    real = getattr(peft_lora, name)
    called: list[str] = []

    def reseeded(deltas, weights, *args):
        module = next(
            m
            for m in experts[0].module_names
            if experts[0].delta(m).shape == deltas[0].shape
            and torch.allclose(experts[0].delta(m), deltas[0], atol=1e-6)
        )
        called.append(module)
        assert weights.tolist() == pytest.approx(weights_of)
        torch.manual_seed(module_seed(SEED, module))
        return real(deltas, weights, *args)

    monkeypatch.setattr(peft_lora, name, reseeded)
    return called


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_equals_peft_with_the_same_masks(
    tiny_llama, tiny_experts, monkeypatch, method: str, density: float
) -> None:
    weights = [0.7, -0.4, 1.2]
    called = same_mask_peft(monkeypatch, method, tiny_experts, weights)
    model = PeftModel.from_pretrained(
        copy.deepcopy(tiny_llama), str(tiny_experts[0].path), adapter_name="e0"
    )
    for i, e in enumerate(tiny_experts[1:], start=1):
        model.load_adapter(str(e.path), adapter_name=f"e{i}")
    # rank 16: exact for v_proj (16 x 32), the same truncation of q_proj and up_proj for both
    model.add_weighted_adapter(
        ["e0", "e1", "e2"],
        weights,
        "m",
        combination_type=f"{method}_svd",
        svd_rank=16,
        density=density,
    )
    settings = {"density": density, "rank": 16, "progress": False}
    ours = merge(tiny_experts, method, weights, seed=SEED, **settings)
    assert sorted(called) == sorted(tiny_experts[0].module_names)  # one reseeded call each
    for module in tiny_experts[0].module_names:
        want = model.get_submodule(f"base_model.model.{module}").get_delta_weight("m")
        got = ours[module].delta()
        if module.endswith("v_proj"):  # exact: entries every expert dropped are 0
            assert (want.abs() < 1e-6).float().mean() > 0.5 * (1 - density) ** 3
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # another seed draws other masks: the equality above is not one of unmasked merges
    other = merge(
        tiny_experts, method, weights, density=density, seed=SEED + 1, rank=64, progress=False
    )
    module = tiny_experts[0].module_names[0]
    assert not torch.allclose(other[module].delta(), ours[module].delta(), atol=1e-3)
