"""lorafuse.training.train: LoRA training on cached states, saving, base restore, resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import save_and_load as peft_save_and_load
from safetensors.torch import load_file

import lorafuse.training.train as train_mod
from lorafuse.core.encode import Encoded
from lorafuse.core.states import StateCache
from lorafuse.eval.harness import model_log_probs, score_examples
from lorafuse.library import LoraAdapter
from lorafuse.models import BaseModel
from lorafuse.training.config import TrainConfig
from lorafuse.training.train import batch_indices, split_layer, top_layers_at, train_adapter

VOCAB = 128
PATTERN = (7, 42, 99)  # every example's answer
CONFIG = TrainConfig(
    steps=8,
    batch_size=4,
    lr=5e-2,  # the tiny model learns visibly in 8 steps at this rate
    warmup=0,
    rank=4,
    alpha=8,
    top_layers=1,
    target_modules=["q_proj", "v_proj"],
    checkpoint_every=3,
)


def pattern_examples(
    n: int = 16, seed: int = 0, pattern: tuple[int, ...] = PATTERN
) -> list[Encoded]:
    """Random prompts (4-8 tokens) all followed by the same answer tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 9, (1,), generator=gen))
        prompt = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        out.append(Encoded(tuple(prompt) + pattern, length))
    return out


@pytest.fixture
def cache(tiny_base: BaseModel, tmp_path: Path) -> StateCache:
    return StateCache(tiny_base, 1, directory=tmp_path / "states", progress=False)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_base_untouched(base: BaseModel, before: dict[str, torch.Tensor]) -> None:
    """No LoRA modules left, same weights, frozen, in eval mode."""
    model = base.model
    assert not hasattr(model, "peft_config")
    assert not any("lora" in name.lower() for name, _ in model.named_modules())
    assert type(model.model.layers[1].self_attn.q_proj) is torch.nn.Linear
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_split_layer() -> None:
    class Fake(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Identity()] * 5)
            self.model.embed_tokens = self.model.norm = self.model.rotary_emb = torch.nn.Identity()
            self.lm_head = torch.nn.Identity()

    fake = Fake()
    assert [split_layer(fake, k) for k in (0, 1, 2, 5, 9)] == [0, 4, 3, 0, 0]
    # top_layers_at inverts split_layer: what a cache at that split needs
    for k in (0, 1, 2, 4):
        assert split_layer(fake, top_layers_at(fake, split_layer(fake, k))) == split_layer(fake, k)


def no_hub(*args: object, **kwargs: object) -> None:
    raise AssertionError("PEFT looked the base model up on the hub")


