"""Sparse top-k dispatch for the mixture-of-LoRA layer: only the selected experts run.

A router that keeps k of K experts gives a :class:`TopK` (indices and weights) instead of a
dense (..., K) weight vector, at one of three granularities:

* global: ``indices`` (k,), one set for the whole batch;
* per example: (B, k), the same experts at every token of an example;
* per token: (B, T, k).

:func:`sparse_mixture` computes ``sum_j w_j B_{i_j} A_{i_j} x`` touching only the selected
experts' factors: global and per-example selections gather those factors and apply them with
(batched) matmuls, as Punica's gathered BGMV kernels do; per-token selections either gather
per token (few tokens: decoding) or sort the (token, expert) pairs by expert and run one pair
of matmuls per selected expert over its tokens (Punica's segmented SGMV). The result equals
the dense masked mixture (``TopK.dense()`` weights, zero outside the top-k) up to fp32
rounding: the dense sum adds exact zeros for the unselected experts, in another order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# per-token selections gather per token while the gathered factors stay under this many
# elements (decoding, short batches); above it they are grouped by expert
GATHER_BUDGET = 1 << 22


@dataclass
class TopK:
    """The k selected experts (``indices``, long) and their ``weights``, same shape:
    (k,) global, (B, k) per example or (B, T, k) per token, out of ``num_experts``."""

    indices: torch.Tensor
    weights: torch.Tensor
    num_experts: int

    def __post_init__(self) -> None:
        if self.indices.shape != self.weights.shape:
            raise ValueError(
                f"top-k indices {tuple(self.indices.shape)} and weights "
                f"{tuple(self.weights.shape)} differ in shape"
            )

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def dense(self) -> torch.Tensor:
        """The (..., K) weights: ``weights`` at ``indices``, zero elsewhere."""
        shape = (*self.indices.shape[:-1], self.num_experts)
        return self.weights.new_zeros(shape).scatter(-1, self.indices, self.weights)

    def to(self, device: torch.device | str) -> TopK:
        return TopK(self.indices.to(device), self.weights.to(device), self.num_experts)


def top_k_select(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The ``k`` largest logits of the last axis with softmax weights over them (so
    ``.dense()`` is the softmax of the logits masked to -inf outside the top-k)."""
    top = logits.topk(k, dim=-1)
    return TopK(top.indices, F.softmax(top.values / temperature, dim=-1), logits.shape[-1])


def top_k_of_weights(weights: torch.Tensor, k: int) -> TopK:
    """The ``k`` largest of given weights (..., K), renormalised to their original sum."""
    top = weights.topk(k, dim=-1)
    total = weights.sum(-1, keepdim=True)
    kept = top.values.sum(-1, keepdim=True)
    scale = torch.where(kept != 0, total / kept, torch.ones_like(kept))
    return TopK(top.indices, top.values * scale, weights.shape[-1])


def dense_weights(a: torch.Tensor | TopK) -> torch.Tensor:
    """Dense (..., K) mixing weights of either form."""
    return a.dense() if isinstance(a, TopK) else a


def sparse_mixture(
    x: torch.Tensor, out: torch.Tensor, A: torch.Tensor, Bk: torch.Tensor, top: TopK
) -> torch.Tensor:
    """``out + sum_j w_j (x A_{i_j}^T) B_{i_j}`` over the selected experts only.

    ``x`` (..., d_in), ``out`` (..., d_out) the base output; ``A`` (K, r, d_in) and ``Bk``
    (K, r, d_out) the stacked factors (scalings folded into ``Bk``).
    """
    idx, w = top.indices.to(x.device), top.weights.to(x.device, x.dtype)
    if idx.dim() == 1:
        return _global(x, out, A, Bk, idx, w)
    if idx.dim() == 2 and x.dim() == 3:
        return _per_example(x, out, A, Bk, idx, w)
    if idx.dim() == x.dim():  # per token
        d_in, d_out = x.shape[-1], out.shape[-1]
        n, k = idx.numel() // idx.shape[-1], idx.shape[-1]
        x2, out2 = x.reshape(n, 1, d_in), out.reshape(n, 1, d_out)
        idx2, w2 = idx.reshape(n, k), w.reshape(n, k)
        if n * k * A.shape[1] * (d_in + d_out) <= GATHER_BUDGET:
            flat = _per_example(x2, out2, A, Bk, idx2, w2)
        else:
            flat = _grouped(x2[:, 0], out2[:, 0], A, Bk, idx2, w2)
        return flat.reshape(out.shape)
    raise ValueError(f"top-k indices of shape {tuple(idx.shape)} for inputs {tuple(x.shape)}")


def _global(x, out, A, Bk, idx, w) -> torch.Tensor:
    """One set for the batch: two GEMMs over the k selected experts' rank spaces."""
    k, r = idx.shape[0], A.shape[1]
    a = A[idx].reshape(k * r, -1)  # (k r, d_in)
    b = Bk[idx].reshape(k * r, -1)  # (k r, d_out)
    h = (x.reshape(-1, x.shape[-1]) @ a.T).view(-1, k, r) * w[:, None]
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, k * r), b)
    return flat.view(out.shape)


def _per_example(x, out, A, Bk, idx, w) -> torch.Tensor:
    """(B, k) selections: gather each example's factors, two batched matmuls (BGMV)."""
    bsz, k = idx.shape
    r = A.shape[1]
    a = A[idx].reshape(bsz, k * r, -1)  # (B, k r, d_in)
    b = Bk[idx].reshape(bsz, k * r, -1)  # (B, k r, d_out)
    h = torch.bmm(x, a.transpose(1, 2))  # (B, T, k r)
    h = (h.view(bsz, -1, k, r) * w[:, None, :, None]).view(bsz, -1, k * r)
    return torch.baddbmm(out, h, b)


def _grouped(x, out, A, Bk, idx, w) -> torch.Tensor:
    """(N, k) selections, many tokens: (token, expert) pairs sorted by expert, one pair of
    matmuls per selected expert over its tokens (segmented, as Punica's SGMV)."""
    n, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=A.shape[0]).tolist()
    xs, ws = x[token], w.reshape(-1)[order]
    parts, start = [], 0
    for e, c in enumerate(counts):
        if c:
            seg = slice(start, start + c)
            parts.append(((xs[seg] @ A[e].T) * ws[seg, None]) @ Bk[e])
            start += c
    return out.index_add(0, token, torch.cat(parts))
