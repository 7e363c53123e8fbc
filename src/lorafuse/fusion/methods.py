"""This layer's fusion methods by name: builders from a workspace (+ parameters) to a
:class:`Fusion`, registered in ``fusion.registry`` (ELREA's are added by ``lorafuse.methods``).

Builders that learn something (coefficients, routers, ensemble weights) fit it on the
validation split of the workspace's tasks; the private experts are the library fused.
``STATIC_MERGES`` / ``RECENT_MERGES``: the settings of the ``merge`` method that ``compare``
scores as rows.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch

from lorafuse.core.fit import fit_parameters, per_example_nll
from lorafuse.core.mixture import (
    BatchMixer,
    ConstantMixer,
    FactorSet,
)
from lorafuse.errors import LorafuseError
from lorafuse.fusion.base import Ensemble, Fusion, installed
from lorafuse.fusion.data_merges import DATA_MERGES
from lorafuse.fusion.ensemble import fit_mixture_weights, target_log_probs
from lorafuse.fusion.hc import hierarchical
from lorafuse.fusion.registry import FusionMethod, build_fusion, fusion_method, register_fusion
from lorafuse.fusion.request_routing import REQUEST_ROUTING
from lorafuse.fusion.routers import ArrowRouter, LayerRouter
from lorafuse.fusion.seed_routing import SEED_ROUTING
from lorafuse.fusion.twin import twin, twin_group
from lorafuse.merging import merge
from lorafuse.merging.learned import adapted_layers, learned_merge
from lorafuse.merging.truncation import truncation_info
from lorafuse.workspace import Workspace

VAL = "val"


def static_merge(ws: Workspace, *, method: str = "linear", seed: int = 0, **params) -> Fusion:
    """Any registered merge method (see ``lorafuse methods``) as one source."""
    if "seed" in params or method.startswith("dare"):
        params.setdefault("seed", seed)
    lost: dict = {}
    factors = merge(list(ws.private.values()), method, progress=False, truncation=lost, **params)
    return Fusion(
        f"merge:{method}",
        "merging",
        [FactorSet(method, factors)],
        ConstantMixer(torch.ones(1)),
        info={"method": method, **params, **truncation_info(lost)},
    )


def learned_coefficients(
    ws: Workspace,
    *,
    per_layer: bool = False,
    objective: str = "loss",
    search: bool = False,
    compose: str = "full",
    steps: int = 40,
    lr: float = 0.1,
    seed: int = 0,
) -> Fusion:
    """Merge coefficients learned on validation data (gradient descent or LoRAHub search;
    ``compose="factors"``: LoRAHub's (sum w B)(sum w A), searched only)."""
    if compose == "factors" and not search:
        raise LorafuseError("compose='factors' (LoRAHub's composition) is searched: search=True")
    experts = list(ws.private.values())
    learned = learned_merge(
        ws.base.model,
        experts,
        ws.encoded(VAL),
        ws.cache,
        per_layer=per_layer,
        objective=objective,  # type: ignore[arg-type]
        search=search,
        compose=compose,  # type: ignore[arg-type]
        steps=steps,
        lr=lr,
        seed=seed,
        progress=False,
    )
    mixer = ConstantMixer(learned.coef, layers=learned.layers if per_layer else None)
    sources: list = experts
    if compose == "factors":  # one composed rank-r LoRA
        sources, mixer = (
            [FactorSet("lorahub", learned.to_factors(experts))],
            ConstantMixer(torch.ones(1)),
        )
    return Fusion(
        "learned",
        "merging",
        sources,
        mixer,
        info={
            "train_s": learned.seconds,
            "coefficients": learned.coef.tolist(),
            "compose": compose,
            "layers": learned.layers,
            "objective_history": learned.history,
        },
    )


def ensemble(
    ws: Workspace,
    *,
    mode: str = "prob",
    learn: bool = False,
    steps: int = 300,
    val_per_task: int | None = 25,
    seed: int = 0,
) -> Fusion:
    """Average the experts' outputs (probabilities or logits), uniform or learned weights."""
    if mode not in ("prob", "logit"):
        raise LorafuseError(f"ensemble mode must be 'prob' or 'logit', got {mode!r}")
    if learn and mode != "prob":
        raise LorafuseError("learned ensemble weights are fitted for mode=prob only")
    experts = list(ws.private.values())
    k = len(experts)
    weights = torch.full((k,), 1.0 / k)
    info: dict[str, Any] = {}
    if learn:
        started = time.perf_counter()
        val = [ws.encoded(VAL)[i] for i in ws.per_task(VAL, val_per_task)]
        lp, rows = target_log_probs(ws.base.model, experts, val, ws.cache)
        weights = fit_mixture_weights(lp, rows, steps=steps)
        info = {"train_s": time.perf_counter() - started, "weights": weights.tolist()}
    return Fusion(
        f"ensemble:{mode}",
        "ensembling",
        experts,
        BatchMixer(),
        ensemble=Ensemble(weights, mode),
        info=info,
    )


DISTIL_ITEMS = 400  # teacher expert-items per task


def ensemble_distilled(
    ws: Workspace,
    *,
    per_task: int = 50,
    steps: int = 100,
    lr: float = 3e-3,
    mode: str = "prob",
    seed: int = 0,
) -> Fusion:
    """The uniform ensemble distilled into one LoRA on training prompts (cached on disk).

    The teacher runs every expert on every prompt: ``per_task`` is capped at
    ``DISTIL_ITEMS // K`` (at least 4) prompts per task, so K = 48 distils on 8 per task.
    The student adapts the same top layers as the library (the state cache's split)."""
    from lorafuse.fusion.distill import distill
    from lorafuse.library import LoraAdapter
    from lorafuse.models import cache_root
    from lorafuse.training.config import TrainConfig
    from lorafuse.training.train import top_layers_at

    experts = list(ws.private.values())
    per_task = min(per_task, max(4, DISTIL_ITEMS // len(experts)))
    key = hashlib.sha1(
        f"{ws.library.resolve()}|{ws.base.fingerprint}|{per_task}|{steps}|{lr}|{mode}|{seed}".encode()
    ).hexdigest()[:16]
    out = cache_root() / "distilled" / key
    started = time.perf_counter()
    if not (out / "adapter_model.safetensors").is_file():
        train = [ws.encoded("train")[i] for i in ws.per_task("train", per_task)]
        top = top_layers_at(ws.base.model, ws.cache.split)
        config = TrainConfig(steps=steps, lr=lr, seed=seed, top_layers=top)
        distill(ws.base, experts, train, ws.cache, out, config, mode=mode)
    student = LoraAdapter.open(out)
    return Fusion(
        "ensemble_distilled",
        "ensembling",
        [student],
        ConstantMixer(torch.ones(1)),
        info={"train_s": time.perf_counter() - started, "path": str(out)},
    )


def arrow(ws: Workspace, *, top_k: int = 2, temperature: float = 0.1, seed: int = 0) -> Fusion:
    """Arrow routing over the private experts (per token, per module, training-free)."""
    return Fusion(
        "arrow",
        "routing",
        list(ws.private.values()),
        ArrowRouter(top_k=top_k, temperature=temperature),
        info={"top_k": top_k, "temperature": temperature},
    )


def learned_router(
    ws: Workspace,
    *,
    steps: int = 40,
    lr: float = 0.01,
    per_example: bool = True,
    top_k: int = 0,
    seed: int = 0,
) -> Fusion:
    """A linear router per layer on its input (per prompt, or per token), trained on
    validation loss with the experts frozen (``top_k`` > 0: k experts each, sparse)."""
    experts = list(ws.private.values())
    layers = adapted_layers(experts)
    hidden = ws.base.model.config.hidden_size
    torch.manual_seed(seed)
    router = LayerRouter(layers, hidden, len(experts), per_example=per_example, top_k=top_k)
    fusion = Fusion(
        "learned_router", "routing", experts, router, route=router.route, hooks=router.hooked
    )
    started = time.perf_counter()
    with installed(ws.base.model, fusion, ws.cache.split) as log_probs:
        history = fit_parameters(
            router.parameters(),
            lambda s, b: per_example_nll(log_probs(s, b), b, log_probs=True),
            ws.encoded(VAL),
            ws.cache,
            steps=steps,
            lr=lr,
            seed=seed,
            desc="learned router",
        )
    router.requires_grad_(False)
    fusion.info = {
        "train_s": time.perf_counter() - started,
        "steps": steps,
        "lr": lr,
        "top_k": top_k,
        "val_loss_first_last": [history[0], history[-1]],
    }
    return fusion


# Static merges of the private experts that ``compare`` scores: row -> (merge method, params);
# each row is the ``merge`` fusion method with those parameters.
STATIC_MERGES: dict[str, tuple[str, dict]] = {
    "uniform_average": ("linear", {}),  # exact full-rank mean of the deltas
    "lowrank_average": ("lowrank_average", {}),  # mean of A's and of B's (cross-terms)
    "task_arithmetic": ("task_arithmetic", {"scale": 0.3}),
    "ties": ("ties", {"density": 0.2, "scale": 1.0}),
    "dare_ties": ("dare_ties", {"density": 0.5, "scale": 1.0, "seed": 0}),
}
# The merges since 2024 (``lorafuse methods``), rows only when asked for
# (``run_compare(recent_merges=True)``, ``lorafuse compare --recent-merges``). Settings from
# each paper or its reference code; scale 0.3 (as task_arithmetic above) where a method adds
# the task vectors up, 1 where it averages them or sets the magnitude itself.
RECENT_MERGES: dict[str, tuple[str, dict]] = {
    "della": ("della", {"density": 0.5, "epsilon": 0.15, "seed": 0}),
    "della_linear": ("della_linear", {"density": 0.5, "epsilon": 0.15, "scale": 0.3}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.9, "gamma": 0.01, "scale": 0.3}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.9, "gamma": 0.01, "scale": 0.3}),
    "pcb": ("pcb", {"density": 0.1}),
    "tsv_m": ("tsv_m", {"scale": 1.0}),
    "tsv_c": ("tsv_c", {"scale": 0.3}),
    "iso_c": ("iso_c", {"scale": 1.0}),
    "iso_cts": ("iso_cts", {"scale": 1.0, "common_fraction": 0.8}),
    "knots": ("knots", {"density": 0.2, "scale": 0.6}),
    "core_space": ("core_space", {"inner": "ties", "density": 0.2}),
    "wudi": ("wudi", {}),
}


FUSION_METHODS: dict[str, FusionMethod] = {
    m.name: m
    for m in [
        fusion_method("merge", "merging", static_merge, open_params=True),
        fusion_method("learned_global", "merging", learned_coefficients),
        fusion_method("learned_per_layer", "merging", learned_coefficients, per_layer=True),
        fusion_method("lorahub", "merging", learned_coefficients, search=True, compose="factors"),
        fusion_method("lorahub_full", "merging", learned_coefficients, search=True),
        fusion_method("ensemble_prob", "ensembling", ensemble, mode="prob"),
        fusion_method("ensemble_logit", "ensembling", ensemble, mode="logit"),
        fusion_method("ensemble_learned", "ensembling", ensemble, mode="prob", learn=True),
        fusion_method("ensemble_distilled", "ensembling", ensemble_distilled),
        fusion_method("arrow", "routing", arrow),
        fusion_method("learned_router", "routing", learned_router),
        fusion_method("twin", "routing", twin),
        fusion_method("twin_group", "routing", twin_group),
        fusion_method("hc_arrow", "routing", hierarchical),
    ]
}

# the seed papers' data-driven merges and routers (issue 11), registered from their modules
_SEEDS = {**DATA_MERGES, **SEED_ROUTING, **REQUEST_ROUTING}
FUSION_METHODS.update({n: fusion_method(n, f, b, **d) for n, (f, b, d) in _SEEDS.items()})


register_fusion(FUSION_METHODS.values())  # this layer's own; ELREA's: lorafuse.methods


__all__ = [
    "FUSION_METHODS",
    "RECENT_MERGES",
    "STATIC_MERGES",
    "FusionMethod",
    "build_fusion",
]
