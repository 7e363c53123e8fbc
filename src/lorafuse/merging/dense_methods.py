"""Merge methods in dense space: K experts' dense deltas (d_out, d_in) for one module in,
one dense delta out.

Elementwise methods (TIES, DARE, magnitude pruning) act on individual entries of the deltas,
so they need the dense d_out x d_in matrices; their result is generally full-rank, and the
driver compresses it back to a LoRA by truncated SVD (lossy below full rank).

All of them are settings of one function, :func:`generalized_task_arithmetic` (as in
mergekit's "generalized task arithmetic"), in three steps, on the K experts stacked into one
``(K, d_out, d_in)`` tensor:

1. **sparsify** each expert: ``"none"``; ``"magnitude"`` keeps the ``round(density * n)``
   entries of largest ``|value|``: those ``torch.topk`` keeps, so exactly that many even
   when magnitudes tie at the threshold (see :func:`largest_mask`, which finds them faster);
   ``"random"`` (DARE) keeps each entry with probability ``density`` from a seeded
   ``torch.Generator`` and divides survivors by ``density``, which keeps the expectation.
2. **sign consensus** (optional): elect a sign per entry from the sparsified, *unweighted*
   experts: sign of their sum (``majority_sign="total"``) or of the sum of their signs
   (``"frequency"``); zero elects +. An expert takes part in an entry only if its sparsified
   value is nonzero and has the elected sign.
3. **combine**: ``"sum"`` gives ``sum_k w_k t_k``; ``"disjoint_mean"`` gives
   ``sum_{k agrees} w_k t_k / #{k agrees}`` (at least 1). Then times ``scale`` (lambda).

Steps 2-3 follow PEFT's ``ties``/``dare_ties`` (``peft.utils.merge_utils``) exactly, with the
same tensor operations (sums over the stacked expert axis), so results agree to the bit on
the same inputs: the sign is elected on unweighted values and the disjoint mean divides by
the number of agreeing experts, not by the sum of their weights (mergekit and the TIES
paper's weighted variant differ there). One deviation: PEFT's magnitude pruning keeps
``int(density * n)`` entries, which floating point can push one below the intended count
(``int(0.29 * 100) == 28``); here it is ``round(density * n)``. The two agree whenever
``density * n`` is (close to) an integer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["generalized_task_arithmetic", "largest_mask", "magnitude_prune", "random_drop"]

Sparsify = Literal["none", "magnitude", "random"]
Combine = Literal["sum", "disjoint_mean"]
MajoritySign = Literal["total", "frequency"]

# Threshold selection in rows of at least _SAMPLED_MIN_N entries: a sample of _SAMPLE_SIZE
# entries brackets the k-th largest value, and only the entries inside the bracket are
# searched. The bracket is +-_BRACKET_SIGMAS standard deviations of the sample quantile, so
# it misses (and the whole row is searched instead) with probability ~1e-6.
_SAMPLED_MIN_N = 1 << 15
_SAMPLE_SIZE = 8192
_BRACKET_SIGMAS = 5.0


def largest_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of each row of the 2-D ``values``.

    The survivors are exactly ``torch.topk(row, k).indices``, ties included, found without
    topk's cost: the row's k-th largest value ``t`` comes from ``torch.kthvalue``
    (quickselect), in long rows from only the few entries that a fixed-seed sample brackets
    around it (exact all the same: the bracket is checked by counting, and the whole row is
    searched if it missed), and the mask is ``row >= t``. That holds exactly ``k`` entries
    unless several tie at ``t`` (or there are NaNs); only then is ``torch.topk`` run on the
    row, since which of the tied entries it keeps is up to its internals. Such rows are rare
    in real deltas (5 of the 336 expert-module rows of the default library at density 0.5).
    """
    if values.ndim != 2:
        raise ValueError(f"largest_mask needs a 2-D tensor, got shape {tuple(values.shape)}")
    keep = torch.empty(values.shape, dtype=torch.bool, device=values.device)
    scratch = _Scratch(values.shape[1], values.device)
    for row, bracket in enumerate(_brackets(values, k)):
        _largest_into(values[row], k, bracket, keep[row], scratch)
    return keep


