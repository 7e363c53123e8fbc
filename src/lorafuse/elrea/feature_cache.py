"""Where ELREA's gradient features are cached: a folder per run, named by a hash of the base
model, the adapter's files, the settings and the ordered examples; one file per chunk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorafuse.core.encode import Encoded
from lorafuse.core.states import example_key
from lorafuse.elrea.adam_state import AdamMoments, adam_moments
from lorafuse.library import LoraAdapter
from lorafuse.models import BaseModel, cache_root

_FORMAT = 1  # bump when the feature definition changes (invalidates the disk cache)


def _sha1_file(h: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)


def _adapter_fingerprint(adapter: LoraAdapter) -> str:
    h = hashlib.sha1()
    _sha1_file(h, adapter.path / "adapter_config.json")
    _sha1_file(h, adapter.weights_path)
    return h.hexdigest()[:16]


def _examples_hash(encoded: Sequence[Encoded]) -> str:
    """The ordered examples: token ids (via the state-cache key) and where the prompt ends."""
    h = hashlib.sha1()
    for e in encoded:
        h.update(f"{example_key(e)}:{e.prompt_len};".encode())
    return h.hexdigest()[:16]


def _key(**fields: object) -> str:
    text = json.dumps({"format": _FORMAT, **fields}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class FeaturePlan:
    """Where the features of one call go: a folder named by every setting, one file per
    chunk of examples (``chunks[c]`` are indices into the examples, ``files[c]`` its file)."""

    run: Path
    settings: dict
    chunks: list[list[int]]
    files: list[Path]

    @property
    def todo(self) -> list[int]:
        """The chunks not on disk yet."""
        return [c for c, f in enumerate(self.files) if not f.is_file()]

    def load(self) -> torch.Tensor:
        return torch.cat([load_file(str(f))["features"] for f in self.files])


def _adam_state(adam_state) -> tuple[AdamMoments | None, str]:
    """The given Adam moments and their hash (``estimated`` when none are given)."""
    moments = adam_moments(adam_state)
    return moments, "estimated" if moments is None else moments.digest()


def feature_plan(
    base: BaseModel,
    adapter: LoraAdapter,
    encoded: Sequence[Encoded],
    split: int,
    *,
    dim: int,
    seed: int,
    target: str,
    projection: str,
    eps: float,
    v_hash: str,
    normalisation: str,
    chunk_size: int,
    directory: str | Path | None,
) -> FeaturePlan:
    root = Path(directory) if directory is not None else cache_root() / "grad_features"
    settings = dict(
        base=base.fingerprint,
        adapter=_adapter_fingerprint(adapter),
        split=split,
        target=target,
        dim=dim,
        seed=seed,
        projection=projection,
        eps=eps,
        normalisation=normalisation,  # "adam_update" (both moments) or "second_moment"
        second_moment=v_hash,  # the hash of all the given moments, step and betas
        examples=_examples_hash(encoded),
    )
    run = root / _key(kind="features", **settings)
    chunks = [
        list(range(s, min(s + chunk_size, len(encoded))))
        for s in range(0, len(encoded), chunk_size)
    ]
    files = [run / f"chunk-{c:05d}-{len(ix)}.safetensors" for c, ix in enumerate(chunks)]
    return FeaturePlan(run, settings, chunks, files)
