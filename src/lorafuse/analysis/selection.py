"""Expert selection: which experts (or merged clusters of experts) to keep.

* ``greedy_forward``: start empty, add the expert that most lowers the validation loss of a
  fusion of the chosen ones (their uniform full-rank merge, or Arrow routing among them);
  stop at ``k`` experts or when no candidate lowers the loss. The loss sequence is therefore
  strictly decreasing.
* ``cluster_selection``: hierarchical clustering of the experts' deltas into ``c`` clusters
  (``c = 1..K``), one exact merged expert per cluster, the same fusion over the clusters.
* ``mc_smoe_selection``: MC-SMoE's groups from a router's statistics (``c = 1..K``), each
  group merged by routing frequency and compressed, the same fusion over the groups.

Both report quality against the number of experts kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorafuse.core.encode import Encoded
from lorafuse.core.mixture import ConstantMixer, FactorSource
from lorafuse.core.states import StateCache
from lorafuse.errors import LorafuseError
from lorafuse.eval.report import save_png
from lorafuse.fusion.base import Fusion, evaluate
from lorafuse.fusion.hc import cluster_experts, merged_clusters
from lorafuse.fusion.routers import ArrowRouter
from lorafuse.merging.mc_smoe import mc_smoe_sources

FUSIONS = ("average", "arrow")


def fuse(sources: Sequence[FactorSource], how: str) -> Fusion:
    """The fusion used to judge a set of experts."""
    if how == "average":
        k = len(sources)
        return Fusion("average", "merging", list(sources), ConstantMixer(torch.full((k,), 1 / k)))
    if how == "arrow":
        return Fusion("arrow", "routing", list(sources), ArrowRouter(top_k=1, temperature=0.1))
    raise LorafuseError(f"unknown selection fusion {how!r} (have: {', '.join(FUSIONS)})")


def mean_loss(model, sources, how, encoded, cache) -> float:
    return float(np.mean(evaluate(model, fuse(sources, how), encoded, cache).loss))


@dataclass
class Selection:
    kept: list[int] = field(default_factory=list)  # in the order chosen
    losses: list[float] = field(default_factory=list)  # validation loss after each step


def greedy_forward(
    model: torch.nn.Module,
    experts: Sequence[FactorSource],
    encoded: Sequence[Encoded],
    cache: StateCache,
    *,
    how: str = "average",
    k: int | None = None,
    progress: bool = True,
) -> Selection:
    """Forward selection by validation loss of ``fuse(chosen, how)``."""
    k = len(experts) if k is None else k
    result = Selection()
    best = float("inf")
    while len(result.kept) < k:
        trials = {
            j: mean_loss(model, [experts[i] for i in [*result.kept, j]], how, encoded, cache)
            for j in range(len(experts))
            if j not in result.kept
        }
        if not trials:
            break
        j, loss = min(trials.items(), key=lambda t: t[1])
        if loss >= best:
            break
        result.kept.append(j)
        result.losses.append(loss)
        best = loss
        if progress:
            print(f"greedy {how}: +expert {j} -> val loss {loss:.4f}", flush=True)
    return result


def cluster_selection(
    model: torch.nn.Module,
    experts: Sequence[FactorSource],
    encoded: Sequence[Encoded],
    cache: StateCache,
    *,
    how: str = "average",
    counts: Sequence[int] | None = None,
) -> dict[int, tuple[list[list[int]], float]]:
    """``{c: (clusters, validation loss)}`` for c in ``counts`` (default 1..K) merged clusters."""
    out = {}
    for c in counts or range(1, len(experts) + 1):
        clusters = cluster_experts(experts, c)
        loss = mean_loss(model, merged_clusters(experts, clusters), how, encoded, cache)
        out[c] = ([list(map(int, g)) for g in clusters], loss)
    return out


def cluster_counts(k: int, dense_up_to: int = 16) -> list[int]:
    """The budget of ``select`` at large K: every count up to ``dense_up_to`` experts, beyond
    that the powers of two and K (each count is one evaluation of the fused clusters)."""
    if k <= dense_up_to:
        return list(range(1, k + 1))
    return sorted({2**i for i in range(k.bit_length()) if 2**i < k} | {k})


def mc_smoe_selection(
    model: torch.nn.Module,
    experts: Sequence[FactorSource],
    routing: torch.Tensor,
    encoded: Sequence[Encoded],
    cache: StateCache,
    *,
    how: str = "average",
    rank: int | None = 8,
    density: float = 0.9,
    counts: Sequence[int] | None = None,
) -> dict[int, tuple[list[list[int]], float]]:
    """``{c: (groups, validation loss)}`` of MC-SMoE libraries of c in ``counts`` (default
    1..K) experts."""
    out = {}
    for c in counts or range(1, len(experts) + 1):
        sources, groups, _ = mc_smoe_sources(experts, routing, c, rank=rank, density=density)
        out[c] = (groups, mean_loss(model, sources, how, encoded, cache))
    return out


def plot_selection(curves: dict[str, dict[int, float]], path: str | Path, title: str) -> Path:
    """Validation loss against the number of experts kept, one line per strategy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    ax.set_xlabel("experts kept")
    ax.set_ylabel("mean validation loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    return save_png(fig, path)
