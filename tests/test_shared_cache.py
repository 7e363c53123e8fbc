"""Two processes sharing one cache (``LORAFUSE_CACHE``) never corrupt it.

Two ``lorafuse eval`` runs start at once on the same tiny model and tasks, so both compute
the same lower-layer states and write the same state shards at the same moment; a third
is killed half-way through writing. Afterwards every shard in the cache reads back whole
and records its model and split, no temporary file is left visible, and the results equal
those of a run alone with a cache of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_cli import Zygote, make_tiny_model, task_file

TRAIN = ["--steps", "8", "--multitask-steps", "8", "--batch-size", "4", "--top-layers", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("shared")
    make_tiny_model(root / "model")
    zygote = Zygote()
    yield root, zygote
    zygote.close()


def eval_args(tasks: str, out: str) -> list[str]:
    return ["eval", "--base-model", "model", "--tasks", tasks, "--library", "lib", "--out", out]


def losses(path: Path) -> dict:
    results = json.loads(path.read_text())
    return {k: v for k, v in results.items() if k in ("tasks", "mean_loss", "methods", "table")}


def test_two_eval_runs_at_once_share_the_cache(setup) -> None:
    root, zygote = setup
    shared = {"LORAFUSE_CACHE": str(root / "shared_cache")}
    task_file(root / "tasks.jsonl")
    train = ["train", "--out", "lib", "--base-model", "model", "--tasks", "tasks.jsonl", *TRAIN]
    code, _, err = zygote.run(train, cwd=root, env={"LORAFUSE_CACHE": str(root / "own")})
    assert code == 0, err[-2000:]
    for round_ in range(3):  # new examples each round: every round writes new shards
        tasks = task_file(root / f"t{round_}.jsonl", tasks=("up", "rev")[: 1 + round_ % 2])
        tasks.write_text(tasks.read_text().replace(" w", f" r{round_}w"))
        alone = {"LORAFUSE_CACHE": str(root / f"alone{round_}")}
        code, _, err = zygote.run(eval_args(tasks.name, f"alone{round_}.json"), cwd=root, env=alone)
        assert code == 0, err[-2000:]
        zygote.start(eval_args(tasks.name, f"a{round_}.json"), cwd=root, env=shared)
        zygote.start(eval_args(tasks.name, f"b{round_}.json"), cwd=root, env=shared)
        zygote.start(  # killed after its shard's temp file is written, before publishing
            eval_args(tasks.name, f"k{round_}.json"),
            cwd=root,
            env=shared,
            kill_at=("os.replace", 1, False),
        )
        results = [zygote.wait() for _ in range(3)]
        for code, _, err in results[:2]:
            assert code == 0, err[-2000:]
        assert results[2][0] == -9
        want = losses(root / f"alone{round_}.json")
        assert want
        for name in ("a", "b"):
            assert losses(root / f"{name}{round_}.json") == want
        assert not (root / f"k{round_}.json").exists()
    shards = sorted((root / "shared_cache" / "states").glob("*.safetensors"))
    assert shards
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            meta = handle.metadata()
        assert set(meta) >= {"keys", "model", "split"}
        assert shard.name.startswith(f"{meta['model']}-{meta['split']}-")
        data = load_file(shard)
        assert int(data["lengths"].sum()) == data["states"].shape[0]
        assert len(json.loads(meta["keys"])) == len(data["lengths"])
    visible = [p for p in (root / "shared_cache").rglob("*") if not p.name.startswith(".")]
    assert all(".tmp-" not in p.name for p in visible)
    # a later run reads the shared cache (and the killed run's leftovers) without error
    code, _, err = zygote.run(eval_args("t0.jsonl", "again.json"), cwd=root, env=shared)
    assert code == 0, err[-2000:]
    assert losses(root / "again.json") == losses(root / "alone0.json")


def test_cache_folder_first_writer_wins(tmp_path: Path) -> None:
    """Two processes converting the same model: the second publish keeps the first folder
    (a reader may be loading it) and drops its own copy, leaving no temp folder behind."""
    from lorafuse.io import atomic_dir

    target = tmp_path / "models" / "m"
    with atomic_dir(target, replace=False) as second:
        with atomic_dir(target, replace=False) as first:
            (first / "w").write_text("first")
        (second / "w").write_text("second")
    assert (target / "w").read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["m"]
