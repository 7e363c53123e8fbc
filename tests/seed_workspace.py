"""A tiny Workspace for the seed-paper fusion builders: the tiny model, its three experts
(one task each), and hand-made token sequences per task (no tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafuse.core.encode import Encoded
from lorafuse.core.states import StateCache
from lorafuse.library.manifest import ExpertEntry, LibraryManifest
from lorafuse.tasks.example import Example, TaskSuite
from lorafuse.workspace import Workspace

BLOCK = 5  # task t's prompt tokens come from [1 + BLOCK t, 1 + BLOCK (t + 1))


def task_sequences(t: int, n: int, seed: int) -> list[Encoded]:
    """``n`` prompts of 5 tokens from task ``t``'s block, answered by two task tokens."""
    gen = torch.Generator().manual_seed(seed * 100 + t)
    out = []
    for _ in range(n):
        prompt = (1 + BLOCK * t + torch.randint(0, BLOCK, (5,), generator=gen)).tolist()
        out.append(Encoded((*prompt, 100 + t, 110 + t), 5))
    return out


def tiny_workspace(base, experts, n_per_task: int = 4) -> Workspace:
    names = [f"e{k}" for k in range(len(experts))]
    tasks = [f"t{k}" for k in range(len(experts))]
    manifest = LibraryManifest(
        base_model="tiny",
        lorafuse_version="0",
        created="2026-01-01T00:00:00+00:00",
        experts=[ExpertEntry(name=n, path=n, tasks=[t]) for n, t in zip(names, tasks, strict=True)],
    )
    splits, encoded = {}, {}
    for split, seed in (("val", 1), ("test", 2)):
        splits[split] = [
            Example(t, f"{split} {t} {i}", "a") for t in tasks for i in range(n_per_task)
        ]
        encoded[split] = [e for k in range(len(tasks)) for e in task_sequences(k, n_per_task, seed)]
    cache = StateCache(base, 0, persist=False, progress=False)
    ws = Workspace(
        base, TaskSuite(splits), Path("."), manifest, dict(zip(names, experts, strict=True)), cache
    )
    ws._encoded.update(encoded)
    return ws
