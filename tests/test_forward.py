"""lorafuse.core: collate, the split forward (lower states + adapted top) and the state cache."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorafuse.core.encode import Encoded, collate
from lorafuse.core.forward import lower_states, num_layers, target_logits
from lorafuse.core.states import StateCache, pad_states
from lorafuse.models import BaseModel

PAD = 0
VOCAB = 128


def random_encoded(lengths: list[int], prompt_lens: list[int], seed: int = 0) -> list[Encoded]:
    """Random non-pad token ids of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n, p in zip(lengths, prompt_lens, strict=True):
        ids = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
        out.append(Encoded(ids=tuple(ids), prompt_len=p))
    return out


ENCODED = random_encoded([7, 12, 4, 9], [4, 8, 1, 5])


def full_logits(model: torch.nn.Module, ids: tuple[int, ...]) -> torch.Tensor:
    """Logits (T, V) of one unpadded sequence through the model's own forward."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_collate_positions_and_right_padding() -> None:
    enc = [Encoded((5, 6, 7, 8, 9), 3), Encoded((10, 11), 1), Encoded((12, 13, 14), 1)]
    batch = collate(enc, pad_id=PAD)
    assert batch.input_ids.tolist() == [
        [5, 6, 7, 8, 9],
        [10, 11, PAD, PAD, PAD],
        [12, 13, 14, PAD, PAD],
    ]
    assert batch.lengths.tolist() == [5, 2, 3]
    assert batch.rows.tolist() == [0, 0, 1, 2, 2]
    assert batch.positions.tolist() == [2, 3, 0, 0, 1]
    assert batch.targets.tolist() == [8, 9, 11, 13, 14]
    assert torch.equal(batch.example_index, batch.rows)
    # the token at each predicting position is the one just before its target
    prev = batch.input_ids[batch.rows, batch.positions]
    assert prev.tolist() == [7, 8, 10, 12, 13]
    assert [e.n_targets for e in enc] == [2, 1, 2]


@pytest.mark.parametrize("split", [0, 1, 2])
def test_target_logits_equal_full_forward(tiny_llama: torch.nn.Module, split: int) -> None:
    """Split forward on a right-padded batch == each row's own unpadded full forward."""
    batch = collate(ENCODED, PAD)
    with torch.no_grad():
        states = lower_states(tiny_llama, batch.input_ids, split)
        got = target_logits(tiny_llama, states, batch, split)
        padded = tiny_llama(input_ids=batch.input_ids).logits[batch.rows, batch.positions]
    assert got.shape == (sum(e.n_targets for e in ENCODED), VOCAB)
    torch.testing.assert_close(got, padded, atol=1e-5, rtol=1e-5)
    want = torch.cat([full_logits(tiny_llama, e.ids)[e.prompt_len - 1 : -1] for e in ENCODED])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lower_states_split_zero_is_embedding(tiny_llama: torch.nn.Module) -> None:
    ids = collate(ENCODED, PAD).input_ids
    with torch.no_grad():
        assert torch.equal(lower_states(tiny_llama, ids, 0), tiny_llama.model.embed_tokens(ids))
    assert num_layers(tiny_llama) == 2


