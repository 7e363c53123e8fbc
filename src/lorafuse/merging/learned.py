"""Merge coefficients learned on validation data, then exported as one exact LoRA.

* gradient descent (DAM / AdaMerging style): the mixture-of-LoRA layer applies
  ``W x + sum_k c_k B_k A_k x`` with ``c`` a parameter, one per expert (global) or one per
  expert per layer, so gradients reach the coefficients without forming merged weights.
  Objective: the answer-token loss, or (``objective="entropy"``, AdaMerging) the entropy
  of the next-token distribution where the answer starts, which needs no labels;
* gradient-free search (LoRAHub): validation loss + ``l1 * sum |c_k|`` minimised by
  scipy's Powell method within bounds, of LoRAHub's own composition ``compose="factors"``
  (``A = sum w_k A_k``, ``B = sum w_k B_k``: rank r, ``factor_methods.lorahub_compose``) or of
  the exact combination ``compose="full"`` (``sum w_k B_k A_k``).

The coefficients then give their merge (``compose="full"``: exact, ``concat_factors`` per
module with the module's layer's weights), which ``save_adapter`` writes as a PEFT adapter.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from tqdm.auto import tqdm

from lorafuse.core.encode import Batch, Encoded, collate
from lorafuse.core.fit import BatchLoss, fit_parameters, per_example_nll
from lorafuse.core.forward import target_logits
from lorafuse.core.mixture import ConstantMixer, FactorSet, layer_index, mixture_of_loras
from lorafuse.core.states import StateCache, pad_states
from lorafuse.errors import LorafuseError
from lorafuse.io import atomic_write_json
from lorafuse.library import (
    LoraAdapter,
    LoraFactors,
    module_factors,
    save_adapter,
    union_modules,
)
from lorafuse.merging.factor_methods import lorahub_compose
from lorafuse.merging.linear import concat_factors

Objective = Literal["loss", "entropy"]
Composition = Literal["full", "factors"]  # sum w_k B_k A_k, or (sum w_k B_k)(sum w_k A_k)


@dataclass
class LearnedCoefficients:
    """Coefficients (K,) or (L, K) over ``layers``, and the objective per step;
    ``compose``: how they combine the experts (see :data:`Composition`)."""

    coef: torch.Tensor
    layers: list[int]
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    compose: Composition = "full"

    def to_factors(self, adapters: Sequence[LoraAdapter]) -> dict[str, LoraFactors]:
        """The merge these coefficients define, one module at a time."""
        pos = {layer: i for i, layer in enumerate(self.layers)}
        combine = lorahub_compose if self.compose == "factors" else concat_factors
        out = {}
        for module in union_modules(adapters):
            w = self.coef[pos[layer_index(module)]] if self.coef.dim() == 2 else self.coef
            try:
                out[module] = combine(module_factors(adapters, module), w.tolist())
            except LorafuseError as err:
                raise LorafuseError(f"{module}: {err}") from None
        return out


def adapted_layers(adapters: Sequence[LoraAdapter]) -> list[int]:
    return sorted({layer_index(m) for m in union_modules(adapters)})


def objective_value(
    model: torch.nn.Module,
    states: Sequence[torch.Tensor],
    encoded: Sequence[Encoded],
    split: int,
    pad_id: int,
    objective: Objective,
) -> torch.Tensor:
    """Mean answer NLL per example, or mean entropy at each example's first answer position."""
    batch = collate(encoded, pad_id)
    device = next(model.parameters()).device
    return batch_objective(model, split, objective)(pad_states(states).to(device), batch).mean()


def batch_objective(model: torch.nn.Module, split: int, objective: Objective) -> BatchLoss:
    """Per-example answer NLL, or entropy of the next-token distribution at the first answer
    position (no labels needed)."""

    def loss(states: torch.Tensor, batch: Batch) -> torch.Tensor:
        logits = target_logits(model, states, batch, split)
        if objective == "loss":
            return per_example_nll(logits, batch)
        first = torch.ones_like(batch.rows, dtype=torch.bool)
        first[1:] = batch.rows[1:] != batch.rows[:-1]
        logp = F.log_softmax(logits[first.to(logits.device)], dim=-1)
        return -(logp.exp() * logp).sum(-1)

    return loss


def learn_coefficients(
    model: torch.nn.Module,
    adapters: Sequence[LoraAdapter],
    encoded: Sequence[Encoded],
    cache: StateCache,
    *,
    per_layer: bool = False,
    objective: Objective = "loss",
    steps: int = 40,
    lr: float = 0.1,
    batch_size: int = 16,
    seed: int = 0,
    init: float | None = None,
    progress: bool = True,
) -> LearnedCoefficients:
    """Gradient descent on merge coefficients (init 1/K each) over validation examples."""
    started = time.perf_counter()
    k, layers = len(adapters), adapted_layers(adapters)
    start = torch.full((len(layers), k) if per_layer else (k,), init or 1.0 / k)
    mixer = ConstantMixer(start, layers=layers if per_layer else None, trainable=True)
    with mixture_of_loras(model, adapters, mixer):
        history = fit_parameters(
            mixer.parameters(),
            batch_objective(model, cache.split, objective),
            encoded,
            cache,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            desc="learn coefficients",
            progress=progress,
        )
    return LearnedCoefficients(
        mixer.coef.detach().clone(), layers, history, time.perf_counter() - started
    )