class _Scratch:
    """Two bool buffers of one row's length, reused row after row (fresh large tensors cost
    page faults, as much as the compares that fill them)."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.ge = torch.empty(n, dtype=torch.bool, device=device)
        self.le = torch.empty(n, dtype=torch.bool, device=device)


def _largest_into(
    v: torch.Tensor,
    k: int,
    bracket: tuple[float, float] | None,
    out: torch.Tensor,
    scratch: _Scratch,
) -> None:
    """The mask of :func:`largest_mask` for the 1-D ``v``, written into ``out`` (bool or 0/1
    float); ``bracket`` as from :func:`_brackets`."""
    if k <= 0 or k >= v.numel():
        out.fill_(k > 0)
        return
    torch.ge(v, _kth_largest(v, k, bracket, scratch), out=out)
    if _count(out) != k:
        _break_ties(v, k, out)


def _count(mask: torch.Tensor) -> int:
    """Number of nonzero entries of a 1-D bool or 0/1 float mask."""
    if mask.dtype != torch.bool and mask.numel() < 2**24:  # float sums of 0/1 are exact here
        return int(mask.sum())
    return int(torch.count_nonzero(mask))


def _brackets(
    values: torch.Tensor, k: int, *, absolute: bool = False
) -> list[tuple[float, float] | None]:
    """Per row of the 2-D ``values`` (of ``|values|`` if ``absolute``), the order statistics
    ``(lo, hi)`` of a fixed-seed sample around the k-th largest entry; ``None`` for rows too
    short to bother (searched whole) and when ``k`` keeps nothing or everything."""
    rows, n = values.shape
    if n < _SAMPLED_MIN_N or k <= 0 or k >= n:
        return [None] * rows
    gen = torch.Generator(device=values.device).manual_seed(0)
    idx = torch.randint(n, (_SAMPLE_SIZE,), generator=gen, device=values.device)
    sample = values[:, idx]
    if absolute:
        sample = sample.abs_()
    sample = sample.sort(dim=1).values
    q = (n - k) / n  # fraction of entries below the threshold
    pos = q * _SAMPLE_SIZE
    half = math.ceil(_BRACKET_SIGMAS * math.sqrt(_SAMPLE_SIZE * q * (1.0 - q))) + 2
    i_lo, i_hi = math.floor(pos) - half, math.ceil(pos) + half
    lo = sample[:, i_lo].tolist() if i_lo >= 0 else [-math.inf] * rows
    hi = sample[:, i_hi].tolist() if i_hi < _SAMPLE_SIZE else [math.inf] * rows
    return list(zip(lo, hi, strict=True))


def _kth_largest(
    v: torch.Tensor, k: int, bracket: tuple[float, float] | None, scratch: _Scratch
) -> torch.Tensor:
    """The k-th largest entry of the 1-D ``v`` (0-d tensor), searching ``bracket`` if given."""
    n = v.numel()
    if bracket is not None:
        lo, hi = bracket
        band = torch.ge(v, lo, out=scratch.ge)
        at_least_lo = int(torch.count_nonzero(band))
        inside = v[band.logical_and_(torch.le(v, hi, out=scratch.le))]
        j = k - (at_least_lo - inside.numel())  # the j-th largest entry inside the bracket
        if 0 < j <= inside.numel():
            return torch.kthvalue(inside, inside.numel() - j + 1).values
    return torch.kthvalue(v, n - k + 1).values


def _break_ties(v: torch.Tensor, k: int, out: torch.Tensor) -> None:
    """``out`` becomes the mask of ``torch.topk(v, k)``: for rows tied at the threshold (or
    with NaNs), where only topk itself knows which of the tied entries it keeps."""
    out.zero_()
    out[torch.topk(v, k).indices] = 1


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """A copy of ``delta`` keeping only its ``round(density * n)`` largest-magnitude entries
    (ties at the threshold: see :func:`largest_mask`)."""
    n = delta.numel()
    k = round(density * n)
    if k >= n:
        return delta.clone()
    keep = largest_mask(delta.abs().reshape(1, n), k)
    return delta * keep.reshape(delta.shape)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, divide the survivors by it.

    The mask is ``torch.rand(...) < density`` drawn from ``generator``. On CPU that is the
    very mask ``torch.bernoulli`` of a ``density``-filled tensor draws (PEFT's, from the global
    RNG): both consume one number per entry from the generator and compare the same uniform
    value with ``density`` (checked by the tests), so a generator seeded like the global one
    reproduces PEFT's masks, while ``rand`` is several times faster. ``density >= 1`` draws
    nothing and returns a copy. Works on a stack of experts too: one draw, in order.
    """
    if density >= 1:
        return delta.clone()
    keep = torch.empty_like(delta)
    _random_keep_into(keep, density, generator)
    return delta * keep / density


