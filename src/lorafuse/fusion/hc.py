"""Hierarchical clustering of experts (HC): cluster by similarity of their deltas, merge each
cluster (exact full-rank average), then route among the clusters.

Similarities are cosines of the experts' full deltas over all modules, computed from the
factors: ``<B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T))`` (never a dense matrix).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from lorafuse.core.mixture import FactorSet, FactorSource
from lorafuse.library import LoraFactors, module_factors, union_modules
from lorafuse.merging.linear import concat_factors


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


__all__ = ["cluster_experts", "delta_cosines", "factor_inner", "merged_clusters"]
