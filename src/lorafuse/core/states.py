"""Hidden states entering the first adapted layer, computed once per example and cached.

Every expert and every fusion method adapts only layers ``split..L-1`` by default, so the
states below are shared by all of them. They are cached per example in memory and on disk
(shards named by model fingerprint and split layer, examples keyed by their token ids),
built lazily on first use. Each shard also records the model and split in its metadata, and
a shard whose record does not match (or that cannot be read) is never used. Shards are
written atomically under unique temporary names, so processes sharing the cache never see
each other's half-written files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lorafuse.core.encode import Encoded, collate
from lorafuse.core.forward import ForwardPlan, lower_states, plan_of
from lorafuse.io import atomic_path
from lorafuse.models import BaseModel, cache_root


def example_key(encoded: Encoded) -> str:
    """States depend only on the token ids (and the model and split, named by the shard)."""
    return hashlib.sha1(repr(encoded.ids).encode()).hexdigest()[:24]


class StateCache:
    """Lower-layer states of example sets, in memory and on disk (``persist=False``: memory)."""

    def __init__(
        self,
        base: BaseModel,
        split: int,
        directory: Path | None = None,
        *,
        persist: bool = True,
        max_tokens: int = 2048,
        progress: bool = True,
    ) -> None:
        self.base = base
        self.split = split
        # checked now, at load: split forward, or the model's own (states = input embeddings)
        self.forward: ForwardPlan = plan_of(base.model)
        # persist=False keeps states in memory only (tests, throwaway models); input
        # embeddings (the full path) are cheaper to recompute than to read back
        persist = persist and self.forward.path != "full"
        self.directory = (directory or cache_root() / "states") if persist else None
        self.max_tokens = max_tokens
        self.progress = progress
        self._memory: dict[str, torch.Tensor] = {}
        self._shards_read: set[Path] = set()
        self._model = base.fingerprint if self.directory is not None else ""

    @property
    def _prefix(self) -> str:
        return f"{self._model}-{self.split}-"

    def _identity(self) -> dict[str, str]:
        """What a shard must record to be read: the model's fingerprint and the split."""
        return {"model": self._model, "split": str(self.split)}

    def get(self, encoded: Sequence[Encoded], desc: str = "states") -> list[torch.Tensor]:
        """One (len_i, H) tensor per example, in the order given.

        Cached per example, so any subset or union of cached sets (a task's split, all
        tasks together) costs nothing; only unseen examples are computed, and they are
        written to disk as one new shard.
        """
        keys = [example_key(e) for e in encoded]
        missing = [i for i, k in enumerate(keys) if k not in self._memory]
        if missing and self.directory is not None:
            self._load_shards({keys[i] for i in missing})
            missing = [i for i in missing if keys[i] not in self._memory]
        if missing:
            todo = list(dict.fromkeys(missing, None))
            states = self._compute([encoded[i] for i in todo], desc)
            fresh = dict(zip((keys[i] for i in todo), states, strict=True))
            self._memory.update(fresh)
            if self.directory is not None:
                self._save_shard(fresh)
        return [self._memory[k] for k in keys]

    def _load_shards(self, wanted: set[str]) -> None:
        """Read the shards (of this model and split) that hold any wanted example."""
        for file in sorted(self.directory.glob(f"{self._prefix}*.safetensors")):
            if file in self._shards_read:
                continue
            try:
                with safe_open(str(file), framework="pt") as handle:
                    meta = handle.metadata() or {}
            except Exception:  # not a safetensors file (damaged by something else): skip
                self._shards_read.add(file)
                continue
            keys = json.loads(meta.get("keys", "[]"))
            recorded = {k: meta[k] for k in self._identity() if k in meta}
            if recorded and recorded != self._identity():
                self._shards_read.add(file)  # another model's or split's states
                continue
            if not wanted.intersection(keys):
                continue
            self._shards_read.add(file)
            data = load_file(str(file))
            parts = torch.split(data["states"], data["lengths"].tolist())
            self._memory.update(zip(keys, parts, strict=True))
            wanted -= set(keys)
            if not wanted:
                return

    def _compute(self, encoded: Sequence[Encoded], desc: str) -> list[torch.Tensor]:
        model = self.base.model
        device = next(model.parameters()).device
        pad = self.base.tokenizer.pad_token_id
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
        out: list[torch.Tensor | None] = [None] * len(encoded)
        bar = tqdm(total=len(encoded), desc=desc, disable=not self.progress, leave=False)
        start = 0
        while start < len(order):
            width = len(encoded[order[start]].ids)
            size = 1
            while start + size < len(order):
                width = len(encoded[order[start + size]].ids)
                if (size + 1) * width > self.max_tokens:
                    break
                size += 1
            idx = order[start : start + size]
            batch = collate([encoded[i] for i in idx], pad)
            with torch.no_grad():
                hidden = lower_states(model, batch.input_ids.to(device), self.split).cpu()
            for row, i in enumerate(idx):
                out[i] = hidden[row, : len(encoded[i].ids)].clone()
            start += size
            bar.update(size)
        bar.close()
        return out  # type: ignore[return-value]

    def _save_shard(self, states: dict[str, torch.Tensor]) -> None:
        keys = list(states)
        name = hashlib.sha1("".join(keys).encode()).hexdigest()[:16]
        file = self.directory / f"{self._prefix}{name}.safetensors"
        file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "states": torch.cat(list(states.values())).contiguous(),
            "lengths": torch.tensor([s.shape[0] for s in states.values()]),
        }
        with atomic_path(file) as tmp:
            save_file(tensors, str(tmp), metadata={"keys": json.dumps(keys), **self._identity()})
        self._shards_read.add(file)


def pad_states(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack (len_i, H) states into (B, T, H), zero right-padding."""
    width = max(s.shape[0] for s in states)
    out = states[0].new_zeros(len(states), width, states[0].shape[1])
    for i, s in enumerate(states):
        out[i, : s.shape[0]] = s
    return out
