"""Sens-Merging (Liu et al., ACL 2025): per-layer, per-expert merge coefficients from
parameter sensitivity, for task arithmetic, TIES or DARE.

* **task-specific scaling**: the sensitivity of parameter ``theta`` of expert ``i`` on one of its
  task's examples ``x`` is the first-order loss change of removing its update,
  ``|tau_theta * dL_i(x)/dtheta|``; a layer's sensitivity ``S_i^l`` sums it over the layer's
  parameters and averages it over the task's calibration examples. Normalised within the
  expert, ``alpha_i^l = L * S_i^l / sum_l' S_i^l'`` (mean 1 over the L adapted layers);
* **cross-task scaling**: how well expert ``i`` agrees with expert ``j`` on ``j``'s data, from
  the L2 distance of their answer logits, ``d_ij = mean_x ||z_i(x) - z_j(x)||_2`` over
  ``x in D_j``; ``tau_i = mean_{j != i} exp(-d_ij / d_bar)`` (``d_bar`` the mean off-diagonal
  distance), so an expert whose outputs transfer to the other tasks gets a larger weight;
* the two are fused per layer by a softmax over experts with temperature ``T``:
  ``sigma^l = K * softmax_i(alpha_i^l * tau_i / T)`` (times K so that equal scores give the
  task-arithmetic weights 1 each), and the merge of layer ``l`` is the base method run with
  weights ``sigma^l`` (:func:`layerwise_merge`).

The seeds carry only the paper's abstract; the normalisations above (mean-1 layer scores,
``exp(-d / d_bar)`` alignment, the factor K) are this implementation's reading of its
method section and are listed in the README's deviations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from lorafuse.core.mixture import layer_index
from lorafuse.library import LoraAdapter, LoraFactors
from lorafuse.merging.merge import merge_module, module_seed
from lorafuse.merging.registry import get_method

__all__ = [
    "cross_task_scaling",
    "layerwise_merge",
    "sens_coefficients",
    "sensitivity_sum",
    "task_scaling",
]

Scaling = Literal["both", "task", "cross"]


def sensitivity_sum(delta: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_b sum_jk |delta_jk * (dL_b/dW)_jk|`` for one module over a batch, where the
    per-example weight gradient is ``g_b^T x_b`` (``x`` (B, T, d_in) the module's inputs,
    ``g`` (B, T, d_out) the loss gradient at its outputs, summed per example)."""
    grads = torch.einsum("bto,bti->boi", g.to(delta.dtype), x.to(delta.dtype))
    return (grads * delta).abs().sum()


def task_scaling(sens: torch.Tensor) -> torch.Tensor:
    """(K, L) layer sensitivities -> ``alpha``, each expert's row scaled to mean 1."""
    total = sens.sum(1, keepdim=True)
    layers = sens.shape[1]
    return torch.where(total > 0, layers * sens / total.clamp(min=1e-30), torch.ones_like(sens))


def cross_task_scaling(dist: torch.Tensor) -> torch.Tensor:
    """(K, K) logit distances ``d_ij`` (expert i vs expert j on j's data) -> ``tau`` (K,)."""
    k = dist.shape[0]
    if k == 1:
        return torch.ones(1, dtype=dist.dtype)
    off = ~torch.eye(k, dtype=torch.bool)
    d_bar = dist[off].mean()
    align = torch.exp(-dist / d_bar) if d_bar > 0 else torch.ones_like(dist)
    return (align * off).sum(1) / (k - 1)


def sens_coefficients(
    sens: torch.Tensor,
    dist: torch.Tensor,
    *,
    temperature: float = 1.0,
    scaling: Scaling = "both",
) -> torch.Tensor:
    """(L, K) coefficients ``sigma`` (module doc); ``scaling`` keeps only the task-specific or
    cross-task factor (the paper's ablation)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    k = sens.shape[0]
    alpha = task_scaling(sens) if scaling != "cross" else torch.ones_like(sens)
    tau = cross_task_scaling(dist) if scaling != "task" else torch.ones(k, dtype=sens.dtype)
    score = alpha * tau[:, None]  # (K, L)
    return (k * torch.softmax(score / temperature, dim=0)).T.contiguous()


def layerwise_merge(
    adapters: Sequence[LoraAdapter],
    method: str,
    coef: torch.Tensor,
    layers: Sequence[int],
    **params: Any,
) -> dict[str, LoraFactors]:
    """Any registered merge method with weights per layer: module ``m`` of layer ``l`` is
    merged with weights ``coef[layers.index(l)]`` (same seeds and validation as ``merge``)."""
    spec = get_method(method)
    parsed = spec.parse_params(params)
    pos = {layer: i for i, layer in enumerate(layers)}
    out = {}
    for module in adapters[0].module_names:
        w = coef[pos[layer_index(module)]].tolist()
        seed = module_seed(getattr(parsed, "seed", 0), module)
        out[module] = merge_module(
            spec, [a.factors(module) for a in adapters], w, parsed, seed=seed
        )
    return out
