"""Merges that read the model on each expert's own data: RegMean / PLeaS least squares,
Sens-Merging and DAM (the math is in ``lorafuse.merging``; here the statistics are collected).

* :func:`expert_grams`: each expert's Gram matrices ``X^T X`` of every adapted module's inputs,
  with that expert installed, on its own task's validation examples (non-pad tokens);
* :func:`expert_sensitivities`: Sens-Merging's layer sensitivities ``S_i^l``, from per-example
  weight gradients ``g_b^T x_b`` captured by hooks on the adapted modules;
* :func:`logit_distances`: ``d_ij``, the mean L2 distance of expert i's answer logits from
  expert j's on j's data.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from lorafuse.core.encode import Encoded, collate
from lorafuse.core.fit import per_example_nll
from lorafuse.core.forward import target_logits
from lorafuse.core.mixture import (
    ConstantMixer,
    FactorSet,
    FactorSource,
    layer_index,
    mixture_of_loras,
)
from lorafuse.core.states import StateCache, pad_states
from lorafuse.fusion.base import Fusion
from lorafuse.fusion.ensemble import expert_passes
from lorafuse.merging.dam import train_dam
from lorafuse.merging.learned import adapted_layers
from lorafuse.merging.least_squares import regmean as regmean_module
from lorafuse.merging.sensitivity import layerwise_merge, sens_coefficients, sensitivity_sum
from lorafuse.workspace import Workspace

CHUNK = 8  # examples per forward while collecting statistics


def own_data(ws: Workspace, per_task: int | None, split: str = "val") -> list[list[Encoded]]:
    """Each private expert's own tasks' examples of ``split``, at most ``per_task`` each."""
    encoded, keep = ws.encoded(split), set(ws.per_task(split, per_task))
    return [[encoded[i] for i in idx if i in keep] for idx in ws.own_subsets(split).values()]


def _chunks(items: Sequence[Encoded]) -> list[list[Encoded]]:
    return [list(items[i : i + CHUNK]) for i in range(0, len(items), CHUNK)]


def _gram_hook(name: str, grams: dict[str, torch.Tensor], valid: list[torch.Tensor]):
    """Forward hook adding ``x^T x`` of the module's non-pad inputs to ``grams[name]``."""

    def hook(module, inputs, output) -> None:
        x = inputs[0][valid[0].to(inputs[0].device)].to(torch.float64)
        g = (x.T @ x).cpu()
        grams[name] = grams[name] + g if name in grams else g

    return hook


def _grad_hook(name: str, seen: dict[str, list[torch.Tensor]]):
    """Forward hook keeping the module's input, then (backward) the gradient at its output."""

    def hook(module, inputs, output) -> None:
        kept = seen[name] = [inputs[0].detach()]
        output.register_hook(lambda grad: kept.append(grad.detach()))

    return hook


@torch.no_grad()
def expert_grams(
    model: torch.nn.Module,
    experts: Sequence[FactorSource],
    data: Sequence[Sequence[Encoded]],
    cache: StateCache,
) -> list[dict[str, torch.Tensor]]:
    """Per expert, ``{module: X^T X}`` (float64) of its inputs with that expert installed."""
    pad = cache.base.tokenizer.pad_token_id
    out = []
    for expert, encoded in zip(experts, data, strict=True):
        states = cache.get(encoded, desc="regmean: states")
        grams: dict[str, torch.Tensor] = {}
        valid: list[torch.Tensor] = []  # the current batch's (B, T) non-pad mask
        with mixture_of_loras(model, [expert], ConstantMixer(torch.ones(1))) as layers:
            handles = [
                layer.register_forward_hook(_gram_hook(n, grams, valid))
                for n, layer in layers.items()
            ]
            try:
                for start in range(0, len(encoded), CHUNK):
                    chunk = list(encoded[start : start + CHUNK])
                    batch = collate(chunk, pad)
                    padded = pad_states(states[start : start + CHUNK])
                    valid[:] = [torch.arange(padded.shape[1])[None, :] < batch.lengths[:, None]]
                    target_logits(model, padded, batch, cache.split)
            finally:
                for h in handles:
                    h.remove()
        out.append(grams)
    return out


def expert_sensitivities(
    model: torch.nn.Module,
    experts: Sequence[FactorSource],
    data: Sequence[Sequence[Encoded]],
    cache: StateCache,
    layers: Sequence[int],
) -> torch.Tensor:
    """(K, L) ``S_i^l``: mean over expert i's examples of ``sum |delta * dL/dW|`` per layer."""
    pad = cache.base.tokenizer.pad_token_id
    pos = {layer: i for i, layer in enumerate(layers)}
    sens = torch.zeros(len(experts), len(layers), dtype=torch.float64)
    for k, (expert, encoded) in enumerate(zip(experts, data, strict=True)):
        states = cache.get(encoded, desc="sens-merging: states")
        deltas = {m: expert.factors(m).delta().to(torch.float64) for m in expert.module_names}
        seen: dict[str, list[torch.Tensor]] = {}
        mixer = ConstantMixer(torch.ones(1), trainable=True)  # outputs need gradients
        with mixture_of_loras(model, [expert], mixer) as mods:
            handles = [m.register_forward_hook(_grad_hook(n, seen)) for n, m in mods.items()]
            try:
                for start in range(0, len(encoded), CHUNK):
                    chunk = list(encoded[start : start + CHUNK])
                    batch = collate(chunk, pad)
                    padded = pad_states(states[start : start + CHUNK])
                    logits = target_logits(model, padded, batch, cache.split)
                    per_example_nll(logits, batch).sum().backward()
                    for name, (x, g) in seen.items():
                        term = sensitivity_sum(deltas[name], x.cpu(), g.cpu())
                        sens[k, pos[layer_index(name)]] += float(term)
                    seen.clear()
            finally:
                for h in handles:
                    h.remove()
        sens[k] /= max(len(encoded), 1)
    return sens


