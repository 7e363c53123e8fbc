"""Kill -9 harness: ``train``, ``merge --full-model``, ``elrea`` and ``library create`` are
started as real processes on a tiny model, killed with SIGKILL at several points, then
rerun. The rerun must complete and equal the uninterrupted run, and after every kill the
output path holds no partial output (only complete files; leftovers are hidden ``.*``).

Kill points are deterministic: a child kills itself at the n-th call of a function (the
n-th ``os.rename``/``os.replace`` = an atomic publish, an optimiser step inside a
checkpointed run, a file copy), plus one kill from outside after a delay.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_cli import Zygote, make_tiny_model, task_file

KILLED = -9
TRAIN = ["--steps", "30", "--multitask-steps", "40", "--batch-size", "4"]
TRAIN += ["--top-layers", "1", "--rank", "2"]
ELREA = ["--n-clusters", "2", "--dim", "16", "--total-steps", "40"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """A zygote, a tiny model and task file, and the uninterrupted reference outputs."""
    root = tmp_path_factory.mktemp("kill")
    make_tiny_model(root / "model")
    task_file(root / "tasks.jsonl", per_split=(40, 4, 4))
    zygote = Zygote()
    world = {"root": root, "zygote": zygote, "env": {"LORAFUSE_CACHE": str(root / "cache")}}
    ok(cli(world, ["train", "--out", "ref_lib", *common(), *TRAIN]))
    shutil.copytree(root / "ref_lib", root / "elrea_lib")
    ok(cli(world, ["elrea", "--library", "elrea_lib", *common(), *ELREA]))
    write_merge_config(root / "merge.yaml")
    ok(cli(world, ["merge", "merge.yaml", "--out", "ref_merged", "--full-model"]))
    ok(cli(world, ["library", "create", "ref_created", *experts(root / "ref_lib")]))
    yield world
    zygote.close()


def common() -> list[str]:
    return ["--base-model", "model", "--tasks", "tasks.jsonl"]


def experts(lib: Path) -> list[str]:
    return [str(lib / "experts" / "up"), str(lib / "experts" / "rev")]


def write_merge_config(path: Path) -> None:
    path.write_text(
        "base_model: model\nmethod: ties\nparameters: {density: 0.5}\nexperts:\n"
        "  - path: ref_lib/experts/up\n  - path: ref_lib/experts/rev\n"
    )


def cli(world, args, **kill) -> tuple[int, str, str]:
    return world["zygote"].run(args, cwd=world["root"], env=world["env"], **kill)


def ok(result: tuple[int, str, str]) -> str:
    code, out, err = result
    assert code == 0, err[-2000:]
    return out


def assert_no_partial(path: Path) -> None:
    """Every visible file under ``path`` is complete: JSON parses, safetensors load, and
    every visible adapter folder has its config and weights."""
    if not path.exists():
        return
    for file in path.rglob("*"):
        if any(part.startswith(".") for part in file.relative_to(path).parts):
            continue  # hidden: temp siblings, checkpoints (never read as output)
        if file.suffix == ".json":
            json.loads(file.read_text())
        elif file.suffix == ".safetensors":
            load_file(file)
        elif file.is_dir() and file.parent.name == "experts":
            assert (file / "adapter_config.json").is_file(), file
            assert (file / "adapter_model.safetensors").is_file(), file
    manifest = path / "library.json"
    if manifest.is_file():  # what the manifest lists is there
        for entry in json.loads(manifest.read_text())["experts"]:
            assert (path / entry["path"] / "adapter_model.safetensors").is_file(), entry


def assert_same_tensors(a: Path, b: Path) -> None:
    """Every safetensors file under ``a`` equals its twin under ``b``, bit for bit."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors") if not _hidden(p, a))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors") if not _hidden(p, b))
    for rel in files:
        x, y = load_file(a / rel), load_file(b / rel)
        assert x.keys() == y.keys(), rel
        for k in x:
            assert torch.equal(x[k], y[k]), (rel, k)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def kill_then_finish(world, args: list[str], out: Path, kills: list[dict]) -> None:
    """Run ``args`` once per kill (each run resuming the last), checking the output after
    each kill, then run it to completion."""
    for kill in kills:
        code, _, err = cli(world, args, **kill)
        assert code == KILLED or (code == 0 and "kill_after_s" in kill), (kill, code, err[-2000:])
        assert_no_partial(out)
    ok(cli(world, args))
    assert_no_partial(out)