def test_train_adapter_learns_saves_and_restores_base(
    tiny_base: BaseModel,
    tiny_llama: torch.nn.Module,
    cache: StateCache,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loss falls; the adapter records ``base.name`` without any hub lookup; base restored."""
    fresh = copy.deepcopy(tiny_llama)
    before = snapshot(tiny_base.model)
    encoded = pattern_examples()
    base_scores = score_examples(model_log_probs(tiny_base.model, 1), encoded, cache)

    out = tmp_path / "lib" / "expert"
    with monkeypatch.context() as patch:
        patch.setattr(peft_save_and_load, "check_file_exists_on_hf_hub", no_hub)
        result = train_adapter(tiny_base, encoded, cache, CONFIG, out, progress=False)
    assert result.path == out and result.steps == 8 and len(result.losses) == 8
    assert sum(result.losses[-2:]) / 2 < result.losses[0]
    assert not (out.parent / ".expert.ckpt.pt").exists()  # checkpoint removed when done
    assert_base_untouched(tiny_base, before)

    adapter = LoraAdapter.open(out)
    assert adapter.module_names == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert {adapter.module_rank(m) for m in adapter.module_names} == {4}
    assert {adapter.scaling(m) for m in adapter.module_names} == {2.0}
    assert adapter.base_model == "tiny"
    assert all(adapter.delta(m).abs().max() > 0 for m in adapter.module_names)

    peft_model = PeftModel.from_pretrained(fresh, str(out)).eval()
    ids = torch.tensor([encoded[0].ids])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        plain = tiny_llama(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-3
    trained_scores = score_examples(model_log_probs(peft_model, 1), encoded, cache)
    assert trained_scores.loss.mean() < base_scores.loss.mean() - 0.1


def test_train_adapter_rejects_wrong_cache_split(tiny_base: BaseModel, tmp_path: Path) -> None:
    cache0 = StateCache(tiny_base, 0, directory=tmp_path / "states", progress=False)
    with pytest.raises(ValueError, match="layer 0"):
        train_adapter(tiny_base, pattern_examples(4), cache0, CONFIG, tmp_path / "x")


def test_interrupted_run_resumes_to_the_same_adapter(
    tiny_base: BaseModel, cache: StateCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash during step 5 (checkpoint at step 3), rerun: same weights as one straight run."""
    encoded = pattern_examples()
    before = snapshot(tiny_base.model)
    config = CONFIG.model_copy(update={"warmup": 4})  # the LR schedule state must resume too
    straight = train_adapter(
        tiny_base, encoded, cache, config, tmp_path / "a" / "expert", progress=False
    )

    out = tmp_path / "b" / "expert"
    ckpt = out.parent / ".expert.ckpt.pt"
    real_loss = train_mod.answer_loss
    calls = {"n": 0}

    def crash_at_step_5(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(train_mod, "answer_loss", crash_at_step_5)
        train_adapter(tiny_base, encoded, cache, config, out, progress=False)
    assert not out.exists()  # nothing published
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 3 and len(state["losses"]) == 3
    assert_base_untouched(tiny_base, before)  # also after a crash

    resumed = train_adapter(tiny_base, encoded, cache, config, out, progress=False)
    assert not ckpt.exists()
    assert resumed.steps == 8 and len(resumed.losses) == 8
    assert resumed.losses[:3] == straight.losses[:3]
    got, want = adapter_weights(out), adapter_weights(straight.path)
    assert got.keys() == want.keys() and len(got) == 4
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
    assert_base_untouched(tiny_base, before)


def test_same_seed_same_adapter_other_seed_differs(
    tiny_base: BaseModel, cache: StateCache, tmp_path: Path
) -> None:
    encoded = pattern_examples(8)
    cfg = CONFIG.model_copy(update={"steps": 3})
    a = train_adapter(tiny_base, encoded, cache, cfg, tmp_path / "a", progress=False)
    b = train_adapter(tiny_base, encoded, cache, cfg, tmp_path / "b", progress=False)
    c = train_adapter(
        tiny_base, encoded, cache, cfg.model_copy(update={"seed": 1}), tmp_path / "c",
        progress=False,
    )  # fmt: skip
    wa, wb, wc = (adapter_weights(r.path) for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.allclose(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize("n", [16, 17, 19])
def test_batch_indices_cover_each_index_once_per_epoch(n: int) -> None:
    bs, seed = 4, 3
    per_epoch = n // bs
    epochs = []
    for epoch in range(3):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        batches = [batch_indices(n, s, bs, seed) for s in steps]
        assert all(len(b) == bs for b in batches)
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == len(flat) == per_epoch * bs  # no index twice in an epoch
        assert set(flat) <= set(range(n))
        if n % bs == 0:
            assert sorted(flat) == list(range(n))
        epochs.append(flat)
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_batch_indices_is_pure() -> None:
    forward = [batch_indices(10, s, 3, 7) for s in range(9)]
    backward = [batch_indices(10, s, 3, 7) for s in reversed(range(9))][::-1]
    assert forward == backward
    assert batch_indices(10, 4, 3, 7) == batch_indices(10, 4, 3, 7)
    assert [batch_indices(10, s, 3, 8) for s in range(9)] != forward  # seed matters
    assert sorted(batch_indices(3, 0, 8, 0)) == [0, 1, 2]  # fewer examples than a batch
