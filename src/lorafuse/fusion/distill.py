"""Distil an ensemble of experts into one LoRA: cross-entropy to the ensemble's next-token
distribution (= KL up to the teacher's entropy) at the answer positions of training prompts.

The teacher (all K experts in one batched pass, combined by ``ensemble.combine``) is run once
and its top-``topk`` log-probabilities per target position are kept (renormalised: the mass
outside the top 32 is negligible here); the student is a fresh LoRA trained on them with the
usual training loop, so it is saved as a PEFT adapter and can resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafuse.core.encode import Encoded, collate
from lorafuse.core.forward import target_logits
from lorafuse.core.mixture import FactorSource
from lorafuse.core.states import StateCache, pad_states
from lorafuse.fusion.ensemble import combine, expert_passes
from lorafuse.models import BaseModel
from lorafuse.training.config import TrainConfig
from lorafuse.training.train import TrainResult, train_adapter


@torch.no_grad()
def teacher_topk(
    model: torch.nn.Module,
    experts: Sequence[FactorSource],
    encoded: Sequence[Encoded],
    cache: StateCache,
    weights: torch.Tensor,
    mode: str = "prob",
    topk: int = 32,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example: (n_targets, topk) teacher log-probs and their token ids."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(encoded)
    for idx, batch, logits in expert_passes(model, experts, encoded, cache):
        top = combine(logits, weights, mode).topk(topk, dim=-1)
        for j, i in enumerate(idx):
            rows = batch.rows == j
            out[i] = (top.values[rows].cpu(), top.indices[rows].cpu())
    return out  # type: ignore[return-value]


def distillation_loss(teacher: list[tuple[torch.Tensor, torch.Tensor]], split: int, pad: int):
    """The training loss: mean over examples of the mean cross-entropy to the teacher."""

    def loss(model, states, encoded, idx) -> torch.Tensor:
        batch = collate(encoded, pad)
        logits = target_logits(model, pad_states(states), batch, split, mlp_at_targets=True)
        logq = F.log_softmax(logits, dim=-1)
        values = torch.cat([teacher[i][0] for i in idx]).to(logq.device)
        tokens = torch.cat([teacher[i][1] for i in idx]).to(logq.device)
        p = F.softmax(values, dim=-1)  # renormalised top-k teacher distribution
        ce = -(p * logq.gather(1, tokens)).sum(-1)
        n = len(encoded)
        per = torch.zeros(n, device=ce.device).index_add_(0, batch.rows.to(ce.device), ce)
        return (per / torch.bincount(batch.rows, minlength=n).to(ce.device)).mean()

    return loss


def distill(
    base: BaseModel,
    experts: Sequence[FactorSource],
    encoded: Sequence[Encoded],
    cache: StateCache,
    out: str | Path,
    config: TrainConfig,
    *,
    weights: torch.Tensor | None = None,
    mode: str = "prob",
    topk: int = 32,
    progress: bool = True,
) -> TrainResult:
    """Train a LoRA (``config``) to match the ensemble of ``experts`` on ``encoded``."""
    k = len(experts)
    w = torch.full((k,), 1.0 / k) if weights is None else weights
    teacher = teacher_topk(base.model, experts, encoded, cache, w, mode, topk)
    loss = distillation_loss(teacher, cache.split, base.tokenizer.pad_token_id)
    return train_adapter(
        base, encoded, cache, config, out, desc="distil ensemble", progress=progress, loss_fn=loss
    )
