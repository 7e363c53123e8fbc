"""Data-free merges that weigh the experts against each other: PCB (dense, entrywise) and
WUDI (factor space, least squares).

* **PCB** (Du et al., NeurIPS 2024), as the authors' ``PCB_merge`` computes it, per module on
  the flattened deltas ``tau_i`` (n entries each, T tasks):

  1. clip ``|tau_i|`` to its own [0.01%, 99.99%] order statistics (entries ``int(1e-4 n)`` and
     ``int((1 - 1e-4) n) - 1`` of the sorted row); ``tau~_i = sign(tau_i) * clipped``;
  2. intra-task balance ``exp(T * minmax(clipped_i)^2)`` (the paper's softmax, whose
     normaliser cancels in step 4); inter-task balance ``tanh(tau_i * sum_j tau_j)``;
     ``beta_i`` = their product;
  3. keep the top ``density`` fraction of each ``beta_i``: values below the order statistic
     ``int((1 - density) n)`` are raised to it;
  4. ``s_i = minmax(beta_i)`` (in [0, 1], 0 for the dropped ones);
     merge ``scale * sum_i w_i s_i tau~_i / max(sum_i s_i, 1e-12)``.

  ``minmax(x) = (x - min x) / (max x - min x)`` per task, 0 where the row is constant (the
  reference divides by zero there).
* **WUDI** (Cheng et al., ICML 2025): the merged delta ``tau_m`` minimises
  ``L = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2``, the interference of the merge
  on inputs spanned by each task vector's rows. The paper runs Adam (300 steps, lr 1e-5) from
  ``tau_m = sum_i tau_i``. ``L`` is a convex quadratic; its gradient keeps ``tau_m`` in the
  row space of the task vectors, which for LoRAs is the span ``Q`` of the stacked A's, so
  gradient descent from the sum converges to the minimiser there, computed here in closed form:
  with coordinates ``c_i = tau_i Q`` and ``h_i = c_i^T c_i / ||c_i||^2``,
  ``tau_m = (sum_i c_i h_i) (sum_i h_i)^+ Q^T``, a LoRA of rank ``sum r_i``. Weights scale the
  task vectors (default 1), ``scale`` the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafuse.library import LoraFactors

__all__ = ["pcb", "pcb_scores", "wudi"]

_CLIP = 1e-4  # PCB clips |tau| to these lower and upper quantiles
_RTOL = 1e-10


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Per row of the 2-D ``x``: ``(x - min) / (max - min)``, 0 where the row is constant."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)


def _clamp_quantiles(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clamp each row of ``x`` to its sorted entries ``int(n * low)`` and ``int(n * (1 - high))
    - 1`` (PCB's ``clamp``), found by selection (``kthvalue``), not a full sort."""
    n = x.shape[1]
    lo = torch.kthvalue(x, int(n * low) + 1, dim=1, keepdim=True).values
    i_hi = int(n * (1 - high)) - 1
    hi = (
        x.max(dim=1, keepdim=True).values
        if i_hi == n - 1
        else torch.kthvalue(x, i_hi + 1, dim=1, keepdim=True).values
    )
    return torch.minimum(torch.maximum(x, lo), hi)


def pcb_scores(flat: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PCB's ``(tau~, s)`` for the (T, n) flattened deltas: the clipped deltas and each task's
    per-entry scale in [0, 1] (steps 1-4 of the module doc)."""
    t = flat.shape[0]
    clipped = _clamp_quantiles(flat.abs(), _CLIP, _CLIP)
    intra = torch.exp(t * _minmax(clipped) ** 2)
    inter = torch.tanh(flat * flat.sum(dim=0, keepdim=True))
    beta = _clamp_quantiles(intra * inter, 1.0 - density, 0.0)
    return flat.sign() * clipped, _minmax(beta)


def pcb(
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float],
    *,
    density: float,
    scale: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """PCB merge of one module's dense deltas (module doc); deterministic (``seed``, a
    dense-method parameter, is unused)."""
    if len(weights) != len(deltas):
        raise ValueError(f"{len(weights)} weights for {len(deltas)} experts")
    x = torch.stack(list(deltas)) if not isinstance(deltas, torch.Tensor) else deltas
    flat = x.reshape(x.shape[0], -1)
    clipped, s = pcb_scores(flat, density)
    w = torch.tensor(list(weights), dtype=flat.dtype, device=flat.device).unsqueeze(1)
    merged = (w * s * clipped).sum(dim=0) / s.sum(dim=0).clamp(min=1e-12)
    return (scale * merged).reshape(x.shape[1:])


def wudi(
    parts: Sequence[LoraFactors], weights: Sequence[float], *, scale: float = 1.0
) -> LoraFactors:
    """WUDI's minimiser in closed form, in the row space of the stacked A's (module doc)."""
    if len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights for {len(parts)} experts")
    a_cat = torch.cat([p.A.to(torch.float64) for p in parts], dim=0)
    _, s, vh = torch.linalg.svd(a_cat, full_matrices=False)
    k = int((s > _RTOL * s.max()).sum()) if s.numel() and s.max() > 0 else 0
    if k == 0:  # every delta is zero
        zero_a, zero_b = (
            parts[0].A.new_zeros(1, parts[0].d_in),
            parts[0].B.new_zeros(parts[0].d_out, 1),
        )
        return LoraFactors(A=zero_a, B=zero_b, scaling=1.0)
    q = vh[:k].T  # (d_in, k), orthonormal basis of the A's row space
    num = torch.zeros(parts[0].d_out, k, dtype=torch.float64)
    h_sum = torch.zeros(k, k, dtype=torch.float64)
    for p, w in zip(parts, weights, strict=True):
        c = (w * p.scaling) * p.B.to(torch.float64) @ (p.A.to(torch.float64) @ q)  # tau_i Q
        norm2 = float((c * c).sum())
        if norm2 == 0.0:  # a zero task vector adds no term to the loss
            continue
        h = c.T @ c / norm2
        num += c @ h
        h_sum += h
    m = num @ torch.linalg.pinv(h_sum, hermitian=True, rtol=1e-12)
    dtype = parts[0].A.dtype
    return LoraFactors(
        A=q.T.to(dtype).contiguous(), B=(scale * m).to(dtype).contiguous(), scaling=1.0
    )
