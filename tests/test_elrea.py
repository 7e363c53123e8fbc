"""ELREA clustering, rebalancing and routing weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafuse.elrea.cluster import cluster_features, elrea_weights


def blobs(sizes: list[int], dim: int = 16, spread: float = 0.05, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``len(sizes)`` random directions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    x = np.concatenate(
        [
            c + spread * rng.normal(size=(n, dim)) * np.linalg.norm(c)
            for c, n in zip(centres, sizes, strict=True)
        ]
    )
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_separated_blobs_are_recovered() -> None:
    x = blobs([30, 30, 30])
    result = cluster_features(x, n_clusters=3, threshold=0.2)
    assert sorted(result.sizes) == [30, 30, 30]
    for k in range(3):  # each blob is one cluster
        assert len(set(result.labels[k * 30 : (k + 1) * 30])) == 1
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0)


def test_rebalancing_leaves_no_cluster_above_the_ratio() -> None:
    """A group of 4 nearby blobs (4 x 50) and two far small blobs (10 each): three clusters
    are [200, 10, 10]; re-splitting the big one must bring every cluster within 5x."""
    rng = np.random.default_rng(1)
    dim = 16
    far = rng.normal(size=(3, dim)) * 3
    near = far[0] + rng.normal(size=(4, dim)) * 0.6
    parts = [
        c + 0.02 * rng.normal(size=(n, dim))
        for c, n in [
            (near[0], 50),
            (near[1], 50),
            (near[2], 50),
            (near[3], 50),
            (far[1], 10),
            (far[2], 10),
        ]
    ]
    x = np.concatenate(parts)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    first = cluster_features(x, n_clusters=3, rounds=0, threshold=0.1)
    assert sorted(first.sizes) == [10, 10, 200]  # unbalanced before rebalancing
    result = cluster_features(x, n_clusters=3, rounds=3, threshold=0.1)
    assert max(result.sizes) <= 5 * min(result.sizes), (result.sizes, result.notes)
    assert result.notes == [] and sum(result.sizes) == len(x)


def test_elrea_weights() -> None:
    centroids = torch.eye(3)
    feats = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    w = elrea_weights(feats, centroids, temperature=1.0)
    assert w.shape == (2, 4)
    torch.testing.assert_close(w[:, :3].sum(1), torch.ones(2))
    assert w[0, 0] == w[0, :3].max() and w[1, 2] == w[1, :3].max()
    # base adapter weight 1 - max cosine: 0 for an input on a centroid, 0.2 for the other
    torch.testing.assert_close(w[:, 3], torch.tensor([0.0, 0.2]))
    cold = elrea_weights(feats, centroids, temperature=0.1)
    assert cold[0, 0] > w[0, 0]  # lower temperature, sharper
    assert cold[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_unsplittable_cluster_is_reported() -> None:
    """60 copies of one point cannot be split: the result says so instead of pretending."""
    x = np.concatenate([np.tile(blobs([1], seed=5), (60, 1)), blobs([5, 5], seed=6)])
    result = cluster_features(x, n_clusters=3, rounds=2, threshold=0.1)
    assert max(result.sizes) > 5 * min(result.sizes)
    assert any("could not be split" in n for n in result.notes)
    assert any("still more than 5x" in n for n in result.notes)


def test_outlier_clusters_join_their_nearest_neighbour() -> None:
    x = np.concatenate([blobs([40, 40], seed=7), blobs([2], seed=8)])
    result = cluster_features(x, n_clusters=3, threshold=0.1, min_size=5)
    assert len(result.sizes) == 2 and sum(result.sizes) == 82
    assert max(result.sizes) <= 5 * min(result.sizes)
