"""Hidden states entering the first adapted layer, computed once per example and cached.

Every expert and every fusion method adapts only layers ``split..L-1`` by default, so the
states below are shared by all of them. They are cached in memory and on disk (keyed by
model fingerprint, split layer and the exact token ids), built lazily on first use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lorafuse.core.encode import Encoded, collate
from lorafuse.core.forward import lower_states
from lorafuse.io import atomic_path
from lorafuse.models import BaseModel, cache_root


def _key(base: BaseModel, split: int, encoded: Sequence[Encoded]) -> str:
    h = hashlib.sha1(f"{base.fingerprint}:{split}".encode())
    for e in encoded:
        h.update(repr((e.ids, e.prompt_len)).encode())
    return h.hexdigest()[:20]


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
        # persist=False keeps states in memory only (tests, throwaway models)
        self.directory = (directory or cache_root() / "states") if persist else None
        self.max_tokens = max_tokens
        self.progress = progress
        self._memory: dict[str, list[torch.Tensor]] = {}

    def get(self, encoded: Sequence[Encoded], desc: str = "states") -> list[torch.Tensor]:
        """One (len_i, H) tensor per example, in the order given."""
        key = _key(self.base, self.split, encoded)
        if key in self._memory:
            return self._memory[key]
        file = self.directory / f"{key}.safetensors" if self.directory else None
        if file is not None and file.is_file():
            data = load_file(str(file))
            states = list(torch.split(data["states"], data["lengths"].tolist()))
        else:
            states = self._compute(encoded, desc)
            if file is not None:
                self._save(file, states)
        self._memory[key] = states
        return states

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

    @staticmethod
    def _save(file: Path, states: list[torch.Tensor]) -> None:
        file.parent.mkdir(parents=True, exist_ok=True)
        lengths = torch.tensor([s.shape[0] for s in states])
        with atomic_path(file) as tmp:
            save_file({"states": torch.cat(states).contiguous(), "lengths": lengths}, str(tmp))


def pad_states(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack (len_i, H) states into (B, T, H), zero right-padding."""
    width = max(s.shape[0] for s in states)
    out = states[0].new_zeros(len(states), width, states[0].shape[1])
    for i, s in enumerate(states):
        out[i, : s.shape[0]] = s
    return out
