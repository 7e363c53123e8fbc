"""Fit a few parameters (merge coefficients, routers, ensemble weights) on cached states.

The experts and the base model stay frozen; only ``params`` move. Every step takes a
seeded mini-batch of examples, runs the adapted top layers on their cached lower-layer
states and minimises the mean of a per-example loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lorafuse.core.encode import Batch, Encoded, collate
from lorafuse.core.states import StateCache, pad_states
from lorafuse.device import model_device

# (states (B, T, H), batch) -> per-example losses (B,)
BatchLoss = Callable[[torch.Tensor, Batch], torch.Tensor]


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of a step: epochs are seeded permutations, a pure function of step."""
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return perm[offset * batch_size : (offset + 1) * batch_size].tolist()


def per_example_nll(logits: torch.Tensor, batch: Batch, log_probs: bool = False) -> torch.Tensor:
    """Mean NLL of each example's target tokens, shape (B,), from (N, V) logits."""
    targets = batch.targets.to(logits.device)
    rows = batch.rows.to(logits.device)
    if log_probs:
        nll = -logits.gather(1, targets[:, None]).squeeze(1)
    else:
        nll = F.cross_entropy(logits, targets, reduction="none")
    n = len(batch.lengths)
    total = torch.zeros(n, device=logits.device, dtype=nll.dtype).index_add_(0, rows, nll)
    counts = torch.bincount(rows, minlength=n).clamp(min=1)
    return total / counts


def fit_parameters(
    params: Iterable[torch.nn.Parameter],
    batch_loss: BatchLoss,
    encoded: Sequence[Encoded],
    cache: StateCache,
    *,
    steps: int,
    lr: float,
    batch_size: int = 16,
    seed: int = 0,
    desc: str = "fit",
    progress: bool = True,
    device: str | torch.device | None = None,
) -> list[float]:
    """Adam on ``params`` for ``steps`` mini-batches; returns the loss of every step (states
    go to ``device``, by default the base model's)."""
    device = device or model_device(cache.base.model)
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    states = cache.get(encoded, desc=f"{desc}: states")
    pad = cache.base.tokenizer.pad_token_id
    history = []
    for step in tqdm(range(steps), desc=desc, disable=not progress):
        idx = batch_indices(len(encoded), step, batch_size, seed)
        batch = collate([encoded[i] for i in idx], pad)
        loss = batch_loss(pad_states([states[i] for i in idx]).to(device), batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(round(loss.item(), 5))
    return history
