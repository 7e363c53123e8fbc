"""What every fusion command starts from: base model, library, tasks, shared state cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorafuse.core.encode import Encoded, encode_examples
from lorafuse.core.forward import ForwardPlan
from lorafuse.core.states import StateCache
from lorafuse.errors import LorafuseError
from lorafuse.eval.run import choose_split
from lorafuse.library import LoraAdapter, check_compatible, check_weights, open_library
from lorafuse.library.manifest import LibraryManifest, tasks_unknown, untasked
from lorafuse.models import BaseModel, load_base_model
from lorafuse.tasks import load_tasks
from lorafuse.tasks.example import Example, TaskSuite

DEFAULT_LIBRARY = Path(__file__).resolve().parent / "data" / "default_library"


@dataclass
class Workspace:
    """A checked library on its base model, a task suite, and the lower-layer state cache."""

    base: BaseModel
    suite: TaskSuite
    library: Path
    manifest: LibraryManifest
    adapters: dict[str, LoraAdapter]
    cache: StateCache
    _encoded: dict[str, list[Encoded]] = field(default_factory=dict)
    memo: dict[tuple, object] = field(default_factory=dict)  # artefacts methods share

    @property
    def forward(self) -> ForwardPlan:
        """How the base model runs: the checked split forward, or its own full forward."""
        return self.cache.forward

    @property
    def private(self) -> dict[str, LoraAdapter]:
        """The private experts (one per task), in manifest order."""
        return {e.name: self.adapters[e.name] for e in self.manifest.experts if e.kind == "private"}

    @property
    def expert_of(self) -> dict[str, str]:
        """Task -> its private expert's name."""
        return {
            e.tasks[0]: e.name for e in self.manifest.experts if e.kind == "private" and e.tasks
        }

    @property
    def tasks_of(self) -> dict[str, list[str]]:
        """Expert name -> the tasks it was trained on."""
        return {e.name: e.tasks for e in self.manifest.experts}

    @property
    def untasked(self) -> list[str]:
        """Private experts whose tasks are unknown (a plain folder of adapters)."""
        return untasked(self.manifest)

    def require_tasks(self, what: str) -> None:
        """One-line error unless every private expert's tasks are known."""
        if self.untasked:
            raise LorafuseError(tasks_unknown(what, self.library, self.untasked))

    def own_subsets(self, split: str) -> dict[str, list[int]]:
        """Private expert -> indices of the split's examples of its own tasks."""
        self.require_tasks("scoring each expert on its own task")
        tasks_of = self.tasks_of
        return {
            name: [i for i, ex in enumerate(self.examples(split)) if ex.task in tasks_of[name]]
            for name in self.private
        }

    def examples(self, split: str) -> list[Example]:
        return self.suite.get(split)

    def per_task(self, split: str, cap: int | None) -> list[int]:
        """Indices of the split's examples, at most ``cap`` per task, in order (all if None)."""
        return cap_per_task([ex.task for ex in self.examples(split)], cap)

    def encoded(self, split: str) -> list[Encoded]:
        """The split's examples tokenised (once) with the chat template."""
        if split not in self._encoded:
            self._encoded[split] = encode_examples(self.base.tokenizer, self.examples(split))
        return self._encoded[split]


def cap_per_task(tasks: list[str], cap: int | None) -> list[int]:
    """Indices keeping at most ``cap`` items of each task label, in order (all if None)."""
    seen: dict[str, int] = {}
    keep = []
    for i, t in enumerate(tasks):
        if cap is None or seen.get(t, 0) < cap:
            keep.append(i)
            seen[t] = seen.get(t, 0) + 1
    return keep


def open_workspace(
    *,
    base_model: str = "embedded",
    library: str | Path | None = None,
    tasks: str = "builtin",
    seed: int = 0,
    allow_pickle: bool = False,
    base: BaseModel | None = None,
) -> Workspace:
    """Open and check everything a fusion command needs (bad inputs fail before the model)."""
    library = Path(library or DEFAULT_LIBRARY)
    manifest, adapters = open_library(library, allow_pickle=allow_pickle)
    check_weights(list(adapters.values()))
    suite = load_tasks(tasks, seed=seed)
    base = base or load_base_model(base_model)
    check_compatible(list(adapters.values()), base_model=base.model)
    cache = StateCache(base, choose_split(base, list(adapters.values())))
    return Workspace(base, suite, library, manifest, adapters, cache)
