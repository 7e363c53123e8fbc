"""`lorafuse export`: the vLLM export computes the source's deltas (up to the truncation it
reports), at one allowed rank, with a config holding nothing vLLM ignores or refuses."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lorafuse.cli import main
from lorafuse.errors import LorafuseError
from lorafuse.library import LoraAdapter
from lorafuse.serving import VLLM_RANKS, export_adapter

INPUT_IDS = torch.arange(3, 19).reshape(2, 8)
# what vLLM ignores (patterns) or refuses (DoRA, modules_to_save, bias, rsLoRA scaling rules
# that differ between versions): none may be set in an export
IGNORED_OR_REFUSED = ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern")


def make(base, path: Path, seed: int, **lora) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(path)
    return path


@pytest.fixture
def mixed(tiny_llama, tmp_path) -> Path:
    """Ranks 5/3/2 by pattern, an alpha pattern, rsLoRA: all ignored by vLLM if kept."""
    return make(
        tiny_llama,
        tmp_path / "mixed",
        3,
        r=3,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"q_proj": 5, "layers.1.mlp.up_proj": 2},
        alpha_pattern={"v_proj": 1.5},
    )


def logits(base, path: Path) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(base), str(path))(input_ids=INPUT_IDS).logits


def check_vllm_config(path: Path) -> int:
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] in VLLM_RANKS and config["lora_alpha"] == config["r"]
    assert not config["use_rslora"] and not config["use_dora"]
    assert not config["modules_to_save"] and config["bias"] == "none"
    assert not any(config.get(k) for k in IGNORED_OR_REFUSED)
    adapter = LoraAdapter.open(path)
    assert {adapter.module_rank(m) for m in adapter.module_names} == {config["r"]}
    return config["r"]


def test_vllm_export_pads_to_an_allowed_rank_exactly(tiny_llama, mixed, tmp_path):
    lines: list[str] = []
    result = export_adapter(mixed, tmp_path / "out", report=lines.append)
    assert result.rank == 8 and result.truncation == {}
    assert check_vllm_config(tmp_path / "out") == 8
    src, dst = LoraAdapter.open(mixed), LoraAdapter.open(tmp_path / "out")
    assert dst.module_names == src.module_names
    for m in src.module_names:
        torch.testing.assert_close(dst.delta(m), src.delta(m), rtol=1e-6, atol=1e-7)
    # what a PEFT-compatible engine that reads only r and lora_alpha computes
    torch.testing.assert_close(logits(tiny_llama, tmp_path / "out"), logits(tiny_llama, mixed))
    assert "no re-compression" in lines[0]


def test_vllm_export_reports_the_truncation_it_makes(tiny_llama, tmp_path):
    src_path = make(
        tiny_llama, tmp_path / "big", 4, r=16, lora_alpha=16, target_modules=["q_proj", "up_proj"]
    )
    lines: list[str] = []
    result = export_adapter(src_path, tmp_path / "out", rank=8, report=lines.append)
    assert check_vllm_config(tmp_path / "out") == 8
    src, dst = LoraAdapter.open(src_path), LoraAdapter.open(tmp_path / "out")
    assert set(result.truncation) == set(src.module_names)
    for m in src.module_names:
        want, got = src.delta(m).double(), dst.delta(m).double()
        error = float(torch.linalg.matrix_norm(want - got) / torch.linalg.matrix_norm(want))
        assert result.truncation[m].rel_error == pytest.approx(error, rel=1e-4)
        assert error > 0.01  # random rank-16 deltas really lose at rank 8
    assert "relative Frobenius error mean" in lines[0]


def test_rank_outside_vllm_set_is_refused(mixed, tmp_path):
    with pytest.raises(LorafuseError, match="allowed: 8, 16"):
        export_adapter(mixed, tmp_path / "out", rank=12, report=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_peft_export_round_trips_and_caps_rank(tiny_llama, mixed, tmp_path):
    export_adapter(mixed, tmp_path / "plain", target="peft", report=lambda _: None)
    torch.testing.assert_close(logits(tiny_llama, tmp_path / "plain"), logits(tiny_llama, mixed))
    result = export_adapter(mixed, tmp_path / "cap", target="peft", rank=2, report=lambda _: None)
    capped = LoraAdapter.open(tmp_path / "cap")
    assert max(capped.module_rank(m) for m in capped.module_names) == 2
    src = LoraAdapter.open(mixed)
    assert set(result.truncation) == {m for m in src.module_names if src.module_rank(m) > 2}


def run_cli(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lorafuse", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return (code, *capsys.readouterr())


def test_export_command(mixed, tmp_path, monkeypatch, capsys):
    code, out, _ = run_cli(
        ["export", str(mixed), str(tmp_path / "v"), "--for", "vllm"], monkeypatch, capsys
    )
    assert code == 0 and "rank 8" in out
    check_vllm_config(tmp_path / "v")
    config = json.loads((mixed / "adapter_config.json").read_text())
    (mixed / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    code, _, err = run_cli(["export", str(mixed), str(tmp_path / "w")], monkeypatch, capsys)
    assert code == 2 and "use_dora" in err and err.count("\n") == 1