@torch.no_grad()
def search_coefficients(
    model: torch.nn.Module,
    adapters: Sequence[LoraAdapter],
    encoded: Sequence[Encoded],
    cache: StateCache,
    *,
    compose: Composition = "factors",
    l1: float = 0.05,
    bounds: tuple[float, float] = (-1.5, 1.5),
    max_evals: int = 60,
    progress: bool = True,
) -> LearnedCoefficients:
    """LoRAHub: derivative-free search (Powell, from 1/K each) of global coefficients
    minimising the validation loss + ``l1 * sum |w_k|`` of the composition ``compose``."""
    started = time.perf_counter()
    k = len(adapters)
    states = cache.get(encoded, desc="coefficients: states")
    pad = cache.base.tokenizer.pad_token_id
    if compose == "factors":  # refuse mixed ranks before the first evaluation
        LearnedCoefficients(torch.ones(k), []).to_factors(adapters)
    history: list[float] = []
    bar = tqdm(total=max_evals, desc="search coefficients", disable=not progress)

    def loss(w: np.ndarray) -> float:
        value = composed_loss(model, adapters, w, compose, states, encoded, cache.split, pad)
        value += l1 * float(np.abs(w).sum())
        history.append(round(value, 5))
        bar.update(1)
        return value

    result = minimize(
        loss,
        np.full(k, 1.0 / k),
        method="Powell",
        bounds=[bounds] * k,
        options={"maxfev": max_evals, "xtol": 1e-2, "ftol": 1e-3},
    )
    bar.close()
    coef = torch.as_tensor(result.x, dtype=torch.float32)
    return LearnedCoefficients(
        coef, adapted_layers(adapters), history, time.perf_counter() - started, compose
    )


def composed_loss(
    model: torch.nn.Module,
    adapters: Sequence[LoraAdapter],
    w: np.ndarray | Sequence[float],
    compose: Composition,
    states: Sequence[torch.Tensor],
    encoded: Sequence[Encoded],
    split: int,
    pad_id: int,
) -> float:
    """Mean validation answer NLL of the experts combined by ``w`` as ``compose`` says."""
    coef = torch.as_tensor(np.asarray(w), dtype=torch.float32)
    if compose == "factors":
        composed = LearnedCoefficients(coef, [], compose="factors").to_factors(adapters)
        sources, mixer = [FactorSet("lorahub", composed)], ConstantMixer(torch.ones(1))
    else:
        sources, mixer = list(adapters), ConstantMixer(coef)
    with mixture_of_loras(model, sources, mixer):
        return objective_value(model, states, encoded, split, pad_id, "loss").item()


def learned_merge(
    model: torch.nn.Module,
    experts: Sequence[LoraAdapter],
    encoded: Sequence[Encoded],
    cache: StateCache,
    *,
    per_layer: bool = False,
    objective: Objective = "loss",
    search: bool = False,
    compose: Composition = "factors",
    steps: int = 40,
    lr: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> LearnedCoefficients:
    """Coefficients of ``experts`` learned on ``encoded`` (gradient descent, or LoRAHub
    search of the composition ``compose`` with ``search=True``, global and loss-only)."""
    if search:
        return search_coefficients(
            model, experts, encoded, cache, compose=compose, progress=progress
        )
    return learn_coefficients(
        model,
        experts,
        encoded,
        cache,
        per_layer=per_layer,
        objective=objective,
        steps=steps,
        lr=lr,
        seed=seed,
        progress=progress,
    )


def save_learned_merge(
    learned: LearnedCoefficients,
    experts: Mapping[str, LoraAdapter],
    out: str | Path,
    config: dict,
    *,
    base_model: str,
) -> Path:
    """Write the exact merge of ``experts`` (name -> adapter) as a PEFT adapter plus
    ``coefficients.json`` (atomically)."""
    names = list(experts)
    card = (
        f"# Learned merge of {len(names)} experts\n\nMade with lorafuse: {config}\n\n"
        "Coefficients (rows = layers when per layer): see `coefficients.json`.\n"
    )
    out = save_adapter(
        out, learned.to_factors(list(experts.values())), base_model=base_model, readme=card
    )
    atomic_write_json(
        out / "coefficients.json",
        {
            "experts": names,
            "layers": learned.layers,
            "coefficients": learned.coef.tolist(),
            "compose": learned.compose,
            "objective_history": learned.history,
            "seconds": learned.seconds,
            "config": config,
        },
    )
    return out
