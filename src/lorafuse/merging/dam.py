"""DAM, Differentiable Adaptive Merging (Gauthier-Caron et al., 2024), for LoRA experts.

DAM learns, for every merged weight matrix, one scaling coefficient per input column and per
expert: ``W = W0 + sum_i delta_i diag(c_i)`` with ``c_i`` in R^{d_in}. For a LoRA delta that is
``s_i B_i (A_i diag(c_i))``: the A's columns scaled, so the merge is exactly the LoRA of rank
``sum_i r_i`` with stacked B's and column-scaled A's (:func:`dam_factors`), a PEFT adapter.

The coefficients are trained with the experts frozen on DAM's objective: for each expert, the
KL divergence of the merged model's next-token distribution from that expert's, on that
expert's own data (answer positions), plus a regulariser ``cos_weight * mean over modules and
pairs i < j of cos(c_i, c_j)`` that keeps the experts' coefficient vectors from collapsing
onto each other. Training runs the adapted layers on cached lower-layer states, like every
learned method here; :class:`DamLinear` is the mixture layer with per-column weights.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorafuse.core.encode import Encoded, collate
from lorafuse.core.fit import batch_indices
from lorafuse.core.forward import target_logits
from lorafuse.core.mixture import ConstantMixer, FactorSource, mixture_of_loras, stack_factors
from lorafuse.core.states import StateCache, pad_states
from lorafuse.library import LoraFactors

__all__ = ["DamLinear", "DamResult", "dam_factors", "dam_layers", "train_dam"]


def dam_factors(parts: Sequence[LoraFactors], coef: torch.Tensor) -> LoraFactors:
    """``sum_i s_i B_i A_i diag(coef[i])`` as one LoRA (stacked, exact); ``coef`` (K, d_in)."""
    A = torch.cat([p.A * c.to(p.A.dtype)[None, :] for p, c in zip(parts, coef, strict=True)])
    B = torch.cat([p.scaling * p.B for p in parts], dim=1)
    return LoraFactors(A=A.contiguous(), B=B.contiguous(), scaling=1.0)


class DamLinear(nn.Module):
    """A frozen linear plus ``sum_i ((x * c_i) A_i^T) (s_i B_i)^T``, ``c`` a (K, d_in)
    parameter."""

    def __init__(self, base: nn.Linear, factors: Sequence[LoraFactors], init: float) -> None:
        super().__init__()
        self.base = base
        A, B = stack_factors(factors)  # (K, r, d_in), (K, d_out, r) with scalings in B
        device, dtype = base.weight.device, base.weight.dtype
        self.register_buffer("A", A.to(device, dtype), persistent=False)
        self.register_buffer("B", B.to(device, dtype), persistent=False)
        self.coef = nn.Parameter(torch.full((A.shape[0], A.shape[2]), init, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x.unsqueeze(-2) * self.coef.to(x.dtype)  # (..., K, d_in)
        h = torch.einsum("...ki,kri->...kr", scaled, self.A)
        return self.base(x) + torch.einsum("...kr,kor->...o", h, self.B)


@contextlib.contextmanager
def dam_layers(
    model: nn.Module, experts: Sequence[FactorSource], init: float
) -> Iterator[dict[str, DamLinear]]:
    """Swap each adapted linear for a :class:`DamLinear`; restore on exit."""
    swapped, layers = [], {}
    try:
        for module in experts[0].module_names:
            parent_name, _, child = module.rpartition(".")
            parent = model.get_submodule(parent_name)
            original = getattr(parent, child)
            layers[module] = DamLinear(original, [e.factors(module) for e in experts], init)
            swapped.append((parent, child, original))
            setattr(parent, child, layers[module])
        yield layers
    finally:
        for parent, child, original in swapped:
            setattr(parent, child, original)


def cosine_penalty(coefs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over modules and expert pairs i < j of ``cos(c_i, c_j)``."""
    terms = []
    for c in coefs:
        unit = F.normalize(c, dim=1)
        sim = unit @ unit.T
        k = c.shape[0]
        if k > 1:
            terms.append(sim[torch.triu_indices(k, k, 1).unbind()].mean())
    return torch.stack(terms).mean() if terms else torch.zeros(())


@torch.no_grad()
def teacher_log_probs(
    model: nn.Module,
    experts: Sequence[FactorSource],
    encoded: Sequence[Encoded],
    owner: Sequence[int],
    cache: StateCache,
) -> list[torch.Tensor]:
    """Expert ``owner[n]``'s log-probabilities (n_targets, V) on each example ``n``."""
    states = cache.get(encoded, desc="dam: states")
    pad = cache.base.tokenizer.pad_token_id
    out: list[torch.Tensor] = [torch.empty(0)] * len(encoded)
    for k, expert in enumerate(experts):
        idx = [n for n in range(len(encoded)) if owner[n] == k]
        with mixture_of_loras(model, [expert], ConstantMixer(torch.ones(1))):
            for start in range(0, len(idx), 16):
                chunk = idx[start : start + 16]
                batch = collate([encoded[n] for n in chunk], pad)
                lp = F.log_softmax(
                    target_logits(
                        model, pad_states([states[n] for n in chunk]), batch, cache.split
                    ),
                    -1,
                )
                for j, n in enumerate(chunk):
                    out[n] = lp[batch.rows == j].cpu()
    return out


@dataclass
class DamResult:
    """Trained coefficients per module (K, d_in) and the objective per step."""

    coef: dict[str, torch.Tensor]
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_factors(self, experts: Sequence[FactorSource]) -> dict[str, LoraFactors]:
        return {m: dam_factors([e.factors(m) for e in experts], c) for m, c in self.coef.items()}


def train_dam(
    model: nn.Module,
    experts: Sequence[FactorSource],
    encoded: Sequence[Encoded],
    owner: Sequence[int],
    cache: StateCache,
    *,
    steps: int = 40,
    lr: float = 0.05,
    batch_size: int = 16,
    cos_weight: float = 0.01,
    init: float | None = None,
    seed: int = 0,
) -> DamResult:
    """DAM's coefficients on ``encoded`` (example ``n`` belongs to expert ``owner[n]``)."""
    started = time.perf_counter()
    teachers = teacher_log_probs(model, experts, encoded, owner, cache)
    states = cache.get(encoded, desc="dam: states")
    pad = cache.base.tokenizer.pad_token_id
    history = []
    with dam_layers(model, experts, init if init is not None else 1.0 / len(experts)) as layers:
        coefs = [layer.coef for layer in layers.values()]
        opt = torch.optim.Adam(coefs, lr=lr)
        for step in range(steps):
            idx = batch_indices(len(encoded), step, batch_size, seed)
            batch = collate([encoded[n] for n in idx], pad)
            logits = target_logits(model, pad_states([states[n] for n in idx]), batch, cache.split)
            lp = F.log_softmax(logits, -1)
            teacher = torch.cat([teachers[n] for n in idx]).to(lp.device)
            kl_rows = (teacher.exp() * (teacher - lp)).sum(-1)  # KL(expert || merged) per token
            per_example = torch.zeros(len(idx), device=lp.device).index_add_(
                0, batch.rows.to(lp.device), kl_rows
            ) / torch.bincount(batch.rows, minlength=len(idx)).clamp(min=1).to(lp.device)
            loss = per_example.mean() + cos_weight * cosine_penalty(coefs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(round(loss.item(), 5))
        coef = {m: layer.coef.detach().cpu().clone() for m, layer in layers.items()}
    return DamResult(coef, history, time.perf_counter() - started)
