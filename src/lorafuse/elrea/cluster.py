"""ELREA's clustering of gradient features, and its routing weights.

Clustering (ELREA §3.3): BIRCH (scikit-learn) fitted on a random sample of the features,
then every feature assigned; any cluster more than ``max_ratio`` times the smallest is
clustered again (BIRCH on its members, into fewer parts each round), up to ``rounds`` times.

Routing (§3.4): the cosine of the input's gradient feature with each cluster centroid,
standardised across clusters, softmax with a temperature; the base adapter joins with weight
``1 - max_c cos_c`` (large when the input resembles no cluster). The weights need not sum
to 1: next-token logits are combined as a weighted sum.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.cluster import Birch
from sklearn.exceptions import ConvergenceWarning


@dataclass
class Clustering:
    labels: np.ndarray  # (N,) cluster index of each example
    centroids: np.ndarray  # (C, d), unit norm
    notes: list[str] = field(default_factory=list)  # why a cluster stayed unbalanced, if so

    @property
    def sizes(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.centroids)).tolist()


def _birch(x: np.ndarray, n: int, sample: int, seed: int, threshold: float) -> np.ndarray:
    n = max(1, min(n, len(x)))
    rng = np.random.default_rng(seed)
    fit_on = x if len(x) <= sample else x[rng.choice(len(x), sample, replace=False)]
    for _ in range(8):  # a threshold too wide for the data's spread leaves < n subclusters
        with warnings.catch_warnings():  # that case is handled here, not warned about
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = Birch(n_clusters=n, threshold=threshold).fit(fit_on)
        if len(model.subcluster_centers_) >= n:
            break
        threshold /= 2
    return model.predict(x)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive labels 0..C-1 with no empty cluster."""
    _, out = np.unique(labels, return_inverse=True)
    return out


def cluster_features(
    features: np.ndarray,
    *,
    n_clusters: int = 5,
    sample: int = 10_000,
    max_ratio: float = 5.0,
    rounds: int = 3,
    threshold: float = 0.3,
    min_size: int = 1,
    seed: int = 0,
) -> Clustering:
    """BIRCH clusters of L2-normalised features, re-split until balanced within ``max_ratio``.

    Clusters smaller than ``min_size`` (outliers) join their nearest cluster first, so that a
    handful of odd items does not force every other cluster to be split to their size.
    """
    x = np.asarray(features, dtype=np.float64)
    labels = _absorb_small(x, _relabel(_birch(x, n_clusters, sample, seed, threshold)), min_size)
    notes: list[str] = []
    for r in range(rounds):
        sizes = np.bincount(labels)
        smallest = sizes.min()
        big = [c for c in range(len(sizes)) if sizes[c] > max_ratio * smallest]
        if not big:
            break
        target = max(2, n_clusters - 1 - r)  # fewer parts each round
        next_label = labels.max() + 1
        for c in big:
            idx = np.flatnonzero(labels == c)
            parts = min(target, math.ceil(sizes[c] / (max_ratio * smallest)) + 1)
            sub = _relabel(_birch(x[idx], parts, sample, seed + r + 1, threshold))
            if sub.max() == 0:
                notes.append(f"round {r + 1}: cluster of {len(idx)} could not be split")
                continue
            labels[idx[sub > 0]] = next_label + sub[sub > 0] - 1
            next_label += sub.max()
        labels = _absorb_small(x, _relabel(labels), min_size)
    sizes = np.bincount(labels)
    if sizes.max() > max_ratio * sizes.min():
        notes.append(
            f"after {rounds} rounds the largest cluster ({sizes.max()}) is still more than "
            f"{max_ratio:g}x the smallest ({sizes.min()})"
        )
    return Clustering(labels, centroids(x, labels), notes)


def _absorb_small(x: np.ndarray, labels: np.ndarray, min_size: int) -> np.ndarray:
    """Move the members of clusters below ``min_size`` to the nearest remaining centroid."""
    sizes = np.bincount(labels)
    small = sizes < min_size
    if not small.any() or small.all():
        return labels
    keep = np.flatnonzero(~small)
    cents = centroids(x, labels)[keep]
    moved = labels.copy()
    for i in np.flatnonzero(small[labels]):
        moved[i] = keep[int(np.argmax(cents @ x[i]))]
    return _relabel(moved)


def centroids(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Unit-norm mean feature of each cluster."""
    c = np.stack([x[labels == k].mean(0) for k in range(labels.max() + 1)])
    return c / np.clip(np.linalg.norm(c, axis=1, keepdims=True), 1e-12, None)


def elrea_weights(
    features: torch.Tensor, centroids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """(B, C + 1) weights: C cluster experts (standardised cosine, softmax), then the base
    adapter with ``1 - max cos``. ``features`` and ``centroids`` are unit norm."""
    cos = features @ centroids.T  # (B, C)
    mean, std = cos.mean(1, keepdim=True), cos.std(1, keepdim=True).clamp(min=1e-6)
    w = torch.softmax((cos - mean) / std / temperature, dim=1)
    base = (1.0 - cos.max(1, keepdim=True).values).clamp(min=0.0)
    return torch.cat([w, base], dim=1)
