"""ELREA's Adam normalisation with both moments (its eq. 5, after LESS): the bias-corrected
update direction against a hand computation, features from an optimizer state, the feature
cache keyed by the normalisation, the adapter's saved state, and the build's record."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from test_elrea_build import CONFIG
from test_grad_features import examples, loop_grads, make_adapter
from tiny_workspace import NAMES, tiny_workspace

from lorafuse.core.states import StateCache
from lorafuse.elrea import gradient_features, project
from lorafuse.elrea.adam_state import (
    AdamMoments,
    adam_moments,
    load_adam_state,
    optimizer_moments,
    save_adam_state,
)
from lorafuse.elrea.pipeline import build_elrea, elrea_dir
from lorafuse.elrea.projection import adam_update


@pytest.fixture
def adapter_top(tiny_base, tmp_path: Path) -> Path:
    return make_adapter(tiny_base.model, tmp_path / "adapter_top", layers=[1])


def test_adam_update_against_hand_computation() -> None:
    g = torch.tensor([[1.0, -2.0]])
    m, v = torch.tensor([0.5, 0.0]), torch.tensor([1.0, 4.0])
    # step 1 taken, so t = 2; b1 = 0.5, b2 = 0.75: 1 - b1^2 = 0.75, 1 - b2^2 = 0.4375
    # m' = (0.25 + 0.5, 0 - 1) / 0.75 = (1, -4/3); v' = (0.75 + 0.25, 3 + 1) / 0.4375
    want = torch.tensor(
        [[1 / (math.sqrt(1 / 0.4375) + 0.1), -4 / 3 / (math.sqrt(4 / 0.4375) + 0.1)]]
    )
    got = adam_update(g, m, v, step=1, betas=(0.5, 0.75), eps=0.1)
    torch.testing.assert_close(got, want)


def test_features_use_the_first_moment_of_an_optimizer_state(
    tiny_base, adapter_top: Path, tmp_path: Path
) -> None:
    cache = StateCache(tiny_base, 1, persist=False, progress=False)
    encoded = examples(6)
    grads, shapes = loop_grads(tiny_base, adapter_top, cache, encoded)
    gen = torch.Generator().manual_seed(7)
    state = {
        name: {
            "exp_avg": torch.randn(shape, generator=gen) * 1e-2,
            "exp_avg_sq": torch.rand(shape, generator=gen) * 1e-3,
            "step": torch.tensor(12.0),
        }
        for name, shape in shapes
    }
    m = torch.cat([s["exp_avg"].reshape(-1) for s in state.values()])
    v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in state.values()])
    kwargs = dict(dim=64, seed=3, directory=tmp_path, progress=False, eps=1e-6)
    got = gradient_features(tiny_base, adapter_top, encoded, cache, adam_state=state, **kwargs)
    t, (b1, b2) = 13, (0.9, 0.999)
    m_hat = (b1 * m + (1 - b1) * grads) / (1 - b1**t)
    v_hat = (b2 * v + (1 - b2) * grads.square()) / (1 - b2**t)
    want = F.normalize(project(m_hat / (v_hat.sqrt() + 1e-6), 64, seed=3), dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the second moment alone: other features, in another cache folder
    only_v = {name: s["exp_avg_sq"] for name, s in state.items()}
    second = gradient_features(tiny_base, adapter_top, encoded, cache, adam_state=only_v, **kwargs)
    assert (second - got).abs().max() > 0.05
    runs = [json.loads(p.read_text()) for p in tmp_path.glob("*/settings.json")]
    assert sorted(r["normalisation"] for r in runs) == ["adam_update", "second_moment"]
    # a state without a step count is the second moment only
    no_step = {n: {k: x for k, x in s.items() if k != "step"} for n, s in state.items()}
    assert adam_moments(no_step).m is None


def test_saved_optimizer_state_round_trips_and_drives_the_build(
    tiny_base, tiny_experts, tmp_path: Path
) -> None:
    ws = tiny_workspace(tiny_base, tiny_experts, tmp_path, per_split=(10, 4, 4))
    base_dir = ws.adapters[NAMES[0]].path
    # an AdamW run's state on the base adapter's LoRA weights
    model = PeftModel.from_pretrained(ws.base.model, str(base_dir), is_trainable=True)
    try:
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.99))
        for _ in range(3):
            opt.zero_grad()
            sum((p * p).sum() for p in params).backward()
            opt.step()
        moments = optimizer_moments(opt, model)
    finally:
        model.unload()
        ws.base.model.requires_grad_(False)
    assert moments.step == 3 and moments.betas == (0.8, 0.99)
    assert set(moments.v) == set(moments.m) and all(".lora_" in k for k in moments.v)
    save_adam_state(base_dir, moments)
    loaded = load_adam_state(base_dir)
    assert isinstance(loaded, AdamMoments) and loaded.digest() == moments.digest()

    out = elrea_dir(ws.library, "gradient")
    info = build_elrea(ws, out, CONFIG.model_copy(update={"total_steps": 10}))
    assert info["adam_normalisation"].startswith("adam_update")
    assert not (out / "second_moment.safetensors").exists()  # nothing estimated

    (base_dir / "optimizer_state.safetensors").unlink()  # without it: a new run, estimated v
    again = build_elrea(ws, out, CONFIG.model_copy(update={"total_steps": 10}))
    assert again["adam_normalisation"].startswith("second_moment")
    assert (out / "second_moment.safetensors").is_file()
    shutil.rmtree(out)
