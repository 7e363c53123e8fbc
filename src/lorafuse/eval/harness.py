"""Score a model on examples: answer-token NLL and exact match from one teacher-forced pass.

Exact match is greedy-decoding exact match: greedy decoding emits the reference answer
followed by the end-of-turn token iff the argmax at every target position is that target
(each step's prefix is then the reference prefix). So one forward of the adapted top
layers on cached states gives both numbers; no ``generate`` loop is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lorafuse.core.encode import Batch, Encoded, collate
from lorafuse.core.forward import target_logits
from lorafuse.core.states import StateCache, pad_states
from lorafuse.device import model_device
from lorafuse.tasks.example import Example

# (states (B, T, H), batch) -> log-probabilities (N, V) at the target positions
LogProbFn = Callable[[torch.Tensor, Batch], torch.Tensor]


@dataclass
class ExampleScores:
    """Per-example mean target NLL and greedy exact match, in the input order."""

    loss: np.ndarray
    correct: np.ndarray


def model_log_probs(model: torch.nn.Module, split: int) -> LogProbFn:
    """The log-prob function of one model (plain or with an active PEFT adapter)."""

    def fn(states: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.log_softmax(target_logits(model, states, batch, split), dim=-1)

    return fn


def length_batches(encoded: Sequence[Encoded], max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length, each group at most ``max_tokens`` padded tokens."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    groups: list[list[int]] = []
    for i in order:
        width = len(encoded[i].ids)
        if groups and (len(groups[-1]) + 1) * width <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.no_grad()
def score_examples(
    log_probs: LogProbFn,
    encoded: Sequence[Encoded],
    cache: StateCache,
    *,
    max_tokens: int = 4096,
    device: str | torch.device | None = None,
) -> ExampleScores:
    """Mean target NLL and exact match of every example under ``log_probs`` (states go to
    ``device``, by default the base model's)."""
    device = device or model_device(cache.base.model)
    states = cache.get(encoded, desc="eval: states")
    pad = cache.base.tokenizer.pad_token_id
    loss = np.zeros(len(encoded))
    correct = np.zeros(len(encoded), dtype=bool)
    for idx in length_batches(encoded, max_tokens):
        batch = collate([encoded[i] for i in idx], pad)
        lp = log_probs(pad_states([states[i] for i in idx]).to(device), batch)
        loss[idx], correct[idx] = batch_scores(lp, batch)
    return ExampleScores(loss, correct)


def batch_scores(log_probs: torch.Tensor, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean target NLL and greedy exact match from (N, V) log-probs."""
    lp = log_probs.cpu()
    b = len(batch.lengths)
    nll = -lp.gather(1, batch.targets[:, None]).squeeze(1)
    hit = (lp.argmax(-1) == batch.targets).float()
    n = torch.bincount(batch.rows, minlength=b).float()
    loss = torch.zeros(b).index_add_(0, batch.rows, nll) / n
    ok = torch.zeros(b).index_add_(0, batch.rows, hit) == n
    return loss.numpy(), ok.numpy()


@dataclass
class TaskScore:
    loss: float
    accuracy: float
    n: int


def per_task(examples: Sequence[Example], scores: ExampleScores) -> dict[str, TaskScore]:
    """Average example scores within each task (tasks in first-seen order)."""
    out: dict[str, TaskScore] = {}
    for task in dict.fromkeys(ex.task for ex in examples):
        mask = np.array([ex.task == task for ex in examples]) & ~np.isnan(scores.loss)
        if not mask.any():  # a row scored on other tasks only
            continue
        out[task] = TaskScore(
            loss=float(scores.loss[mask].mean()),
            accuracy=float(scores.correct[mask].mean()),
            n=int(mask.sum()),
        )
    return out


def summarize(
    tasks: dict[str, TaskScore], reference_accuracy: dict[str, float] | None = None
) -> dict:
    """The ``results.json`` body: per-task scores, mean and standard error across tasks.

    The normalised score of a task is its accuracy divided by the accuracy of that task's
    own expert (``reference_accuracy``), as in the Trade-offs paper.
    """
    losses = np.array([t.loss for t in tasks.values()])
    accs = np.array([t.accuracy for t in tasks.values()])
    out: dict = {
        "tasks": {name: vars(t).copy() for name, t in tasks.items()},
        "mean_loss": float(losses.mean()),
        "stderr_loss": _stderr(losses),
        "mean_accuracy": float(accs.mean()),
        "stderr_accuracy": _stderr(accs),
    }
    if reference_accuracy:
        norm = {}
        for name, t in tasks.items():
            ref = reference_accuracy.get(name)
            if ref:
                norm[name] = t.accuracy / ref
                out["tasks"][name]["normalized"] = norm[name]
        if norm:
            values = np.array(list(norm.values()))
            out["mean_normalized"] = float(values.mean())
            out["stderr_normalized"] = _stderr(values)
    return out


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
