"""`lorafuse merge` configs: validation errors and an end-to-end merge to a PEFT adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lorafuse.errors import LorafuseError
from lorafuse.library import LoraAdapter
from lorafuse.merging.config import load_merge_config
from lorafuse.merging.run import run_merge


def _adapter(model: torch.nn.Module, path: Path, seed: int, targets=("q_proj", "v_proj")) -> Path:
    torch.manual_seed(seed)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(path)
    peft_model.unload()
    return path


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("method: nope\nexperts: [{path: a}]\n", "unknown method 'nope'"),
        ("method: ties\nparameters: {density: 1.5}\nexperts: [{path: a}]\n", "density"),
        ("method: ties\nparameters: {density: 0.5, bogus: 1}\nexperts: [{path: a}]\n", "bogus"),
        ("method: linear\nexperts: []\n", "experts"),
        ("method: linear\nexperts: [{path: a, wieght: 2}]\n", "unknown field"),
        ("method: [linear\n", "invalid YAML"),
    ],
)
def test_config_errors_are_one_line(tmp_path: Path, body: str, needle: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(LorafuseError) as err:
        load_merge_config(path)
    message = str(err.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_weights_default_to_method_or_one(tmp_path: Path) -> None:
    cfg, _ = load_merge_config(
        _write(tmp_path, "method: linear\nexperts: [{path: a}, {path: b}]\n")
    )
    assert cfg.weights() is None
    cfg, _ = load_merge_config(
        _write(tmp_path, "method: linear\nexperts: [{path: a, weight: 0.3}, {path: b}]\n")
    )
    assert cfg.weights() == [0.3, 1.0]


def test_merge_writes_peft_adapter_with_card(tiny_llama, tmp_path: Path) -> None:
    a = _adapter(tiny_llama, tmp_path / "a", 1)
    b = _adapter(tiny_llama, tmp_path / "b", 2)
    path = _write(
        tmp_path,
        "method: task_arithmetic\nparameters: {scale: 0.5}\n"
        "experts: [{path: a, weight: 1.0}, {path: b, weight: -2.0}]\n",
    )
    cfg, root = load_merge_config(path)
    out = run_merge(cfg, tmp_path / "out", root=root, progress=False)
    merged = LoraAdapter.open(out)
    for module in merged.module_names:
        want = 0.5 * (LoraAdapter.open(a).delta(module) - 2.0 * LoraAdapter.open(b).delta(module))
        torch.testing.assert_close(merged.delta(module), want, atol=1e-6, rtol=1e-5)
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and "scale: 0.5" in card
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        before = tiny_llama(ids).logits
        model = PeftModel.from_pretrained(tiny_llama, str(out))
        after = model(ids).logits
    assert not torch.allclose(before, after)


def test_incompatible_experts_refused(tiny_llama, tmp_path: Path) -> None:
    """Other target modules are fine (zero delta where one has none); other bases are not."""
    import json

    _adapter(tiny_llama, tmp_path / "a", 1)
    _adapter(tiny_llama, tmp_path / "b", 2, targets=("q_proj", "k_proj"))
    cfg, root = load_merge_config(
        _write(tmp_path, "method: linear\nexperts: [{path: a}, {path: b}]\n")
    )
    merged = LoraAdapter.open(run_merge(cfg, tmp_path / "ok", root=root, progress=False))
    assert any("k_proj" in m for m in merged.module_names)
    assert any("v_proj" in m for m in merged.module_names)
    for name, base in (("a", "org/one"), ("b", "org/two")):
        config_path = tmp_path / name / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "base_model_name_or_path": base}))
    with pytest.raises(LorafuseError, match="base_model_name_or_path"):
        run_merge(cfg, tmp_path / "out", root=root, progress=False)
    assert not (tmp_path / "out").exists()
