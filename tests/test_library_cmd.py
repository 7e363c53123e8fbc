"""``lorafuse library create | add | show`` and plain folders of adapters read as libraries."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorafuse.cli import main
from lorafuse.errors import LorafuseError
from lorafuse.library import LoraAdapter, open_library, read_manifest
from lorafuse.library.create import add_expert, create_library, library_rows
from lorafuse.library.manifest import folder_manifest


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["lorafuse", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    for needle in needles:
        assert needle in line, (needle, line)


def same_deltas(a: LoraAdapter, b: LoraAdapter) -> bool:
    return a.module_names == b.module_names and all(
        torch.equal(a.delta(m), b.delta(m)) for m in a.module_names
    )


def test_create_copies_adapters_and_writes_the_manifest(tiny_experts, tmp_path: Path) -> None:
    (tiny_experts[0].path / "checkpoint-5").mkdir(exist_ok=True)  # training debris: not copied
    lib = tmp_path / "lib"
    dirs = [a.path for a in tiny_experts]
    manifest = create_library(
        lib, dirs, names=["double", "my expert", "c"], tasks=["qa", "sum,qa", None]
    )
    assert read_manifest(lib) == manifest
    assert [e.name for e in manifest.experts] == ["double", "my expert", "c"]
    assert [e.tasks for e in manifest.experts] == [["qa"], ["sum", "qa"], []]
    assert manifest.experts[1].path == "experts/my_expert"  # a safe folder for any name
    assert sorted(p.name for p in (lib / "experts" / "double").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    _, opened = open_library(lib)
    for source, copy in zip(tiny_experts, opened.values(), strict=True):
        assert same_deltas(source, copy)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_create_refuses_bad_input_and_writes_nothing(tiny_experts, tmp_path: Path) -> None:
    dirs = [a.path for a in tiny_experts]
    lib = tmp_path / "lib"
    cases = [
        ({"names": ["a", "b"]}, "--name given 2 times for 3 adapters"),
        ({"tasks": ["t"]}, "--task given 1 times for 3 adapters"),
        ({"names": ["a", "b", "a"]}, "expert name(s) a used twice"),
    ]
    for kwargs, message in cases:
        with pytest.raises(LorafuseError, match=message.replace("(", r"\(").replace(")", r"\)")):
            create_library(lib, dirs, **kwargs)
    with pytest.raises(LorafuseError, match="adapter directory not found"):
        create_library(lib, [*dirs, tmp_path / "missing"])
    assert list(tmp_path.iterdir()) == []
    lib.mkdir()
    with pytest.raises(LorafuseError, match="already exists"):
        create_library(lib, dirs)


def test_add_expert_and_its_checks(tiny_experts, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    create_library(lib, [tiny_experts[0].path], tasks=["qa"])
    manifest = add_expert(lib, tiny_experts[1].path, name="double", tasks="sum")
    assert [(e.name, e.tasks) for e in manifest.experts] == [("e0", ["qa"]), ("double", ["sum"])]
    assert read_manifest(lib) == manifest
    _, opened = open_library(lib)
    assert same_deltas(opened["double"], tiny_experts[1])
    with pytest.raises(LorafuseError, match="already has an expert named 'double'"):
        add_expert(lib, tiny_experts[2].path, name="double")
    add_expert(lib, tiny_experts[2].path, name="e0 ")  # folder e0_ : no clash with e0/
    assert len(read_manifest(lib).experts) == 3
    with pytest.raises(LorafuseError, match="no library.json"):
        add_expert(lib / "experts", tiny_experts[2].path)


def test_adapters_of_another_base_are_refused(tiny_experts, tmp_path: Path) -> None:
    named = []
    for a, base in zip(tiny_experts, ["org/one", "org/two"], strict=False):
        shutil.copytree(a.path, tmp_path / base[4:])
        cfg = json.loads((a.path / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base
        (tmp_path / base[4:] / "adapter_config.json").write_text(json.dumps(cfg))
        named.append(tmp_path / base[4:])
    lib = tmp_path / "lib"
    assert create_library(lib, [named[0]]).base_model == "org/one"
    with pytest.raises(LorafuseError, match="base_model_name_or_path 'org/two' differs"):
        add_expert(lib, named[1])
    with pytest.raises(LorafuseError, match="base_model_name_or_path 'org/two' differs"):
        create_library(tmp_path / "lib2", named)
    assert len(read_manifest(lib).experts) == 1 and not (tmp_path / "lib2").exists()


def test_rows_describe_each_expert(tiny_llama, tiny_experts, tmp_path: Path) -> None:
    torch.manual_seed(3)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["k_proj"],
        layers_to_transform=[1],
        rank_pattern={"k_proj": 2},
        use_rslora=True,
        init_lora_weights=False,
    )
    model = get_peft_model(tiny_llama, cfg)
    model.save_pretrained(tmp_path / "folder" / "odd")
    model.unload()
    lib = tmp_path / "lib"
    create_library(lib, [tiny_experts[2].path], tasks=["a,b,c,d"])
    (row,) = library_rows(lib)
    assert row == {
        "name": "e2",
        "rank": "3",
        "alpha": "9",
        "targets": "q_proj,up_proj,v_proj",
        "layers": "0-1",
        "size": f"{tiny_experts[2].num_bytes / 2**20:.2f} MB",
        "tasks": "a,b,c (+1)",
    }
    (odd,) = library_rows(tmp_path / "folder")  # a plain folder: not checked compatible
    assert odd["rank"] == "2" and odd["alpha"] == "8 rs" and odd["tasks"] == "?"
    assert odd["layers"] == "1" and odd["targets"] == "k_proj"


def test_plain_folder_is_a_library_with_unknown_tasks(tiny_experts, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    for a in tiny_experts:
        shutil.copytree(a.path, folder / a.name)
    (folder / "notes").mkdir()  # not an adapter: ignored
    manifest, opened = open_library(folder)
    assert list(opened) == ["e0", "e1", "e2"]
    assert all(e.tasks == [] and e.kind == "private" for e in manifest.experts)
    assert [r["tasks"] for r in library_rows(folder)] == ["?", "?", "?"]
    with pytest.raises(LorafuseError, match="is a single PEFT adapter"):
        folder_manifest(folder / "e0")
    with pytest.raises(LorafuseError, match="no library.json and no subfolder"):
        open_library(folder / "notes")


def test_library_commands(tiny_experts, tmp_path: Path, monkeypatch, capsys) -> None:
    lib = tmp_path / "lib"
    e0, e1, e2 = (str(a.path) for a in tiny_experts)
    code, out, err = run_cli(
        ["library", "create", str(lib), e0, e1, "--name", "float", "--name", "b"]
        + ["--task", "qa", "--task", "sum"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "float" in out and "wrote" in out
    code, out, err = run_cli(["library", "add", str(lib), e2, "--task", "x"], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_cli(["library", "show", str(lib)], monkeypatch, capsys)
    assert code == 0, err
    header, *rows = out.splitlines()[1:]
    assert header.split() == ["name", "rank", "alpha", "targets", "layers", "size", "tasks"]
    assert [r.split()[0] for r in rows] == ["float", "b", "e2"]
    assert [r.split()[-1] for r in rows] == ["qa", "sum", "x"]
    code, _, err = run_cli(["library", "create", str(lib), e0], monkeypatch, capsys)
    one_line_error(code, err, str(lib), "already exists")
    code, _, err = run_cli(
        ["library", "create", str(tmp_path / "l2"), e0, e1, "--task", "qa"], monkeypatch, capsys
    )
    one_line_error(code, err, "--task given 1 times for 2 adapters")