@torch.no_grad()
def logit_distances(
    model: torch.nn.Module,
    experts: Sequence[FactorSource],
    data: Sequence[Sequence[Encoded]],
    cache: StateCache,
) -> torch.Tensor:
    """(K, K) ``d_ij``: mean over answer positions of j's data of ``||z_i - z_j||_2``."""
    k = len(experts)
    dist = torch.zeros(k, k, dtype=torch.float64)
    for j, encoded in enumerate(data):
        total, count = torch.zeros(k, dtype=torch.float64), 0
        for _, _, logits in expert_passes(model, experts, list(encoded), cache):
            total += (logits - logits[j]).norm(dim=-1).sum(1).to(torch.float64).cpu()
            count += logits.shape[1]
        dist[:, j] = total / max(count, 1)
    return dist


def _merged(name: str, modules: dict, info: dict[str, Any]) -> Fusion:
    return Fusion(
        name, "merging", [FactorSet(name, modules)], ConstantMixer(torch.ones(1)), info=info
    )


def regmean(
    ws: Workspace, *, alpha: float = 0.9, per_task: int = 25, scale: float = 1.0, seed: int = 0
) -> Fusion:
    """RegMean / PLeaS: least-squares delta reproducing each expert's outputs on its inputs.

    Closed form from the Gram matrices of each expert's own validation inputs per module."""
    started = time.perf_counter()
    experts = list(ws.private.values())
    grams = expert_grams(ws.base.model, experts, own_data(ws, per_task), ws.cache)
    modules = {
        m: regmean_module(
            [e.factors(m) for e in experts], [g[m] for g in grams], alpha=alpha, scale=scale
        )
        for m in experts[0].module_names
    }
    return _merged("regmean", modules, {"train_s": time.perf_counter() - started, "alpha": alpha})


def sens_merging(
    ws: Workspace,
    *,
    base: str = "task_arithmetic",
    scale: float | None = None,
    density: float | None = None,
    temperature: float = 1.0,
    scaling: str = "both",
    per_task: int = 16,
    seed: int = 0,
) -> Fusion:
    """Sens-Merging: per-layer coefficients from gradient x delta and logit alignment.

    The coefficients weigh a base merge (task_arithmetic, ties, dare_ties, ...)."""
    started = time.perf_counter()
    params: dict[str, Any] = {"scale": scale, "density": density}
    params = {k: v for k, v in params.items() if v is not None}
    experts = list(ws.private.values())
    layers = adapted_layers(experts)
    data = own_data(ws, per_task)
    sens = expert_sensitivities(ws.base.model, experts, data, ws.cache, layers)
    dist = logit_distances(ws.base.model, experts, data, ws.cache)
    coef = sens_coefficients(sens, dist, temperature=temperature, scaling=scaling)  # type: ignore[arg-type]
    if base.startswith("dare") or base in ("della", "della_linear"):
        params.setdefault("seed", seed)
    modules = layerwise_merge(experts, base, coef, layers, **params)
    info = {
        "train_s": time.perf_counter() - started,
        "base": base,
        **params,
        "coefficients": coef.tolist(),
    }
    return _merged(f"sens_merging:{base}", modules, info)


def dam(
    ws: Workspace,
    *,
    steps: int = 40,
    lr: float = 0.05,
    cos_weight: float = 0.01,
    per_task: int = 16,
    seed: int = 0,
) -> Fusion:
    """DAM: per-column coefficients per expert, trained on KL to each expert (exact LoRA).

    Objective: KL of the merged model to each expert on its own data, plus DAM's cosine
    regulariser on the coefficient vectors."""
    experts = list(ws.private.values())
    data = own_data(ws, per_task)
    encoded = [e for part in data for e in part]
    owner = [k for k, part in enumerate(data) for _ in part]
    result = train_dam(
        ws.base.model, experts, encoded, owner, ws.cache,
        steps=steps, lr=lr, cos_weight=cos_weight, seed=seed,
    )  # fmt: skip
    info = {
        "train_s": result.seconds,
        "objective_first_last": [result.history[0], result.history[-1]],
    }
    return _merged("dam", result.to_factors(experts), info)


# registration: merged into FUSION_METHODS by one line in fusion/methods.py
# name -> (family, builder, defaults)
DATA_MERGES: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "regmean": ("merging", regmean, {}),
    "sens_merging": ("merging", sens_merging, {"base": "task_arithmetic", "scale": 0.3}),
    "sens_merging_ties": ("merging", sens_merging, {"base": "ties", "density": 0.2}),
    "sens_merging_dare": ("merging", sens_merging, {"base": "dare_ties", "density": 0.5}),
    "dam": ("merging", dam, {}),
}
