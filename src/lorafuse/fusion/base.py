"""A fusion method, ready to run: factor sources on the mixture core, a mixer, and how a
batch gets its weights.

* merges: one source (the merged factors) or K sources with constant weights;
* routers: K sources, weights per example (set by ``route`` before the forward, from the
  prompt) or per token (the mixer computes them from each module's or layer's input);
* ensembles: K sources, each batch item replicated K times with one-hot weights, the K
  output distributions combined (``ensemble``).

Scoring, training and generation all go through :func:`installed`, which swaps the
adapted linears for mixture layers and yields a log-probability function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorafuse.core.encode import Batch, Encoded
from lorafuse.core.forward import target_logits
from lorafuse.core.mixture import BatchMixer, FactorSource, Mixer, mixture_of_loras
from lorafuse.eval.harness import ExampleScores, LogProbFn, score_examples
from lorafuse.fusion.ensemble import combine, replicated_logits

# (model, states (B, T, H), batch) -> None: sets the mixer's weights for this batch
RouteFn = Callable[[nn.Module, torch.Tensor, Batch], None]
# (model, states, batch) -> target logits (N, V): a method that runs the batch its own way
RunFn = Callable[[nn.Module, torch.Tensor, Batch], torch.Tensor]
# model -> context manager (hooks that live while the mixture is installed)
HookFn = Callable[[nn.Module], contextlib.AbstractContextManager]


@dataclass
class Ensemble:
    """Combine the K sources' next-token distributions: mixture of probabilities
    (``mode="prob"``) or softmax of the weighted mean of logits (``"logit"``)."""

    weights: torch.Tensor  # (K,) or per example (B, K); non-negative
    mode: str = "prob"


@dataclass
class Fusion:
    """Everything needed to run one fusion method on the base model."""

    name: str
    family: str  # "merging" | "ensembling" | "routing"
    sources: list[FactorSource]
    mixer: Mixer
    route: RouteFn | None = None
    hooks: HookFn | None = None
    ensemble: Ensemble | None = None
    shared: FactorSource | None = None  # a delta for every input, folded into the weights
    prepare: Callable[[Sequence[Encoded]], None] | None = None  # sees the inputs first
    run: RunFn | None = None  # runs a batch itself (group-wise merging), after ``route``
    sparse: bool = True  # top-k weights: compute the selected experts only (False: dense)
    info: dict = field(default_factory=dict)  # parameters, training time, weights


@contextlib.contextmanager
def installed(model: nn.Module, fusion: Fusion, split: int) -> Iterator[LogProbFn]:
    """The mixture layers in ``model`` for a while; yields (states, batch) -> log-probs."""
    hooks = fusion.hooks(model) if fusion.hooks else contextlib.nullcontext()
    mixture = mixture_of_loras(
        model, fusion.sources, fusion.mixer, fusion.shared, sparse=fusion.sparse
    )
    with mixture, hooks:

        def log_probs(states: torch.Tensor, batch: Batch) -> torch.Tensor:
            if fusion.route is not None:
                fusion.route(model, states, batch)
            if fusion.run is not None:
                return F.log_softmax(fusion.run(model, states, batch), dim=-1)
            if fusion.ensemble is not None:
                return ensemble_log_probs(model, fusion, states, batch, split)
            return F.log_softmax(target_logits(model, states, batch, split), dim=-1)

        yield log_probs


def ensemble_log_probs(
    model: nn.Module, fusion: Fusion, states: torch.Tensor, batch: Batch, split: int
) -> torch.Tensor:
    """All K experts in one batched pass (rows replicated, one-hot weights), then combined."""
    assert fusion.ensemble is not None and isinstance(fusion.mixer, BatchMixer)
    logits = replicated_logits(model, len(fusion.sources), fusion.mixer, states, batch, split)
    weights = fusion.ensemble.weights
    if weights.dim() == 2:  # per example -> per target row
        weights = weights[batch.rows.to(weights.device)]
    return combine(logits, weights, fusion.ensemble.mode)


def prompt_mask(batch: Batch, width: int) -> torch.Tensor:
    """(B, T) True at each row's prompt positions (before its first target)."""
    b = len(batch.lengths)
    first_target = torch.full((b,), width, dtype=torch.long)
    first_target = first_target.scatter_reduce(0, batch.rows, batch.positions + 1, reduce="amin")
    return torch.arange(width)[None, :] < first_target[:, None]


def prompt_mean(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean of each row's hidden states over its prompt tokens: (B, T, H) -> (B, H)."""
    mask = prompt_mask(batch, hidden.shape[1]).to(hidden.device, hidden.dtype)[..., None]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def evaluate(model: nn.Module, fusion: Fusion, encoded, cache) -> ExampleScores:
    """Per-example loss and greedy exact match of a fusion method (no gradients)."""
    if fusion.prepare is not None:
        fusion.prepare(encoded)
    with installed(model, fusion, cache.split) as log_probs:
        return score_examples(log_probs, encoded, cache)
