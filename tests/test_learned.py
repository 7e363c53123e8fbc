"""Learned merge coefficients: gradient descent (loss, entropy), LoRAHub search (its own
composition and the full-rank one), export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from test_train import CONFIG, PATTERN, pattern_examples

from lorafuse.core.encode import Encoded
from lorafuse.core.mixture import ConstantMixer, FactorSet, mixture_of_loras
from lorafuse.core.states import StateCache
from lorafuse.errors import LorafuseError
from lorafuse.eval.harness import model_log_probs, score_examples
from lorafuse.library import LoraAdapter, LoraFactors, save_adapter
from lorafuse.merging.factor_methods import lorahub_compose
from lorafuse.merging.learned import (
    LearnedCoefficients,
    composed_loss,
    learn_coefficients,
    objective_value,
    search_coefficients,
)
from lorafuse.models import BaseModel
from lorafuse.training.train import train_adapter

SEP = 1  # ends every prompt, so the first answer token is predictable
OTHER = (5, 11, 3)
# The random tiny model's final norm bounds its logits (|logit| < 1): a larger head lets the
# experts become confident, so that mixing them matters.
HEAD_SCALE = 30.0
EXPERT_CONFIG = CONFIG.model_copy(
    update={
        "steps": 40,
        "lr": 0.05,
        "checkpoint_every": 100,
        "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    }
)


def examples(n: int, seed: int, pattern: tuple[int, ...] = PATTERN) -> list[Encoded]:
    """Random prompts ending in SEP, then ``pattern``."""
    raw = pattern_examples(n, seed=seed, pattern=(SEP, *pattern))
    return [Encoded(e.ids, e.prompt_len + 1) for e in raw]


@pytest.fixture
def cache(tiny_base: BaseModel) -> StateCache:
    with torch.no_grad():
        tiny_base.model.lm_head.weight.mul_(HEAD_SCALE)
    return StateCache(tiny_base, 1, persist=False, progress=False)


@pytest.fixture
def experts(tiny_base: BaseModel, cache: StateCache, tmp_path: Path) -> list[LoraAdapter]:
    """'good' learned the validation answer, 'other' a different one."""
    out = []
    for name, pattern in (("good", None), ("other", OTHER)):
        data = examples(16, seed=1) if pattern is None else examples(16, 2, pattern)
        train_adapter(tiny_base, data, cache, EXPERT_CONFIG, tmp_path / name, progress=False)
        out.append(LoraAdapter.open(tmp_path / name))
    return out


def mixture_loss(base: BaseModel, experts, encoded, cache, coef, layers=None) -> float:
    mixer = ConstantMixer(coef, layers=layers)
    with mixture_of_loras(base.model, experts, mixer), torch.no_grad():
        states = cache.get(encoded)
        return objective_value(base.model, states, encoded, cache.split, 0, "loss").item()


def test_learned_global_coefficients_beat_uniform(tiny_base, experts, cache) -> None:
    val = examples(16, seed=3)
    learned = learn_coefficients(
        tiny_base.model, experts, val, cache, steps=15, lr=0.1, batch_size=8, progress=False
    )
    assert learned.coef.shape == (2,) and learned.layers == [1]
    assert learned.coef[0] > 0.5 > learned.coef[1]  # moved towards the expert that knows
    uniform = mixture_loss(tiny_base, experts, val, cache, torch.tensor([0.5, 0.5]))
    got = mixture_loss(tiny_base, experts, val, cache, learned.coef)
    assert got < uniform - 0.05
    assert len(learned.history) == 15


def test_per_layer_coefficients_export_to_the_same_model(
    tiny_base, tiny_llama, experts, cache, tmp_path: Path
) -> None:
    """to_factors saved as a PEFT adapter scores exactly as the mixture with those weights."""
    val = examples(8, seed=3)
    learned = learn_coefficients(
        tiny_base.model, experts, val, cache, per_layer=True, steps=5, lr=0.1, progress=False
    )
    assert learned.coef.shape == (1, 2)
    save_adapter(tmp_path / "merged", learned.to_factors(experts), base_model="tiny")
    peft_model = PeftModel.from_pretrained(tiny_llama, str(tmp_path / "merged"))
    exported = score_examples(model_log_probs(peft_model, 1), val, cache)
    peft_model.unload()
    with mixture_of_loras(tiny_base.model, experts, ConstantMixer(learned.coef, layers=[1])):
        mixed = score_examples(model_log_probs(tiny_base.model, 1), val, cache)
    assert exported.loss == pytest.approx(mixed.loss, abs=1e-5)


def test_entropy_objective_needs_no_labels_and_sharpens(tiny_base, experts, cache) -> None:
    val = examples(16, seed=3)
    states = cache.get(val)

    def entropy(coef: torch.Tensor) -> float:
        with mixture_of_loras(tiny_base.model, experts, ConstantMixer(coef)), torch.no_grad():
            return objective_value(tiny_base.model, states, val, 1, 0, "entropy").item()

    learned = learn_coefficients(
        tiny_base.model,
        experts,
        val,
        cache,
        objective="entropy",
        steps=10,
        lr=0.1,
        progress=False,
    )
    assert entropy(learned.coef) < entropy(torch.tensor([0.5, 0.5])) - 0.05


def test_lorahub_search_lowers_penalised_loss(tiny_base, experts, cache) -> None:
    val = examples(16, seed=3)
    found = search_coefficients(
        tiny_base.model, experts, val, cache, compose="full", l1=0.01, max_evals=40, progress=False
    )
    assert found.compose == "full"
    assert isinstance(found, LearnedCoefficients) and found.coef.shape == (2,)
    assert (found.coef.abs() <= 1.5 + 1e-6).all()  # within the default bounds
    start = mixture_loss(tiny_base, experts, val, cache, torch.tensor([0.5, 0.5])) + 0.01
    best = mixture_loss(tiny_base, experts, val, cache, found.coef) + 0.01 * found.coef.abs().sum()
    assert best < start - 0.05
    assert found.coef[0] > found.coef[1]


def test_lorahub_compose_against_hand_computation() -> None:
    """(sum w s B)(sum w A), rank r, and not the exact sum of w B A."""
    gen = torch.Generator().manual_seed(0)
    parts = [
        LoraFactors(
            A=torch.randn(2, 5, generator=gen), B=torch.randn(4, 2, generator=gen), scaling=s
        )
        for s in (0.5, 2.0)
    ]
    w = [0.7, -0.4]
    got = lorahub_compose(parts, w)
    a = w[0] * parts[0].A + w[1] * parts[1].A
    b = w[0] * 0.5 * parts[0].B + w[1] * 2.0 * parts[1].B
    assert got.rank == 2
    torch.testing.assert_close(got.delta(), b @ a)
    full = sum(wk * p.scaling * p.B @ p.A for p, wk in zip(parts, w, strict=True))
    assert (got.delta() - full).abs().max() > 0.1  # the cross-terms and w_k^2 on the diagonal
    # one expert alone with weight 1 gives it back
    torch.testing.assert_close(lorahub_compose(parts[:1], [1.0]).delta(), parts[0].delta())
    mixed = LoraFactors(
        A=torch.randn(3, 5, generator=gen), B=torch.randn(4, 3, generator=gen), scaling=1.0
    )
    with pytest.raises(LorafuseError, match="ranks"):
        lorahub_compose([parts[0], mixed], [0.5, 0.5])


def test_lorahub_composition_search_lowers_penalised_loss(tiny_base, experts, cache) -> None:
    val = examples(16, seed=3)
    states = cache.get(val)
    found = search_coefficients(
        tiny_base.model, experts, val, cache, l1=0.01, max_evals=40, progress=False
    )
    assert found.compose == "factors" and found.coef.shape == (2,)

    def penalised(w: torch.Tensor) -> float:
        return composed_loss(tiny_base.model, experts, w.numpy(), "factors", states, val, 1, 0) + (
            0.01 * float(w.abs().sum())
        )

    assert penalised(found.coef) < penalised(torch.tensor([0.5, 0.5])) - 0.05
    assert found.coef[0].abs() > found.coef[1].abs()
    # the exported merge is the composed rank-r LoRA, and scores as the search saw it
    merged = found.to_factors(experts)
    module = next(iter(merged))
    ranks = {f.rank for f in merged.values()}
    assert ranks == {experts[0].factors(module).rank}
    with mixture_of_loras(tiny_base.model, [FactorSet("m", merged)], ConstantMixer(torch.ones(1))):
        with torch.no_grad():
            got = objective_value(tiny_base.model, states, val, 1, 0, "loss").item()
    assert got + 0.01 * float(found.coef.abs().sum()) == pytest.approx(
        penalised(found.coef), abs=1e-5
    )
