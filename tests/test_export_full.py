"""`lorafuse export SRC OUT --full-model`: the saved model's logits equal the base with the
adapter merged in by PEFT (``merge_and_unload``) on a probe input (tiny model, mixed ranks,
an alpha pattern and rsLoRA, so every scaling rule is exercised)."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_cli import make_tiny_model, run_main
from transformers import AutoModelForCausalLM

PROBE = torch.arange(3, 27).reshape(2, 12)


def test_full_model_export_is_peft_merge_and_unload(tmp_path, monkeypatch, capsys) -> None:
    base_dir = make_tiny_model(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    torch.manual_seed(5)
    cfg = LoraConfig(
        r=3,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        rank_pattern={"q_proj": 5},
        alpha_pattern={"v_proj": 1.5},
        init_lora_weights=False,
    )
    peft = get_peft_model(copy.deepcopy(base), cfg)
    peft.save_pretrained(tmp_path / "adapter")

    code, out, err = run_main(
        [
            "export",
            str(tmp_path / "adapter"),
            str(tmp_path / "full"),
            "--full-model",
            "--base-model",
            str(base_dir),
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "full model" in out
    with torch.no_grad():
        reference = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter"))
        want = reference.merge_and_unload()(input_ids=PROBE).logits
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
        got = saved.eval()(input_ids=PROBE).logits
        plain = base(input_ids=PROBE).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter really changes the logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
