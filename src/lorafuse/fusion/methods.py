"""Every fusion method by name: a builder from a workspace (+ parameters) to a :class:`Fusion`.

Builders that learn something (coefficients, routers, ensemble weights) fit it on the
validation split of the workspace's tasks; the private experts are the library fused.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lorafuse.core.fit import fit_parameters, per_example_nll
from lorafuse.core.mixture import (
    BatchMixer,
    ConstantMixer,
    FactorSet,
    mixture_of_loras,
)
from lorafuse.errors import LorafuseError
from lorafuse.fusion.base import Ensemble, Fusion, installed
from lorafuse.fusion.data_merges import DATA_MERGES
from lorafuse.fusion.ensemble import fit_mixture_weights, target_log_probs
from lorafuse.fusion.hc import cluster_experts, merged_clusters
from lorafuse.fusion.routers import ArrowRouter, LayerRouter
from lorafuse.fusion.seed_routing import SEED_ROUTING
from lorafuse.fusion.twin import GroupWeights, feature_table, shared_features, train_router
from lorafuse.fusion.twin import twin_sources as make_twin_sources
from lorafuse.merging import merge
from lorafuse.merging.learned import adapted_layers, learned_merge
from lorafuse.workspace import Workspace

VAL = "val"


def static_merge(ws: Workspace, *, method: str = "linear", seed: int = 0, **params) -> Fusion:
    """Any registered merge method (see ``lorafuse methods``) as one source."""
    if "seed" in params or method.startswith("dare"):
        params.setdefault("seed", seed)
    factors = merge(list(ws.private.values()), method, progress=False, **params)
    return Fusion(
        f"merge:{method}",
        "merging",
        [FactorSet(method, factors)],
        ConstantMixer(torch.ones(1)),
        info={"method": method, **params},
    )


def learned_coefficients(
    ws: Workspace,
    *,
    per_layer: bool = False,
    objective: str = "loss",
    search: bool = False,
    steps: int = 40,
    lr: float = 0.1,
    seed: int = 0,
) -> Fusion:
    """Merge coefficients learned on validation data (gradient descent or LoRAHub search)."""
    learned = learned_merge(
        ws,
        per_layer=per_layer,
        objective=objective,  # type: ignore[arg-type]
        search=search,
        steps=steps,
        lr=lr,
        seed=seed,
        progress=False,
    )
    mixer = ConstantMixer(learned.coef, layers=learned.layers if per_layer else None)
    return Fusion(
        "learned",
        "merging",
        list(ws.private.values()),
        mixer,
        info={"train_s": learned.seconds, "coefficients": learned.coef.tolist()},
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


def ensemble_distilled(
    ws: Workspace,
    *,
    per_task: int = 50,
    steps: int = 100,
    lr: float = 3e-3,
    mode: str = "prob",
    seed: int = 0,
) -> Fusion:
    """The uniform ensemble distilled into one LoRA on training prompts (cached on disk)."""
    from lorafuse.fusion.distill import distill
    from lorafuse.library import LoraAdapter
    from lorafuse.models import cache_root
    from lorafuse.training.config import TrainConfig

    experts = list(ws.private.values())
    key = hashlib.sha1(
        f"{ws.library.resolve()}|{ws.base.fingerprint}|{per_task}|{steps}|{lr}|{mode}|{seed}".encode()
    ).hexdigest()[:16]
    out = cache_root() / "distilled" / key
    started = time.perf_counter()
    if not (out / "adapter_model.safetensors").is_file():
        train = [ws.encoded("train")[i] for i in ws.per_task("train", per_task)]
        config = TrainConfig(steps=steps, lr=lr, seed=seed)
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
    seed: int = 0,
) -> Fusion:
    """A linear router per layer on its input (per prompt, or per token), trained on
    validation loss with the experts frozen."""
    experts = list(ws.private.values())
    layers = adapted_layers(experts)
    hidden = ws.base.model.config.hidden_size
    torch.manual_seed(seed)
    router = LayerRouter(layers, hidden, len(experts), per_example=per_example)
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
        "val_loss_first_last": [history[0], history[-1]],
    }
    return fusion


def twin(
    ws: Workspace,
    *,
    shared: str = "task_arithmetic",
    scale: float = 0.3,
    rank: int = 32,
    max_per_task: int = 1000,
    epochs: int = 300,
    group: bool = False,
    groups_per_bin: int = 2,
    seed: int = 0,
) -> Fusion:
    """Twin-Merging: shared merge + routed SVD-compressed exclusive deltas (MLP router)."""
    started = time.perf_counter()
    key = ("twin", shared, scale, rank, max_per_task, epochs, seed)
    if key not in ws.memo:  # twin and twin_group share sources and router
        ws.memo[key] = _twin_parts(ws, *key[1:])
    shared_set, sources, feats, labels, router = ws.memo[key]
    n = len(sources)
    mixer = BatchMixer()
    split = ws.cache.split
    groups = None
    if group:
        with torch.no_grad():
            val_w = F.softmax(router(feats), -1).numpy()
        groups = GroupWeights(val_w, groups_per_bin, seed)

    def route(model, states, batch) -> None:
        f = shared_features(model, mixer, n, states, batch, split)
        with torch.no_grad():
            w = F.softmax(router(f.cpu()), -1)
        if groups is not None:
            w = torch.as_tensor(groups(w.numpy()), dtype=w.dtype)
        mixer.current = w.to(states.device)

    with torch.no_grad():
        val_acc = float((router(feats).argmax(-1) == labels).float().mean())
    return Fusion(
        "twin_group" if group else "twin",
        "routing",
        sources,
        mixer,
        route=route,
        shared=shared_set,
        info={
            "train_s": time.perf_counter() - started,
            "router_val_accuracy": val_acc,
            "shared": shared,
            "scale": scale,
            "rank": rank,
        },
    )


def _twin_parts(
    ws: Workspace, shared: str, scale: float, rank: int, max_per_task: int, epochs: int, seed: int
) -> tuple:
    """Shared + exclusive factor sets, validation prompt features and labels, trained router."""
    ws.require_tasks("twin (its router learns which expert's task a prompt is)")
    experts = list(ws.private.values())
    params = {"scale": scale} if shared in ("task_arithmetic", "ties", "dare_ties") else {}
    shared_set, *sources = make_twin_sources(
        experts, shared_method=shared, shared_params=params, rank=rank
    )
    val_examples, val_encoded = ws.examples(VAL), ws.encoded(VAL)
    order = list(ws.private)
    missing = {ex.task for ex in val_examples} - set(ws.expert_of)
    if missing:
        raise LorafuseError(f"twin: no private expert for task(s) {', '.join(sorted(missing))}")
    keep = ws.per_task(VAL, max_per_task)
    labels = torch.tensor([order.index(ws.expert_of[val_examples[i].task]) for i in keep])
    mixer = BatchMixer()
    with mixture_of_loras(ws.base.model, sources, mixer, shared_set):
        feats = feature_table(
            ws.base.model, mixer, len(sources), [val_encoded[i] for i in keep], ws.cache
        )
    router = train_router(feats, labels, len(sources), epochs=epochs, seed=seed)
    return shared_set, sources, feats, labels, router


def hierarchical(
    ws: Workspace,
    *,
    n_clusters: int = 4,
    top_k: int = 1,
    temperature: float = 0.1,
    seed: int = 0,
) -> Fusion:
    """HC: cluster experts by delta similarity, merge each cluster, route by Arrow."""
    experts = list(ws.private.values())
    clusters = cluster_experts(experts, n_clusters)
    sources = merged_clusters(experts, clusters)
    names = list(ws.private)
    return Fusion(
        "hc_arrow",
        "routing",
        sources,
        ArrowRouter(top_k=top_k, temperature=temperature),
        info={"clusters": [[names[i] for i in c] for c in clusters]},
    )


def elrea(
    ws: Workspace,
    *,
    clustering: str = "gradient",
    weights: str = "elrea",
    temperature: float | None = None,
    seed: int = 0,
) -> Fusion:
    """ELREA: cluster experts of gradient features, weighted per prompt (built by
    ``lorafuse elrea``; the shipped library has them)."""
    from lorafuse.elrea.pipeline import elrea_dir, elrea_fusion

    path = elrea_dir(ws.library, clustering)
    if not (path / "elrea.json").is_file():
        raise LorafuseError(
            f"{path}: no ELREA build here (run: lorafuse elrea --clustering {clustering})"
        )
    return elrea_fusion(ws, path, weights=weights, temperature=temperature)


@dataclass(frozen=True)
class FusionMethod:
    name: str
    family: str
    build: Callable[..., Fusion]
    defaults: dict[str, Any]
    summary: str


def _method(name: str, family: str, build: Callable[..., Fusion], **defaults: Any):
    doc = (build.__doc__ or "").strip().splitlines()[0]
    return FusionMethod(name, family, build, defaults, doc)


FUSION_METHODS: dict[str, FusionMethod] = {
    m.name: m
    for m in [
        _method("merge", "merging", static_merge),
        _method("learned_global", "merging", learned_coefficients),
        _method("learned_per_layer", "merging", learned_coefficients, per_layer=True),
        _method("lorahub", "merging", learned_coefficients, search=True),
        _method("ensemble_prob", "ensembling", ensemble, mode="prob"),
        _method("ensemble_logit", "ensembling", ensemble, mode="logit"),
        _method("ensemble_learned", "ensembling", ensemble, mode="prob", learn=True),
        _method("ensemble_distilled", "ensembling", ensemble_distilled),
        _method("arrow", "routing", arrow),
        _method("learned_router", "routing", learned_router),
        _method("twin", "routing", twin),
        _method("twin_group", "routing", twin, group=True),
        _method("hc_arrow", "routing", hierarchical),
        _method("elrea", "ensembling", elrea),
        _method("elrea_uniform", "ensembling", elrea, weights="uniform"),
        _method("elrea_random", "ensembling", elrea, clustering="random"),
        _method("elrea_embedding", "ensembling", elrea, clustering="embedding"),
    ]
}

# the seed papers' data-driven merges and routers (issue 11), registered from their modules
_SEEDS = {**DATA_MERGES, **SEED_ROUTING}
FUSION_METHODS.update({n: _method(n, f, b, **d) for n, (f, b, d) in _SEEDS.items()})


def build_fusion(ws: Workspace, name: str, *, seed: int = 0, **params: Any) -> Fusion:
    """Build the named method with its defaults overridden by ``params``; one-line errors."""
    if name not in FUSION_METHODS:
        raise LorafuseError(f"unknown fusion method {name!r} (have: {', '.join(FUSION_METHODS)})")
    spec = FUSION_METHODS[name]
    allowed = set(inspect.signature(spec.build).parameters) - {"ws"}
    unknown = set(params) - allowed
    if unknown and spec.build is not static_merge:
        raise LorafuseError(
            f"{name}: unknown parameter(s) {', '.join(sorted(unknown))} "
            f"(have: {', '.join(sorted(allowed - {'seed'}))})"
        )
    fusion = spec.build(ws, seed=seed, **{**spec.defaults, **params})
    fusion.name = name if name != "merge" else fusion.name
    return fusion


__all__ = ["FUSION_METHODS", "FusionMethod", "build_fusion"]