def test_train_killed_resumes_to_the_same_library(world) -> None:
    root = world["root"]
    kills = [
        {"kill_after_s": 0.3},  # from outside (a fast machine may finish first: then 0)
        {"kill_at": ("torch.optim.AdamW.step", 28, False)},  # after the step-25 checkpoint
        {"kill_at": ("os.rename", 1, True)},  # expert published, manifest not yet written
        {"kill_at": ("os.replace", 2, False)},  # mid-way through the next expert's writes
        {"kill_at": ("torch.optim.AdamW.step", 30, False)},  # multi-task adapter, ckpt at 25
    ]
    args = ["train", "--out", "lib", *common(), *TRAIN]
    kill_then_finish(world, args, root / "lib", kills)
    assert_same_tensors(root / "lib", root / "ref_lib")
    got, ref = (json.loads((root / d / "library.json").read_text()) for d in ("lib", "ref_lib"))
    assert [(e["name"], e["train"]) for e in got["experts"]] == [
        (e["name"], e["train"]) for e in ref["experts"]
    ]


def test_merge_full_model_killed_leaves_nothing(world) -> None:
    root = world["root"]
    kills = [
        {"kill_at": ("os.fsync", 2, True)},  # files written and synced, not yet published
        {"kill_at": ("os.rename", 1, False)},  # just before the folder is published
    ]
    args = ["merge", "merge.yaml", "--out", "merged", "--full-model"]
    for kill in kills:
        code, _, err = cli(world, args, **kill)
        assert code == KILLED, (kill, code, err[-2000:])
        assert not (root / "merged").exists()  # all or nothing
    code, _, err = cli(world, args, kill_after_s=0.2)  # from outside: all or nothing too
    assert code in (KILLED, 0), err[-2000:]
    if code == KILLED:
        assert not (root / "merged").exists()
    else:
        shutil.rmtree(root / "merged")
    ok(cli(world, args))
    assert_same_tensors(root / "merged", root / "ref_merged")
    assert (root / "merged" / "config.json").read_bytes() == (
        root / "ref_merged" / "config.json"
    ).read_bytes()


def test_elrea_killed_resumes_to_the_same_build(world) -> None:
    root = world["root"]
    shutil.copytree(root / "ref_lib", root / "lib_e")
    shutil.rmtree(world["root"] / "cache" / "grad_features")  # features are recomputed too
    kills = [
        {"kill_at": ("os.replace", 2, True)},  # fingerprint + second moment written
        {"kill_at": ("os.replace", 2, False)},  # while writing feature chunks
        {"kill_at": ("torch.optim.AdamW.step", 12, False)},  # inside the first cluster expert
        {"kill_at": ("os.rename", 1, True)},  # first cluster expert published
    ]
    args = ["elrea", "--library", "lib_e", *common(), *ELREA]
    kill_then_finish(world, args, root / "lib_e" / "elrea", kills)
    build, ref = root / "lib_e" / "elrea" / "gradient", root / "elrea_lib" / "elrea" / "gradient"
    assert_same_tensors(build, ref)
    got, want = (json.loads((d / "elrea.json").read_text()) for d in (build, ref))
    assert got["experts"] == want["experts"]
    assert got["centroids"] == want["centroids"]


def test_library_create_killed_leaves_nothing(world) -> None:
    root = world["root"]
    args = ["library", "create", "created", *experts(root / "ref_lib")]
    for kill in ({"kill_at": ("shutil.copy2", 3, True)}, {"kill_at": ("os.rename", 1, False)}):
        code, _, err = cli(world, args, **kill)
        assert code == KILLED, (kill, code, err[-2000:])
        assert not (root / "created").exists()
    ok(cli(world, args))
    assert_same_tensors(root / "created", root / "ref_created")
    got, ref = (
        json.loads((root / d / "library.json").read_text()) for d in ("created", "ref_created")
    )
    assert got["experts"] == ref["experts"]
