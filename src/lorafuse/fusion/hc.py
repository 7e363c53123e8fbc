"""Hierarchical clustering of experts (HC): cluster by similarity of their deltas, merge each
cluster (exact full-rank average), then route among the clusters.

Similarities are cosines of the experts' full deltas over all modules, computed from the
factors: ``<B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T))`` (never a dense matrix).

``hc_arrow`` (:func:`hierarchical`) is the Trade-offs paper's Arrow HC: the clusters' router
starts from Arrow (each cluster's prototype, the top right-singular vector of its merged
delta, per module) and is then optimised by gradient descent on the validation loss with
the experts frozen, as ``learned_router`` trains (``steps=0``: Arrow over the clusters).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from lorafuse.core.fit import fit_parameters, per_example_nll
from lorafuse.core.mixture import FactorSet, FactorSource
from lorafuse.fusion.base import Fusion, installed
from lorafuse.fusion.routers import ArrowInitRouter
from lorafuse.library import LoraFactors, module_factors, union_modules
from lorafuse.merging.linear import concat_factors
from lorafuse.workspace import Workspace


def factor_inner(a: LoraFactors, b: LoraFactors) -> float:
    """Frobenius inner product of two low-rank deltas, from their factors."""
    bb = a.B.double().T @ b.B.double()  # (r_a, r_b)
    aa = a.A.double() @ b.A.double().T  # (r_a, r_b)
    return float((bb * aa).sum()) * a.scaling * b.scaling


def delta_cosines(experts: Sequence[FactorSource]) -> np.ndarray:
    """(K, K) cosine similarity of the experts' deltas over all their modules."""
    k = len(experts)
    gram = np.zeros((k, k))
    for module in union_modules(experts):
        fs = module_factors(experts, module)
        for i in range(k):
            for j in range(i, k):
                gram[i, j] += factor_inner(fs[i], fs[j])
    gram = np.triu(gram) + np.triu(gram, 1).T
    norm = np.sqrt(np.clip(np.diag(gram), 1e-30, None))
    return gram / norm[:, None] / norm[None, :]


def cluster_experts(experts: Sequence[FactorSource], n_clusters: int) -> list[list[int]]:
    """Average-linkage clustering on ``1 - cosine``; clusters as lists of expert indices."""
    if n_clusters >= len(experts):
        return [[i] for i in range(len(experts))]
    dist = np.clip(1.0 - delta_cosines(experts), 0.0, None)
    np.fill_diagonal(dist, 0.0)
    labels = fcluster(linkage(squareform(dist, checks=False), "average"), n_clusters, "maxclust")
    return [list(np.flatnonzero(labels == c)) for c in sorted(set(labels))]


def merged_clusters(
    experts: Sequence[FactorSource], clusters: Sequence[Sequence[int]]
) -> list[FactorSet]:
    """One exact full-rank average per cluster (a single expert stays itself)."""
    out = []
    for c in clusters:
        members = [experts[i] for i in c]
        names = "+".join(getattr(m, "name", str(i)) for m, i in zip(members, c, strict=True))
        modules = {
            module: concat_factors(module_factors(members, module), [1 / len(c)] * len(c))
            for module in union_modules(members)
        }
        out.append(FactorSet(names, modules))
    return out


def hierarchical(
    ws: Workspace,
    *,
    n_clusters: int = 4,
    top_k: int = 2,
    temperature: float = 0.1,
    steps: int = 40,
    lr: float = 1e-3,
    seed: int = 0,
) -> Fusion:
    """Arrow HC: cluster experts by delta similarity, merge each cluster, route by Arrow,
    then train the router on validation loss (``steps=0``: Arrow alone)."""
    experts = list(ws.private.values())
    clusters = cluster_experts(experts, n_clusters)
    sources = merged_clusters(experts, clusters)
    names = list(ws.private)
    router = ArrowInitRouter(top_k=top_k, temperature=temperature)
    fusion = Fusion("hc_arrow", "routing", sources, router)
    started = time.perf_counter()
    history: list[float] = []
    with installed(ws.base.model, fusion, ws.cache.split) as log_probs:
        router.initialise(ws.base.model)
        if steps > 0 and len(sources) > 1:
            history = fit_parameters(
                router.parameters(),
                lambda s, b: per_example_nll(log_probs(s, b), b, log_probs=True),
                ws.encoded("val"),
                ws.cache,
                steps=steps,
                lr=lr,
                seed=seed,
                desc="hc_arrow router",
                progress=False,
            )
    router.requires_grad_(False)
    fusion.info = {
        "clusters": [[names[i] for i in c] for c in clusters],
        "train_s": time.perf_counter() - started,
        "steps": steps,
        "lr": lr,
        "top_k": top_k,
        "val_loss_first_last": [history[0], history[-1]] if history else None,
    }
    return fusion


__all__ = ["cluster_experts", "delta_cosines", "factor_inner", "hierarchical", "merged_clusters"]
