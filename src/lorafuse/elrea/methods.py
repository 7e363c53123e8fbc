"""ELREA's fusion methods by name (registered by :mod:`lorafuse.methods`): the routed
ensemble of a library's ELREA build and the paper's baselines.

The paper's ablations: ``elrea_uniform`` (the gradient clusters' experts, uniform weights)
and ``elrea_random`` (random clusters of the same sizes, uniformly weighted, "an approximate
Deep Ensembles baseline"). ``elrea_random_cosine`` routes the random clusters' experts by
ELREA's cosine weights instead (ours: it isolates the clustering from the routing)."""

from __future__ import annotations

from lorafuse.elrea.pipeline import elrea_dir, elrea_fusion
from lorafuse.errors import LorafuseError
from lorafuse.fusion.base import Fusion
from lorafuse.fusion.registry import FusionMethod, fusion_method
from lorafuse.workspace import Workspace

# row -> the clustering whose build it needs (``lorafuse elrea --clustering ...``)
CLUSTERING_OF = {
    "elrea": "gradient",
    "elrea_uniform": "gradient",
    "elrea_random": "random",
    "elrea_random_cosine": "random",
    "elrea_embedding": "embedding",
}


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
    path = elrea_dir(ws.library, clustering)
    if not (path / "elrea.json").is_file():
        raise LorafuseError(
            f"{path}: no ELREA build here (run: lorafuse elrea --clustering {clustering})"
        )
    return elrea_fusion(ws, path, weights=weights, temperature=temperature)


ELREA_METHODS: dict[str, FusionMethod] = {
    m.name: m
    for m in [
        fusion_method("elrea", "ensembling", elrea),
        fusion_method("elrea_uniform", "ensembling", elrea, weights="uniform"),
        fusion_method("elrea_random", "ensembling", elrea, clustering="random", weights="uniform"),
        fusion_method("elrea_random_cosine", "ensembling", elrea, clustering="random"),
        fusion_method("elrea_embedding", "ensembling", elrea, clustering="embedding"),
    ]
}


def built_elrea(ws: Workspace, rows: list[str] | None = None) -> list[str]:
    """The ELREA rows (all, or ``rows``) whose build the workspace's library has."""
    wanted = rows or list(ELREA_METHODS)
    return [
        row
        for row in ELREA_METHODS
        if row in wanted and (elrea_dir(ws.library, CLUSTERING_OF[row]) / "elrea.json").is_file()
    ]


__all__ = ["CLUSTERING_OF", "ELREA_METHODS", "built_elrea", "elrea"]
