"""Steps 2 and 3 of an ELREA feature: Adam normalisation (LESS) of the flat LoRA gradient
(:func:`adam_update` with both moments, :func:`adam_normalise` with the second only; see
:mod:`lorafuse.elrea.adam_state`), then a seeded Johnson-Lindenstrauss projection generated
block by block."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lorafuse.elrea.lora_grads import LoraLinear, _canonical
from lorafuse.errors import LorafuseError

PROJECTIONS = ("rademacher", "gaussian")
MAX_DIM = 8192
_BLOCK_ENTRIES = 1 << 24  # entries of one generated projection block (64 MB in fp32)


def second_moment_vector(
    adam_state: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]],
    linears: Sequence[LoraLinear],
) -> torch.Tensor:
    """The flat ``v`` (P,) in the column order of ``linears``.

    ``adam_state`` maps parameter names (as in ``adapter_model.safetensors``, or with the
    adapter name as in ``named_parameters``) to ``exp_avg_sq`` tensors, or to an optimizer's
    per-parameter state dict holding ``"exp_avg_sq"``.
    """
    v = moment_vector(adam_state, linears, "exp_avg_sq")
    if (v < 0).any():
        raise LorafuseError("adam_state exp_avg_sq must be finite and non-negative")
    return v


def moment_vector(
    adam_state: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]],
    linears: Sequence[LoraLinear],
    what: str,
) -> torch.Tensor:
    """The flat moment ``what`` (``exp_avg`` or ``exp_avg_sq``), (P,), in ``linears``' order."""
    by_name = {_canonical(k): v for k, v in adam_state.items()}
    parts = []
    for lin in linears:
        value = by_name.get(_canonical(lin.name))
        if isinstance(value, Mapping):
            value = value.get(what)
        if value is None:
            raise LorafuseError(f"adam_state has no {what} for {lin.name}")
        if value.numel() != lin.numel:
            raise LorafuseError(
                f"adam_state[{lin.name}] has {value.numel()} entries, the weight {lin.numel}"
            )
        parts.append(value.detach().reshape(-1).float().cpu())
    flat = torch.cat(parts)
    if not torch.isfinite(flat).all():
        raise LorafuseError(f"adam_state {what} must be finite")
    return flat


def adam_normalise(grads: torch.Tensor, v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """LESS's Adam-preconditioned gradient ``g / (sqrt(v) + eps)`` (v broadcast over rows)."""
    return grads / (v.to(grads.device, grads.dtype).sqrt() + eps)


def adam_update(
    grads: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    step: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.Tensor:
    """ELREA's / LESS's Adam feature: each row ``g``'s bias-corrected update direction
    ``m_hat / (sqrt(v_hat) + eps)`` with ``m' = b1 m + (1-b1) g``, ``v' = b2 v + (1-b2) g^2``
    and ``t = step + 1`` (the step ``g`` would be); ``m``, ``v`` (P,) after ``step`` steps."""
    b1, b2 = betas
    t = step + 1
    m = m.to(grads.device, grads.dtype)
    v = v.to(grads.device, grads.dtype)
    m_hat = (b1 * m + (1 - b1) * grads) / (1 - b1**t)
    v_hat = (b2 * v + (1 - b2) * grads.square()) / (1 - b2**t)
    return m_hat / (v_hat.sqrt() + eps)


def _block_rows(dim: int) -> int:
    return max(1, _BLOCK_ENTRIES // dim)


_SIGNS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).float() * 2 - 1  # byte -> 8 ±1


def projection_block(
    seed: int, index: int, rows: int, dim: int, kind: str = "rademacher"
) -> torch.Tensor:
    """Rows ``[index*B, index*B + rows)`` of the (P, dim) projection matrix, unscaled.

    Each block has its own generator seeded from ``(seed, index)``, so any block can be
    made alone and the matrix does not depend on how the examples are batched.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
    if kind == "gaussian":
        return torch.randn(rows, dim, generator=gen)
    if kind != "rademacher":
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {kind!r}")
    total = rows * dim
    octets = torch.randint(0, 256, ((total + 7) // 8,), generator=gen, dtype=torch.uint8)
    signs = nn.functional.embedding(octets.long(), _SIGNS)  # 8 random signs per byte
    return signs.reshape(-1)[:total].view(rows, dim)


def project(
    grads: torch.Tensor, dim: int = 1024, seed: int = 0, kind: str = "rademacher"
) -> torch.Tensor:
    """``grads (N, P) @ R / sqrt(dim)`` with R (P, dim) of i.i.d. ±1 or N(0, 1) entries.

    ``E ||project(x)||^2 = ||x||^2`` and inner products are preserved up to
    ``O(1/sqrt(dim))`` (Johnson-Lindenstrauss). R is generated block by block.
    """
    return project_many([grads], dim, seed, kind)[0]


def project_many(
    grads: Sequence[torch.Tensor], dim: int = 1024, seed: int = 0, kind: str = "rademacher"
) -> list[torch.Tensor]:
    """:func:`project` of each matrix in ``grads`` (all with the same P), generating each
    block of R once for all of them; each result is bit-identical to ``project(g)`` (the
    same products, in the same order)."""
    if not 1 <= dim <= MAX_DIM:
        raise ValueError(f"dim must be in 1..{MAX_DIM}, got {dim}")
    p = grads[0].shape[1]
    if any(g.shape[1] != p for g in grads):
        raise ValueError("project_many: every matrix needs the same number of columns")
    rows = _block_rows(dim)
    outs = [g.new_zeros(g.shape[0], dim, dtype=torch.float32) for g in grads]
    for index, start in enumerate(range(0, p, rows)):
        stop = min(start + rows, p)
        block = projection_block(seed, index, stop - start, dim, kind).to(grads[0].device)
        for g, out in zip(grads, outs, strict=True):
            out.addmm_(g[:, start:stop].float(), block)
    return [out.mul_(dim**-0.5) for out in outs]
