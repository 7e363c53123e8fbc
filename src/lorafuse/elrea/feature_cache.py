"""Where ELREA's gradient features are cached: a folder per run, named by a hash of the base
model, the adapter's files, the settings and the ordered examples; one file per chunk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorafuse.core.encode import Encoded
from lorafuse.core.states import example_key
from lorafuse.elrea.lora_grads import _canonical
from lorafuse.errors import LorafuseError
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


def _tensor_hash(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


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


def _adam_state(
    adam_state: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]] | None,
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """``exp_avg_sq`` per canonical weight name, and its hash (``estimated`` when absent)."""
    if adam_state is None:
        return None, "estimated"
    v_given = {_canonical(k): v for k, v in adam_state.items()}
    v_given = {
        k: (v.get("exp_avg_sq") if isinstance(v, Mapping) else v) for k, v in v_given.items()
    }
    bad = [k for k, v in v_given.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise LorafuseError(f"adam_state has no exp_avg_sq tensor for {bad[0]}")
    v_hash = hashlib.sha1(
        "".join(
            f"{k}:{_tensor_hash(v.detach().float().cpu())}" for k, v in sorted(v_given.items())
        ).encode()
    ).hexdigest()[:16]
    return v_given, v_hash


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
        second_moment=v_hash,
        examples=_examples_hash(encoded),
    )
    run = root / _key(kind="features", **settings)
    chunks = [
        list(range(s, min(s + chunk_size, len(encoded))))
        for s in range(0, len(encoded), chunk_size)
    ]
    files = [run / f"chunk-{c:05d}-{len(ix)}.safetensors" for c, ix in enumerate(chunks)]
    return FeaturePlan(run, settings, chunks, files)