def _states_alone(model: torch.nn.Module, enc: list[Encoded], split: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return [lower_states(model, torch.tensor([e.ids]), split)[0] for e in enc]


@pytest.mark.parametrize("max_tokens", [2048, 20])
def test_state_cache_matches_examples_run_alone(
    tiny_base: BaseModel, tmp_path: Path, max_tokens: int
) -> None:
    """Length-sorted, batched, padded computation returns each example's own states in order."""
    cache = StateCache(
        tiny_base, 1, directory=tmp_path / "states", max_tokens=max_tokens, progress=False
    )
    states = cache.get(ENCODED)
    want = _states_alone(tiny_base.model, ENCODED, 1)
    assert [s.shape for s in states] == [(len(e.ids), 32) for e in ENCODED]
    for got, exp in zip(states, want, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    assert all(a is b for a, b in zip(cache.get(ENCODED), states, strict=True))  # memory hit


def test_state_cache_reads_disk_without_recomputing(
    tiny_base: BaseModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "states"
    first = StateCache(tiny_base, 1, directory=directory, progress=False).get(ENCODED)
    files = list(directory.glob("*.safetensors"))
    assert len(files) == 1

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("_compute called although the states are on disk")

    monkeypatch.setattr(StateCache, "_compute", boom)
    second = StateCache(tiny_base, 1, directory=directory, progress=False).get(ENCODED)
    assert len(second) == len(first)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    # another split layer, or an example never seen, must compute
    with pytest.raises(AssertionError, match="_compute called"):
        StateCache(tiny_base, 0, directory=directory, progress=False).get(ENCODED)
    unseen = random_encoded([9], [4], seed=99)
    with pytest.raises(AssertionError, match="_compute called"):
        StateCache(tiny_base, 1, directory=directory, progress=False).get(ENCODED[:1] + unseen)


def test_state_cache_default_directory_is_cache_root(tiny_base: BaseModel) -> None:
    """``directory=None`` means the user cache (``$LORAFUSE_CACHE``, a temp dir here)."""
    from lorafuse.models import cache_root

    cache = StateCache(tiny_base, 1, progress=False)
    assert cache.directory == cache_root() / "states"
    cache.get(ENCODED[:1])
    assert len(list(cache.directory.glob("*.safetensors"))) == 1


def test_pad_states_zero_pads() -> None:
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    out = pad_states([a, b])
    assert out.shape == (2, 5, 4)
    assert torch.equal(out[0, :3], a) and torch.equal(out[1], b)
    assert torch.all(out[0, 3:] == 0)


def test_peft_top_on_plain_base_states(
    tiny_base: BaseModel, tiny_llama: torch.nn.Module, tmp_path: Path
) -> None:
    """LoRA only on layer 1: states below it from the plain base + the PEFT top layer
    == the PEFT model's full forward."""
    cache = StateCache(tiny_base, 1, directory=tmp_path / "states", progress=False)
    states = cache.get(ENCODED)  # computed before any LoRA exists
    torch.manual_seed(3)
    config = LoraConfig(
        init_lora_weights=False, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]
    )
    peft_model = get_peft_model(copy.deepcopy(tiny_llama), config).eval()
    batch = collate(ENCODED, PAD)
    with torch.no_grad():
        got = target_logits(peft_model, pad_states(states), batch, 1)
        want = peft_model(input_ids=batch.input_ids).logits[batch.rows, batch.positions]
        base_logits = target_logits(tiny_llama, pad_states(states), batch, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base_logits).abs().max() > 1e-3  # the LoRA really changes the logits


def test_state_cache_persist_false_writes_nothing(tiny_base: BaseModel, tmp_path: Path) -> None:
    enc = random_encoded([5, 7], [3, 4])
    cache = StateCache(tiny_base, 1, directory=tmp_path, persist=False, progress=False)
    first = cache.get(enc)
    assert all(a is b for a, b in zip(cache.get(enc), first, strict=True))  # from memory
    assert not any(tmp_path.iterdir())


def test_state_cache_is_per_example(tiny_base: BaseModel, tmp_path: Path, monkeypatch) -> None:
    """A union of cached sets is served from disk shards without recomputing anything."""
    a, b = random_encoded([5, 7], [3, 4], seed=1), random_encoded([6, 4], [2, 2], seed=2)
    StateCache(tiny_base, 1, directory=tmp_path, progress=False).get(a)
    StateCache(tiny_base, 1, directory=tmp_path, progress=False).get(b)
    fresh = StateCache(tiny_base, 1, directory=tmp_path, progress=False)

    def boom(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(fresh, "_compute", boom)
    union = fresh.get(b[::-1] + a)
    assert [s.shape[0] for s in union] == [len(e.ids) for e in b[::-1] + a]
