"""Ensembles computed from one batched pass of all K experts.

The K experts' log-probabilities at the target positions come from one replicated forward
(see :func:`lorafuse.fusion.base.ensemble_log_probs`); any number of combinations (mixture
of probabilities, mean of logits, learned weights) are then scored from the same pass.
Learning the weights of a mixture of probabilities needs only each expert's probability of
the target tokens, so it is fitted on those (N x K numbers), not by re-running the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lorafuse.core.encode import Batch, Encoded, collate
from lorafuse.core.forward import target_logits
from lorafuse.core.mixture import BatchMixer, FactorSource, mixture_of_loras
from lorafuse.core.states import StateCache, pad_states
from lorafuse.eval.harness import ExampleScores, batch_scores, length_batches


def widen(batch: Batch, k: int) -> Batch:
    """The batch repeated K times (block j = every row for expert j)."""
    b = len(batch.lengths)
    return Batch(
        input_ids=batch.input_ids.repeat(k, 1),
        lengths=batch.lengths.repeat(k),
        rows=torch.cat([batch.rows + j * b for j in range(k)]),
        positions=batch.positions.repeat(k),
        targets=batch.targets.repeat(k),
        example_index=batch.example_index.repeat(k),
    )


def replicated_logits(
    model: torch.nn.Module,
    k: int,
    mixer: BatchMixer,
    states: torch.Tensor,
    batch: Batch,
    split: int,
) -> torch.Tensor:
    """(K, N, V) logits of the K experts at the batch's target positions, in one pass
    (rows replicated, one-hot mixing weights)."""
    mixer.current = torch.eye(k, device=states.device).repeat_interleave(states.shape[0], 0)
    logits = target_logits(model, states.repeat(k, 1, 1), widen(batch, k), split)
    return logits.view(k, len(batch.targets), -1)


def combine(logits: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    """(K, N, V) expert logits -> (N, V) log-probs of the ensemble; weights (K,) or per
    target row (N, K)."""
    w = weights.to(logits.device)
    if w.dim() == 1:
        w = w.expand(logits.shape[1], -1)
    if mode == "logit":
        return F.log_softmax(torch.einsum("nk,knv->nv", w, logits), dim=-1)
    log_w = torch.log(w.clamp(min=1e-12)).T[:, :, None]
    return torch.logsumexp(F.log_softmax(logits, dim=-1) + log_w, dim=0)


def expert_passes(
    model: torch.nn.Module,
    experts: Sequence[FactorSource],
    encoded: Sequence[Encoded],
    cache: StateCache,
    max_tokens: int = 2048,
) -> Iterator[tuple[list[int], Batch, torch.Tensor]]:
    """Batches of examples (by length) with all K experts' target logits (K, N, V)."""
    states = cache.get(encoded, desc="ensemble: states")
    pad = cache.base.tokenizer.pad_token_id
    k = len(experts)
    mixer = BatchMixer()
    with mixture_of_loras(model, experts, mixer):
        for idx in length_batches(encoded, max_tokens // k):
            batch = collate([encoded[i] for i in idx], pad)
            padded = pad_states([states[i] for i in idx])
            yield idx, batch, replicated_logits(model, k, mixer, padded, batch, cache.split)


@torch.no_grad()
def score_ensembles(
    model: torch.nn.Module,
    experts: Sequence[FactorSource],
    encoded: Sequence[Encoded],
    cache: StateCache,
    variants: Mapping[str, tuple[torch.Tensor, str]],
) -> dict[str, ExampleScores]:
    """Scores of every ``name -> (weights, mode)`` combination, one expert pass per batch."""
    n = len(encoded)
    out = {name: ExampleScores(np.zeros(n), np.zeros(n, bool)) for name in variants}
    for idx, batch, logits in expert_passes(model, experts, encoded, cache):
        for name, (weights, mode) in variants.items():
            out[name].loss[idx], out[name].correct[idx] = batch_scores(
                combine(logits, weights, mode), batch
            )
    return out


@torch.no_grad()
def target_log_probs(
    model: torch.nn.Module,
    experts: Sequence[FactorSource],
    encoded: Sequence[Encoded],
    cache: StateCache,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's log-probability of every target token: (N, K), and its example index."""
    parts, rows = [], []
    for idx, batch, logits in expert_passes(model, experts, encoded, cache):
        k = logits.shape[0]
        lp = F.log_softmax(logits, -1).gather(2, batch.targets[None, :, None].expand(k, -1, 1))
        parts.append(lp.squeeze(2).T.cpu())
        rows.append(torch.tensor(idx)[batch.rows])
    return torch.cat(parts), torch.cat(rows)


def fit_mixture_weights(
    log_probs: torch.Tensor, rows: torch.Tensor, *, steps: int = 300, lr: float = 0.05
) -> torch.Tensor:
    """Weights (K,) on the simplex minimising the mean per-example NLL of the mixture."""
    k = log_probs.shape[1]
    theta = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    n = int(rows.max()) + 1
    counts = torch.bincount(rows, minlength=n).clamp(min=1).float()
    for _ in range(steps):
        nll = -torch.logsumexp(log_probs + F.log_softmax(theta, 0), dim=1)
        loss = (torch.zeros(n).index_add(0, rows, nll) / counts).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return F.softmax(theta.detach(), 0)