def _random_keep_into(out: torch.Tensor, density: float, generator: torch.Generator) -> None:
    """``out`` (float) becomes the 0/1 mask ``rand < density``, drawn from ``generator``."""
    out.uniform_(generator=generator)  # torch.rand's draw
    torch.lt(out, torch.tensor(density, dtype=out.dtype, device=out.device), out=out)


def generalized_task_arithmetic(
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float],
    *,
    sparsify: Sparsify = "none",
    density: float = 1.0,
    sign_consensus: bool = False,
    majority_sign: MajoritySign = "total",
    combine: Combine = "sum",
    scale: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
) -> torch.Tensor:
    """sparsify -> optional sign consensus -> combine, times ``scale`` (see the module doc).

    ``deltas`` are the experts' dense deltas of one module, as a sequence of K ``(d_out,
    d_in)`` tensors or one ``(K, d_out, d_in)`` stack (the driver passes a stack, which saves
    a copy); they are not modified, unless ``overwrite`` lets a stack serve as the scratch
    memory (the driver's, which it overwrites anyway: that saves a second stack, so one
    module's merge holds one stack of deltas). ``seed`` seeds the random drop (one generator,
    experts drawn in order), unused otherwise. The result does not depend on ``overwrite``.
    """
    if len(deltas) == 0:
        raise ValueError("no deltas to merge")
    if len(weights) != len(deltas):
        raise ValueError(f"{len(weights)} weights for {len(deltas)} experts")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if majority_sign not in ("total", "frequency"):
        raise ValueError(f"unknown majority_sign {majority_sign!r}")
    if sparsify not in ("none", "magnitude", "random"):
        raise ValueError(f"unknown sparsify {sparsify!r}")
    if combine not in ("sum", "disjoint_mean"):
        raise ValueError(f"unknown combine {combine!r}")

    # x: the (K, ...) stack. It is modified in place only once it is a tensor of our own;
    # the steps go expert by expert with one-expert scratch buffers. Masks are 0/1 floats:
    # multiplying by them is what PEFT does with its masks (same values, bit for bit), and
    # float compares and products are faster than bool ones.
    stacked = isinstance(deltas, torch.Tensor)
    owned = overwrite or not stacked
    x = deltas if stacked else torch.stack(list(deltas))
    n_experts, n = x.shape[0], x[0].numel()
    w = torch.tensor(list(weights), dtype=x.dtype, device=x.device)
    row = torch.empty(n, dtype=x.dtype, device=x.device)  # scratch, one expert
    flat = x.reshape(n_experts, n)

    k = round(density * n)
    if (sparsify == "magnitude" and k < n) or (sparsify == "random" and density < 1):
        out = flat if owned else torch.empty_like(flat)
        if sparsify == "magnitude":
            brackets = _brackets(flat, k, absolute=True)
            magnitudes = torch.empty_like(row)
            scratch = _Scratch(n, x.device)
            for e in range(n_experts):
                torch.abs(flat[e], out=magnitudes)
                _largest_into(magnitudes, k, brackets[e], row, scratch)
                torch.mul(flat[e], row, out=out[e])
        else:
            generator = torch.Generator(device=x.device).manual_seed(seed)
            for e in range(n_experts):  # one generator, experts in order: as one draw
                _random_keep_into(row, density, generator)
                torch.mul(flat[e], row, out=out[e]).div_(density)
        flat, owned = out, True
    if not owned:  # nothing sparsified
        flat = flat.clone()

    elected: torch.Tensor | None = None
    if sign_consensus:
        votes = flat.sum(dim=0) if majority_sign == "total" else flat.sign().sum(dim=0)
        elected = torch.ge(votes, 0, out=votes).mul_(2.0).sub_(1.0)  # +-1; zero elects +
    count = torch.zeros_like(row) if combine == "disjoint_mean" else None
    for e in range(n_experts):
        t = flat[e]
        if elected is not None:  # sign(t) == elected  <=>  t * elected > 0 (not 0, NaN)
            agree = torch.gt(torch.mul(t, elected, out=row), 0, out=row)
        elif count is not None:  # disjoint mean alone: every nonzero entry takes part
            agree = torch.ne(t, 0, out=row)
        else:
            agree = None
        t.mul_(w[e])
        if agree is not None:
            t.mul_(agree)
        if count is not None:
            count += agree
    merged = flat.sum(dim=0)
    if count is not None:
        merged /= count.clamp_(min=1.0)
    merged = merged.view(x.shape[1:])
    return merged * scale if scale != 1.0 else merged
