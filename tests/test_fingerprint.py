"""Stamps on resumable artefacts: a resume never mixes two runs.

- a training checkpoint of another run (other settings or examples) is not resumed: the
  run restarts, says so, and equals a fresh run;
- a library being trained refuses (one line) to be continued by another run config;
- an ELREA build rebuilds when the run changes (``--n-clusters 3`` after 2 never pairs
  old cluster experts with new clusters) and equals a fresh build;
- a state shard recording another model or split is never read;
- ``lorafuse elrea`` on the shipped library writes to the cache, not the package.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import CONFIG, adapter_weights, pattern_examples
from tiny_cli import call, error_lines, make_tiny_model, task_file

import lorafuse.training.train as train_mod
from lorafuse.core.states import StateCache
from lorafuse.errors import LorafuseError
from lorafuse.fingerprint import Stamp, read_stamp, refuse_mismatch, write_stamp
from lorafuse.models import BaseModel
from lorafuse.training.train import train_adapter


def test_stamp_roundtrip_and_mismatch_message(tmp_path: Path) -> None:
    a = Stamp.of({"lr": 1}, [1, 2], "m")
    assert a == Stamp.of({"lr": 1}, [1, 2], "m")
    b = Stamp.of({"lr": 2}, [1, 2], "m")
    assert b.differs(a) == ["config"]
    assert a.differs(None) == ["config", "data", "model"]
    write_stamp(tmp_path / "fingerprint.json", a, note="x")
    assert read_stamp(tmp_path / "fingerprint.json") == a
    assert read_stamp(tmp_path / "missing.json") is None
    refuse_mismatch(tmp_path, a, a, "it", "hint")  # equal: no error
    with pytest.raises(LorafuseError) as err:
        refuse_mismatch(tmp_path / "f.json", a, b, "the build", "start over")
    line = str(err.value)
    assert "\n" not in line and "f.json" in line and "config differs" in line


def interrupted(base, encoded, cache, config, out, monkeypatch, at: int = 5) -> None:
    """Train until the loss call ``at`` raises (a checkpoint at step 3 stays behind)."""
    real, calls = train_mod.answer_loss, {"n": 0}

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(train_mod, "answer_loss", crash)
        train_adapter(base, encoded, cache, config, out, progress=False)
    assert (out.parent / f".{out.name}.ckpt.pt").is_file()


@pytest.mark.parametrize("change", ["config", "data"])
def test_checkpoint_of_another_run_restarts(
    change: str, tiny_base: BaseModel, tmp_path: Path, monkeypatch, capsys
) -> None:
    cache = StateCache(tiny_base, 1, directory=tmp_path / "states", progress=False)
    encoded = pattern_examples()
    out = tmp_path / "run" / "expert"
    interrupted(tiny_base, encoded, cache, CONFIG, out, monkeypatch)
    capsys.readouterr()
    config, data = CONFIG, encoded
    if change == "config":
        config = CONFIG.model_copy(update={"lr": 1e-2})
    else:
        data = pattern_examples(seed=1)
    resumed = train_adapter(tiny_base, data, cache, config, out, progress=False)
    err = capsys.readouterr().err
    assert "checkpoint not resumed" in err and f"{change} differs" in err
    assert resumed.steps == CONFIG.steps and len(resumed.losses) == CONFIG.steps
    fresh = train_adapter(tiny_base, data, cache, config, tmp_path / "fresh", progress=False)
    got, want = adapter_weights(out), adapter_weights(fresh.path)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_checkpoint_of_the_same_run_resumes_quietly(
    tiny_base: BaseModel, tmp_path: Path, monkeypatch, capsys
) -> None:
    cache = StateCache(tiny_base, 1, directory=tmp_path / "states", progress=False)
    encoded = pattern_examples()
    out = tmp_path / "run" / "expert"
    interrupted(tiny_base, encoded, cache, CONFIG, out, monkeypatch)
    capsys.readouterr()
    train_adapter(tiny_base, encoded, cache, CONFIG, out, progress=False)
    assert "not resumed" not in capsys.readouterr().err


def test_state_shard_of_another_model_is_not_read(tiny_base: BaseModel, tmp_path: Path) -> None:
    encoded = pattern_examples(4)
    first = StateCache(tiny_base, 1, directory=tmp_path, progress=False)
    want = first.get(encoded)
    (shard,) = tmp_path.glob("*.safetensors")
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["model"] == tiny_base.fingerprint and meta["split"] == "1"
    tensors = load_file(shard)
    save_file(  # same name and keys, other model's (garbage) states
        {"states": tensors["states"] + 99, "lengths": tensors["lengths"]},
        str(shard),
        metadata={**meta, "model": "someothermodel00"},
    )
    again = StateCache(tiny_base, 1, directory=tmp_path, progress=False).get(encoded)
    for a, b in zip(again, want, strict=True):
        assert torch.equal(a, b)


def test_elrea_for_the_shipped_library_builds_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    from lorafuse.elrea.pipeline import elrea_build_dir, elrea_dir
    from lorafuse.workspace import DEFAULT_LIBRARY

    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path / "cache"))
    built = elrea_build_dir(DEFAULT_LIBRARY, "gradient")
    assert built.is_relative_to(tmp_path / "cache")
    assert elrea_dir(DEFAULT_LIBRARY, "gradient") == DEFAULT_LIBRARY / "elrea" / "gradient"
    built.mkdir(parents=True)
    (built / "elrea.json").write_text("{}")
    assert elrea_dir(DEFAULT_LIBRARY, "gradient") == built  # a user's build wins once made
    mine = tmp_path / "lib"
    assert elrea_build_dir(mine, "random") == elrea_dir(mine, "random") == mine / "elrea" / "random"


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("stamps")
    env = {"LORAFUSE_CACHE": str(root / "cache")}
    make_tiny_model(root / "model")
    task_file(root / "tasks.jsonl", per_split=(40, 4, 4))
    code, _, err = call(["train", "--out", "lib", *common(), *TRAIN], root, env)
    assert code == 0, err[-2000:]
    return root, env


TRAIN = ["--steps", "6", "--multitask-steps", "8", "--batch-size", "4", "--top-layers", "1"]


def common() -> list[str]:
    return ["--base-model", "model", "--tasks", "tasks.jsonl"]


def test_library_build_refuses_another_run(tiny_world) -> None:
    root, env = tiny_world
    before = (root / "lib" / "library.json").read_text()
    code, _, err = call(["train", "--out", "lib", *common(), *TRAIN, "--lr", "0.01"], root, env)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "library.json" in lines[0] and "config differs" in lines[0]
    assert (root / "lib" / "library.json").read_text() == before
    code, out, err = call(["train", "--out", "lib", *common(), *TRAIN], root, env)  # same run
    assert code == 0, err[-2000:]
    assert "3 experts" in out


def test_elrea_with_more_clusters_rebuilds(tiny_world) -> None:
    root, env = tiny_world
    for name in ("lib_a", "lib_b"):
        shutil.copytree(root / "lib", root / name, ignore=shutil.ignore_patterns("elrea"))
    small = ["--dim", "16", "--total-steps", "20"]
    code, _, err = call(
        ["elrea", "--library", "lib_a", *common(), *small, "--n-clusters", "2"], root, env
    )
    assert code == 0, err[-2000:]
    build = root / "lib_a" / "elrea" / "gradient"
    assert len(json.loads((build / "elrea.json").read_text())["experts"]) == 2
    args = ["elrea", *common(), *small, "--n-clusters", "3"]
    code, out, err = call([*args, "--library", "lib_a"], root, env)
    assert code == 0, err[-2000:]
    assert "rebuilding from scratch" in err and "config differs" in err
    code, _, err = call([*args, "--library", "lib_b"], root, env)  # a fresh 3-cluster build
    assert code == 0, err[-2000:]
    fresh = root / "lib_b" / "elrea" / "gradient"
    info, want = (json.loads((d / "elrea.json").read_text()) for d in (build, fresh))
    assert info["experts"] == want["experts"] and info["centroids"] == want["centroids"]
    listed = sorted(e["path"] for e in info["experts"])
    assert sorted(f"experts/{p.name}" for p in (build / "experts").iterdir()) == listed
    for entry in info["experts"]:
        a = load_file(build / entry["path"] / "adapter_model.safetensors")
        b = load_file(fresh / entry["path"] / "adapter_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in b)
