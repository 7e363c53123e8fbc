"""``lorafuse train --ray``: one Ray task per expert equals the serial run; reruns skip.

A local 2-CPU Ray instance (started once for the module, ~5 s); skipped without Ray.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_families import CharTokenizer

from lorafuse.core.states import StateCache
from lorafuse.errors import LorafuseError
from lorafuse.library.manifest import read_manifest
from lorafuse.tasks.example import Example, TaskSuite
from lorafuse.training.config import TrainConfig
from lorafuse.training.library import train_library

CONFIG = TrainConfig(
    steps=4, batch_size=4, lr=5e-2, warmup=1, rank=2, alpha=4, top_layers=1,
    target_modules=["q_proj", "v_proj"], checkpoint_every=2,
)  # fmt: skip
TASKS = ("copy", "upper", "count")


def suite() -> TaskSuite:
    """Three tasks of 6 training examples each (prompts of different lengths)."""
    rows = [Example(t, f"{t} {i} " + "x" * i, f"{t[0]}{i}") for i in range(6) for t in TASKS]
    return TaskSuite({"train": rows, "val": rows[:3], "test": rows[:3]})


def weights(library: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(library / "experts" / name / "adapter_model.safetensors"))


def test_ray_library_equals_serial_and_rerun_skips_finished(
    ray_local, tiny_base, tmp_path: Path
) -> None:
    from lorafuse.training.distributed import train_library_ray

    base = dataclasses.replace(tiny_base, tokenizer=CharTokenizer())
    serial_cache = StateCache(base, 1, directory=tmp_path / "serial_states", progress=False)
    serial = train_library(
        base, suite(), tmp_path / "serial", CONFIG, multitask_steps=6, cache=serial_cache,
        progress=False,
    )  # fmt: skip
    out = tmp_path / "ray"
    kwargs = dict(multitask_steps=6, cache_dir=tmp_path / "ray_states", progress=False)
    distributed = train_library_ray(base, suite(), out, CONFIG, **kwargs)

    def summary(manifest):
        return [(e.name, e.kind, e.tasks, e.train) for e in manifest.experts]

    assert summary(distributed) == summary(serial) == summary(read_manifest(out))
    assert [e.name for e in serial.experts] == [*TASKS, "multitask"]
    assert any((tmp_path / "ray_states").glob("*.safetensors"))  # workers shared the cache
    for name in [*TASKS, "multitask"]:
        got, want = weights(out, name), weights(tmp_path / "serial", name)
        assert got.keys() == want.keys() and len(got) == 4
        for key in want:  # same seed, same states, same batches: bit for bit
            assert torch.equal(got[key], want[key]), (name, key)

    # a rerun trains only what is missing (here: one expert whose folder was lost)
    kept = {n: (out / "experts" / n / "adapter_model.safetensors").stat().st_mtime_ns
            for n in ("copy", "count", "multitask")}  # fmt: skip
    for f in (out / "experts" / "upper").iterdir():
        f.unlink()
    (out / "experts" / "upper").rmdir()
    again = train_library_ray(base, suite(), out, CONFIG, **kwargs)
    assert summary(again) == summary(serial)
    for name, mtime in kept.items():
        assert (out / "experts" / name / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    for key, value in weights(tmp_path / "serial", "upper").items():
        assert torch.equal(weights(out, "upper")[key], value)


def test_without_ray_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorafuse.training import distributed

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(LorafuseError, match=r"pip install 'lorafuse\[ray\]'"):
        distributed.import_ray()


def test_ray_features_equal_serial_and_rerun_fills_only_missing_chunks(
    ray_local, tiny_base, tmp_path: Path
) -> None:
    """ELREA gradient features as one Ray task per chunk: the serial chunks, bit for bit."""
    from test_grad_features import examples, make_adapter

    from lorafuse.elrea import gradient_features
    from lorafuse.elrea.distributed import gradient_features_ray

    adapter = make_adapter(tiny_base.model, tmp_path / "adapter", layers=[1])
    encoded = examples(10)
    kwargs = dict(dim=16, chunk_size=4, batch_size=3, progress=False)
    serial_cache = StateCache(tiny_base, 1, tmp_path / "serial_states", progress=False)
    want = gradient_features(
        tiny_base, adapter, encoded, serial_cache, directory=tmp_path / "serial", **kwargs
    )
    cache = StateCache(tiny_base, 1, tmp_path / "ray_states", progress=False)
    out = tmp_path / "ray"
    got = gradient_features_ray(tiny_base, adapter, encoded, cache, directory=out, **kwargs)
    assert got.shape == (10, 16) and torch.equal(got, want)

    chunks = sorted(out.glob("*/chunk-*.safetensors"))
    assert [c.name for c in chunks] == [
        "chunk-00000-4.safetensors", "chunk-00001-4.safetensors", "chunk-00002-2.safetensors"
    ]  # fmt: skip
    kept = {c: c.stat().st_mtime_ns for c in (chunks[0], chunks[2])}
    chunks[1].unlink()  # a chunk lost (an interrupted run never wrote it)
    again = gradient_features_ray(tiny_base, adapter, encoded, cache, directory=out, **kwargs)
    assert torch.equal(again, want) and chunks[1].is_file()
    assert {c: c.stat().st_mtime_ns for c in kept} == kept
