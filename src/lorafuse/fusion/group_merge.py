"""Group-wise merging (Twin-Merging's rebuttal, "Inference Efficiency"): the inputs being served
are grouped by their routing weights, the weights are merged once per group with the group's
mean routing weights, and each group's rows run on their merged weights.

* :func:`group_items`: the paper's grouping. Rows are binned by the argmax of their weights,
  each bin is split by k-means (scikit-learn, seeded) on the weights themselves, and each group
  gets the mean weight vector of its rows. ``groups`` is the total number of groups: every
  bin gets at least one and the rest go to the bins in proportion to their sizes (D'Hondt);
  with fewer groups than bins the bins are not kept (k-means over all rows), so ``groups=1``
  is always the mean of all rows. A bin never gets more groups than it has distinct rows, so
  with as many groups as distinct rows every row keeps its own weights.
* :func:`merged_into`: while active, every mixture layer of the model is a dense linear layer
  with ``W + ΔW_shared + Σ_k w_k ΔW_k`` (one GEMM per module from the stacked factors).
* :func:`grouped_logits`: one merge and one forward per group present in a batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

from lorafuse.core.encode import Batch
from lorafuse.core.forward import target_logits
from lorafuse.core.mixture import MixtureLinear


def _allocate(sizes: list[int], caps: list[int], total: int) -> list[int]:
    """Groups per bin: one each, the rest by D'Hondt on the bin sizes, at most ``caps``."""
    alloc = [1] * len(sizes)
    for _ in range(max(0, total - len(sizes))):
        open_bins = [b for b in range(len(sizes)) if alloc[b] < caps[b]]
        if not open_bins:
            break
        best = max(open_bins, key=lambda b: (sizes[b] / (alloc[b] + 1), -b))
        alloc[best] += 1
    return alloc


def _kmeans(weights: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Cluster labels of ``weights`` (N, K) into ``n`` groups (exact at the extremes)."""
    distinct, inverse = np.unique(weights, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if n <= 1:
        return np.zeros(len(weights), dtype=int)
    if n >= len(distinct):  # every distinct vector its own group
        return inverse
    km = KMeans(n_clusters=n, n_init=3, random_state=seed).fit(distinct)
    return km.labels_[inverse]


def group_items(
    weights: np.ndarray, groups: int, *, bins: bool = True, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Group label of every row (N,) and each group's mean weights (G, K), labels 0..G-1."""
    weights = np.asarray(weights, dtype=np.float64)
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    arg = weights.argmax(1)
    present = np.unique(arg)
    labels = np.zeros(len(weights), dtype=int)
    if bins and groups >= len(present):
        members = [np.flatnonzero(arg == b) for b in present]
        caps = [len(np.unique(weights[m], axis=0)) for m in members]
        alloc = _allocate([len(m) for m in members], caps, groups)
        offset = 0
        for m, n in zip(members, alloc, strict=True):
            labels[m] = offset + _kmeans(weights[m], n, seed)
            offset += n
    else:
        labels = _kmeans(weights, groups, seed)
    _, labels = np.unique(labels, return_inverse=True)  # 0..G-1, no empty group
    labels = labels.reshape(-1)
    means = np.stack([weights[labels == g].mean(0) for g in range(labels.max() + 1)])
    return labels, means


class MergedLinear(nn.Module):
    """A dense linear layer holding one group's merged weight (the bias is the base's)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def merged_weight(layer: MixtureLinear, weights: torch.Tensor) -> torch.Tensor:
    """``W (+ shared, folded) + Σ_k w_k s_k B_k A_k`` of one mixture layer: (d_out, d_in)."""
    w = weights.to(layer.At.device, layer.At.dtype).repeat_interleave(layer.A.shape[1])
    return torch.addmm(layer.base.weight.detach(), layer.Bt.T * w, layer.At.T)


@contextlib.contextmanager
def merged_into(model: nn.Module, weights: torch.Tensor) -> Iterator[None]:
    """Every :class:`MixtureLinear` of ``model`` replaced by its merge with ``weights`` (K,)."""
    swapped = []
    try:
        with torch.no_grad():
            for name, layer in list(model.named_modules()):
                if isinstance(layer, MixtureLinear):
                    parent_name, _, child = name.rpartition(".")
                    parent = model.get_submodule(parent_name)
                    merged = MergedLinear(merged_weight(layer, weights), layer.base.bias)
                    setattr(parent, child, merged)
                    swapped.append((parent, child, layer))
        yield
    finally:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)


def sub_batch(
    batch: Batch, states: torch.Tensor, rows: np.ndarray
) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """The batch restricted to ``rows`` (sorted), its states, and a mask of its targets."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    remap = torch.full((len(batch.lengths),), -1, dtype=torch.long)
    remap[idx] = torch.arange(len(idx))
    keep = remap[batch.rows] >= 0
    width = int(batch.lengths[idx].max())
    new_rows = remap[batch.rows[keep]]
    sub = Batch(
        input_ids=batch.input_ids[idx, :width],
        lengths=batch.lengths[idx],
        rows=new_rows,
        positions=batch.positions[keep],
        targets=batch.targets[keep],
        example_index=new_rows,
    )
    return sub, states[idx.to(states.device), :width], keep


def grouped_logits(
    model: nn.Module,
    states: torch.Tensor,
    batch: Batch,
    split: int,
    labels: np.ndarray,
    means: np.ndarray,
) -> torch.Tensor:
    """Target logits (N, V) with each group's rows run on the weights merged for it."""
    out: torch.Tensor | None = None
    for g in range(len(means)):
        rows = np.flatnonzero(labels == g)
        if len(rows) == 0:
            continue
        sub, sub_states, keep = sub_batch(batch, states, rows)
        with merged_into(model, torch.as_tensor(means[g], dtype=torch.float32)):
            logits = target_logits(model, sub_states, sub, split)
        if out is None:
            out = logits.new_empty(len(batch.targets), logits.shape[-1])
        out[keep.to(out.device)] = logits
    assert out is not None, "an empty batch"
    return out
