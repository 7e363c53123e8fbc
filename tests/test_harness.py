"""lorafuse.eval.harness: answer-token loss, greedy exact match, per-task summaries."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafuse.core.encode import Encoded
from lorafuse.core.states import StateCache
from lorafuse.eval.harness import (
    ExampleScores,
    TaskScore,
    length_batches,
    model_log_probs,
    per_task,
    score_examples,
    summarize,
)
from lorafuse.models import BaseModel
from lorafuse.tasks.example import Example

VOCAB = 128


def random_encoded(lengths: list[int], prompt_lens: list[int], seed: int = 0) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Encoded(tuple(torch.randint(1, VOCAB, (n,), generator=gen).tolist()), p)
        for n, p in zip(lengths, prompt_lens, strict=True)
    ]


def greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation with the full model, one argmax at a time."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture
def cache(tiny_base: BaseModel, tmp_path: Path) -> StateCache:
    return StateCache(tiny_base, 1, directory=tmp_path / "states", progress=False)


@pytest.mark.parametrize("max_tokens", [4096, 16])
def test_loss_matches_hand_computation(
    tiny_base: BaseModel, cache: StateCache, max_tokens: int
) -> None:
    encoded = random_encoded([6, 10, 3, 8, 5], [3, 6, 1, 7, 2])
    scores = score_examples(
        model_log_probs(tiny_base.model, 1), encoded, cache, max_tokens=max_tokens
    )
    want = []
    with torch.no_grad():
        for e in encoded:
            lp = torch.log_softmax(tiny_base.model(input_ids=torch.tensor([e.ids])).logits[0], -1)
            targets = torch.tensor(e.ids[e.prompt_len :])
            nll = -lp[e.prompt_len - 1 : -1].gather(1, targets[:, None]).squeeze(1)
            want.append(nll.mean().item())
    np.testing.assert_allclose(scores.loss, want, rtol=1e-5, atol=1e-5)
    assert scores.loss.shape == (5,) and scores.correct.dtype == bool


def test_exact_match_is_greedy_decoding(tiny_base: BaseModel, cache: StateCache) -> None:
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (5, 8)]
    encoded = []
    for prompt in prompts:
        answer = greedy(tiny_base.model, prompt, 3)
        encoded.append(Encoded(tuple(prompt + answer), len(prompt)))
        wrong_last = answer[:-1] + [(answer[-1] + 1) % VOCAB]
        encoded.append(Encoded(tuple(prompt + wrong_last), len(prompt)))
        wrong_first = [(answer[0] + 1) % VOCAB] + answer[1:]
        encoded.append(Encoded(tuple(prompt + wrong_first), len(prompt)))
    scores = score_examples(model_log_probs(tiny_base.model, 1), encoded, cache)
    assert scores.correct.tolist() == [True, False, False] * 2
    # the greedy answer has the lowest loss of the three variants
    assert scores.loss[0] < scores.loss[1] and scores.loss[0] < scores.loss[2]


def test_length_batches_cover_all_within_budget() -> None:
    encoded = random_encoded([3, 9, 4, 4, 12, 2, 7], [1] * 7)
    groups = length_batches(encoded, max_tokens=16)
    assert sorted(i for g in groups for i in g) == list(range(7))
    for g in groups:
        assert len(g) == 1 or len(g) * max(len(encoded[i].ids) for i in g) <= 16


def test_summarize_mean_stderr_and_normalized() -> None:
    tasks = {
        "a": TaskScore(loss=1.0, accuracy=0.5, n=10),
        "b": TaskScore(loss=2.0, accuracy=0.25, n=4),
        "c": TaskScore(loss=4.5, accuracy=0.9, n=7),
    }
    out = summarize(tasks, reference_accuracy={"a": 1.0, "b": 0.5, "c": 0.0})
    losses, accs = np.array([1.0, 2.0, 4.5]), np.array([0.5, 0.25, 0.9])
    assert out["mean_loss"] == pytest.approx(2.5)
    assert out["stderr_loss"] == pytest.approx(np.std(losses, ddof=1) / math.sqrt(3))
    assert out["stderr_loss"] == pytest.approx(math.sqrt(3.25 / 3))
    assert out["mean_accuracy"] == pytest.approx(accs.mean())
    assert out["stderr_accuracy"] == pytest.approx(np.std(accs, ddof=1) / math.sqrt(3))
    assert out["tasks"]["a"] == {"loss": 1.0, "accuracy": 0.5, "n": 10, "normalized": 0.5}
    assert out["tasks"]["b"]["normalized"] == pytest.approx(0.5)
    assert "normalized" not in out["tasks"]["c"]  # reference accuracy 0: no ratio
    assert out["mean_normalized"] == pytest.approx(0.5)
    assert out["stderr_normalized"] == pytest.approx(0.0)
    assert tasks["a"] == TaskScore(1.0, 0.5, 10)  # input not mutated


def test_summarize_single_task_and_no_reference() -> None:
    out = summarize({"a": TaskScore(loss=0.7, accuracy=1.0, n=3)})
    assert out["mean_loss"] == pytest.approx(0.7)
    assert out["stderr_loss"] == 0.0 and out["stderr_accuracy"] == 0.0
    assert "mean_normalized" not in out and "normalized" not in out["tasks"]["a"]


def test_per_task_averages_and_skips_nan_tasks() -> None:
    examples = [
        Example("x", "p0", "a"),
        Example("y", "p1", "a"),
        Example("x", "p2", "a"),
        Example("z", "p3", "a"),
        Example("x", "p4", "a"),
        Example("z", "p5", "a"),
    ]
    scores = ExampleScores(
        loss=np.array([1.0, 2.0, 3.0, np.nan, np.nan, np.nan]),
        correct=np.array([True, False, False, False, True, False]),
    )
    out = per_task(examples, scores)
    assert list(out) == ["x", "y"]  # z has only NaN losses: not scored
    assert out["x"] == TaskScore(loss=2.0, accuracy=0.5, n=2)  # NaN row p4 left out
    assert out["y"] == TaskScore(loss=2.0, accuracy=0.0, n=1)
