"""lorafuse.elrea features: per-example LoRA gradients, Adam normalisation, JL projection, cache."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

import lorafuse.elrea.features as feat
import lorafuse.elrea.lora_grads as lora_grads
import lorafuse.elrea.projection as projection
from lorafuse.core.encode import Encoded
from lorafuse.core.states import StateCache
from lorafuse.elrea import (
    adam_normalise,
    estimate_second_moment,
    gradient_features,
    lora_linears,
    per_example_lora_grads,
    per_example_lora_grads_loop,
    project,
    projection_block,
)
from lorafuse.errors import LorafuseError
from lorafuse.models import BaseModel

VOCAB = 128
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def examples(n: int = 10, seed: int = 0) -> list[Encoded]:
    """Prompts of 3-9 tokens and answers of 1-4 tokens: every batch is ragged."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(3, 10, (1,), generator=gen))
        a = int(torch.randint(1, 5, (1,), generator=gen))
        ids = torch.randint(1, VOCAB, (p + a,), generator=gen).tolist()
        out.append(Encoded(tuple(ids), p))
    return out


def make_adapter(model: torch.nn.Module, path: Path, layers: list[int] | None = None) -> Path:
    torch.manual_seed(3)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=MODULES,
        layers_to_transform=layers,
        init_lora_weights=False,  # non-zero B, so lora_A gets gradients too
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(path)
    peft_model.unload()
    model.requires_grad_(False)
    return path


@pytest.fixture
def base64(tiny_base: BaseModel) -> BaseModel:
    """The tiny model in float64 (tight comparisons)."""
    model = copy.deepcopy(tiny_base.model).double()
    return BaseModel(model=model, tokenizer=tiny_base.tokenizer, name="tiny64")


@pytest.fixture
def adapter_all(tiny_base: BaseModel, tmp_path: Path) -> Path:
    return make_adapter(tiny_base.model, tmp_path / "adapter_all")


@pytest.fixture
def adapter_top(tiny_base: BaseModel, tmp_path: Path) -> Path:
    return make_adapter(tiny_base.model, tmp_path / "adapter_top", layers=[1])


def reference_grads(base: BaseModel, adapter: Path, encoded: list[Encoded], target: str):
    """One full HF forward (input ids, no split, no padding) and .backward() per example."""
    model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(adapter)).eval()
    params = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    for _, p in params:
        p.requires_grad_(True)
    rows = []
    for e in encoded:
        ids = e.ids[: e.prompt_len] if target == "prompt" else e.ids
        start = 1 if target == "prompt" else e.prompt_len  # first target token
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        loss = F.cross_entropy(logits[start - 1 : -1], torch.tensor(ids[start:]))
        model.zero_grad()
        loss.backward()
        rows.append(torch.cat([p.grad.reshape(-1) for _, p in params]))
    return [n for n, _ in params], torch.stack(rows)


@pytest.mark.parametrize("target", ["prompt", "answer"])
def test_batched_grads_equal_one_backward_per_example(
    base64: BaseModel, adapter_all: Path, target: str
) -> None:
    encoded = examples(7)
    assert len({len(e.ids) for e in encoded}) > 3 and len({e.prompt_len for e in encoded}) > 3
    names, want = reference_grads(base64, adapter_all, encoded, target)
    cache = StateCache(base64, 0, persist=False, progress=False)
    with feat.peft_adapters(base64, {"x": adapter_all}) as model:
        linears = lora_linears(model)
        assert [lora_grads._canonical(n) for n in names] == [lin.name for lin in linears]
        assert len(linears) == 2 * 2 * len(MODULES)  # 2 layers, A and B
        got = per_example_lora_grads(model, cache.get(encoded), encoded, 0, 0, target=target)
        loop = per_example_lora_grads_loop(model, cache.get(encoded), encoded, 0, 0, target=target)
    assert got.shape == want.shape == (7, sum(lin.numel for lin in linears))
    assert want.abs().amax(1).min() > 1e-3  # every example has a real gradient
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loop, want, rtol=1e-9, atol=1e-12)
    # the batched row does not depend on the other rows of the batch (padding masked)
    alone = [per_example_lora_grads_on(base64, adapter_all, cache, [e], target) for e in encoded]
    torch.testing.assert_close(got, torch.cat(alone), rtol=1e-9, atol=1e-12)


def per_example_lora_grads_on(base, adapter, cache, encoded, target):
    with feat.peft_adapters(base, {"x": adapter}) as model:
        return per_example_lora_grads(
            model, cache.get(encoded), encoded, cache.split, 0, target=target
        )


def test_split_model_fp32_and_prompt_target_ignores_answer(
    tiny_base: BaseModel, adapter_top: Path
) -> None:
    """LoRA on the top layer only, states cached at layer 1; fp32 batched == loop."""
    cache = StateCache(tiny_base, 1, persist=False, progress=False)
    encoded = examples(9, seed=1)
    twin = Encoded(encoded[0].ids[: encoded[0].prompt_len] + (5, 6, 7, 8), encoded[0].prompt_len)
    encoded.append(twin)  # same prompt, other answer
    states = cache.get(encoded)
    with feat.peft_adapters(tiny_base, {"x": adapter_top}) as model:
        assert all(".layers.1." in lin.name for lin in lora_linears(model))
        for target in ("prompt", "answer"):
            got = per_example_lora_grads(model, states, encoded, 1, 0, target=target)
            want = per_example_lora_grads_loop(model, states, encoded, 1, 0, target=target)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            same = torch.allclose(got[0], got[-1], rtol=1e-5, atol=1e-7)
            assert same == (target == "prompt")


def test_adapter_below_the_split_is_refused(
    tiny_base: BaseModel, adapter_all: Path, tmp_path: Path
) -> None:
    cache = StateCache(tiny_base, 1, persist=False, progress=False)
    with pytest.raises(LorafuseError, match="below the state cache's split 1"):
        gradient_features(tiny_base, adapter_all, examples(2), cache, directory=tmp_path)
    with pytest.raises(ValueError, match="target"):
        gradient_features(tiny_base, adapter_all, examples(2), cache, target="all")


def unit_rows(n: int, p: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=gen)
    x[1] = x[0] + 0.3 * x[1]  # some correlated pairs, not only near-orthogonal ones
    x[2] = -x[0] + 0.5 * x[2]
    return F.normalize(x, dim=1)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_preserves_cosines(kind: str) -> None:
    p = projection._block_rows(1024) + 3000  # two generated blocks
    x = unit_rows(24, p, seed=0)
    y = project(x, 1024, seed=0, kind=kind)
    cos, cos_proj = x @ x.T, F.normalize(y, dim=1) @ F.normalize(y, dim=1).T
    assert (cos_proj - cos).abs().max() < 0.15
    assert (y.norm(dim=1) - 1).abs().max() < 0.15
    assert cos[0, 1] > 0.9 and cos[0, 2] < -0.8  # the pairs tested include correlated ones


def test_projection_is_seeded_and_blockwise() -> None:
    x = unit_rows(5, 3 * projection._block_rows(256) + 17, seed=1)
    a = project(x, 256, seed=7)
    assert torch.equal(a, project(x, 256, seed=7))
    # rows do not interact (equal up to BLAS blocking, which depends on the row count)
    torch.testing.assert_close(a[2:4], project(x[2:4], 256, seed=7), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, project(x, 256, seed=8))
    assert not torch.allclose(a, project(x, 256, seed=7, kind="gaussian"))
    block = projection_block(7, 1, 10, 256)
    assert set(block.unique().tolist()) == {-1.0, 1.0}
    assert abs(block.mean().item()) < 0.1
    # the projection of a basis vector is a row of the matrix, scaled by 1/sqrt(dim)
    rows = projection._block_rows(256)
    e = torch.zeros(1, x.shape[1])
    e[0, rows + 4] = 1.0
    torch.testing.assert_close(project(e, 256, seed=7)[0], block[4] / 16)
    e0 = torch.zeros(1, x.shape[1])
    e0[0, 4] = 1.0  # the same row of the first block: independent entries
    assert (project(e0, 256, seed=7) - project(e, 256, seed=7)).abs().max() > 0.1
    with pytest.raises(ValueError, match="dim"):
        project(x, 8193)


def test_projecting_many_equals_projecting_each_bit_for_bit() -> None:
    p = 2 * projection._block_rows(64) + 9
    xs = [unit_rows(n, p, seed=n) for n in (3, 5, 4)]
    for x, y in zip(xs, projection.project_many(xs, 64, seed=3), strict=True):
        assert torch.equal(y, project(x, 64, seed=3))
    with pytest.raises(ValueError, match="columns"):
        projection.project_many([xs[0], xs[0][:, :-1]], 64)


def test_grouped_chunks_write_the_same_files(
    tiny_base: BaseModel, adapter_top: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = StateCache(tiny_base, 1, persist=False, progress=False)
    kwargs = dict(dim=48, chunk_size=4, batch_size=2, progress=False)  # chunks 4+4+2
    grouped = gradient_features(
        tiny_base, adapter_top, examples(10), cache, directory=tmp_path / "a", **kwargs
    )
    assert feat.chunks_per_projection(4, 10_000) > 3  # all three chunks in one group
    monkeypatch.setattr(feat, "GROUP_BYTES", 0)
    single = gradient_features(
        tiny_base, adapter_top, examples(10), cache, directory=tmp_path / "b", **kwargs
    )
    assert torch.equal(grouped, single)
    files = sorted(p.name for p in (tmp_path / "a").glob("*/chunk-*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "b").glob("*/chunk-*.safetensors"))
    assert len(files) == 3


def test_adam_normalise_divides_by_sqrt_v_plus_eps() -> None:
    g = torch.tensor([[2.0, 3.0, -1.0], [4.0, 0.0, 1.0]])
    v = torch.tensor([4.0, 9.0, 0.0])
    want = torch.tensor([[2 / 2.5, 3 / 3.5, -1 / 0.5], [4 / 2.5, 0.0, 1 / 0.5]])
    torch.testing.assert_close(adam_normalise(g, v, eps=0.5), want)


def loop_grads(base: BaseModel, adapter: Path, cache: StateCache, encoded, target="prompt"):
    with feat.peft_adapters(base, {"x": adapter}) as model:
        linears = lora_linears(model)
        grads = per_example_lora_grads_loop(
            model, cache.get(encoded), encoded, cache.split, 0, target=target
        )
        return grads, [(lin.name, tuple(lin.module.weight.shape)) for lin in linears]


def test_features_with_adam_state(tiny_base: BaseModel, adapter_top: Path, tmp_path: Path) -> None:
    cache = StateCache(tiny_base, 1, persist=False, progress=False)
    encoded = examples(6)
    grads, shapes = loop_grads(tiny_base, adapter_top, cache, encoded)
    gen = torch.Generator().manual_seed(5)
    # exp_avg_sq keyed as in a live PeftModel (with the adapter name), one as optimizer state
    state = {
        name.replace(".weight", ".default.weight"): torch.rand(shape, generator=gen) * 1e-2
        for name, shape in shapes
    }
    first = next(iter(state))
    state[first] = {"exp_avg_sq": state[first], "exp_avg": torch.zeros(1)}
    v = torch.cat(
        [(s["exp_avg_sq"] if isinstance(s, dict) else s).reshape(-1) for s in state.values()]
    )
    kwargs = dict(dim=64, seed=3, directory=tmp_path, progress=False, eps=1e-3)
    got = gradient_features(tiny_base, adapter_top, encoded, cache, adam_state=state, **kwargs)
    want = F.normalize(project(grads / (v.sqrt() + 1e-3), 64, seed=3), dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(6))
    plain = F.normalize(project(grads, 64, seed=3), dim=1)
    assert (got - plain).abs().max() > 0.05  # the normalisation changes the features

    del state[first]
    with pytest.raises(LorafuseError, match="no exp_avg_sq"):
        gradient_features(tiny_base, adapter_top, encoded, cache, adam_state=state, **kwargs)


def test_estimated_second_moment_and_unit_features(
    tiny_base: BaseModel, adapter_top: Path, tmp_path: Path
) -> None:
    cache = StateCache(tiny_base, 1, persist=False, progress=False)
    encoded = examples(7)
    grads, shapes = loop_grads(tiny_base, adapter_top, cache, encoded, target="answer")
    v = estimate_second_moment(
        tiny_base, adapter_top, encoded, cache, target="answer", directory=tmp_path, progress=False
    )
    assert [(k, tuple(t.shape)) for k, t in v.items()] == shapes
    flat = torch.cat([t.reshape(-1) for t in v.values()])
    torch.testing.assert_close(flat, grads.square().mean(0), rtol=1e-4, atol=1e-10)

    kwargs = dict(dim=32, target="answer", directory=tmp_path, progress=False, batch_size=3)
    got = gradient_features(tiny_base, adapter_top, encoded, cache, **kwargs)
    want = F.normalize(project(adam_normalise(grads, flat), 32), dim=1)
    assert got.shape == (7, 32)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the estimate passed back explicitly gives the same features (for unlabeled prompts)
    again = gradient_features(tiny_base, adapter_top, encoded, cache, adam_state=v, **kwargs)
    torch.testing.assert_close(again, got)


def test_interrupted_run_resumes_without_recomputing(
    tiny_base: BaseModel, adapter_top: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = StateCache(tiny_base, 1, persist=False, progress=False)
    encoded = examples(10)
    kwargs = dict(dim=48, chunk_size=4, batch_size=2, progress=False)  # chunks 4+4+2
    straight = gradient_features(
        tiny_base, adapter_top, encoded, cache, directory=tmp_path / "a", **kwargs
    )

    real = feat.per_example_lora_grads
    calls: list[int] = []

    def counting(*args, **kw):
        calls.append(len(args[2]))
        if crash_at is not None and len(calls) == crash_at:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(feat, "per_example_lora_grads", counting)
    monkeypatch.setattr(feat, "GROUP_BYTES", 0)  # one chunk per projection pass
    crash_at = 5 + 3  # 5 batches estimating v, 2 for chunk 0, crash in chunk 1
    with pytest.raises(KeyboardInterrupt):
        gradient_features(
            tiny_base, adapter_top, encoded, cache, directory=tmp_path / "b", **kwargs
        )
    written = sorted((tmp_path / "b").glob("*/chunk-*.safetensors"))
    assert [f.name for f in written] == ["chunk-00000-4.safetensors"]
    mtime = written[0].stat().st_mtime_ns

    calls.clear()
    crash_at = None
    resumed = gradient_features(
        tiny_base, adapter_top, encoded, cache, directory=tmp_path / "b", **kwargs
    )
    assert sorted(calls) == [2, 2, 2]  # chunks 1 and 2 only; v and chunk 0 read from disk
    assert written[0].stat().st_mtime_ns == mtime
    torch.testing.assert_close(resumed, straight, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.norm(dim=1), torch.ones(10))

    calls.clear()
    cached = gradient_features(
        tiny_base, adapter_top, encoded, cache, directory=tmp_path / "b", **kwargs
    )
    assert calls == [] and torch.equal(cached, resumed)
    # other settings are another run, not a stale hit
    other = gradient_features(
        tiny_base, adapter_top, encoded, cache, directory=tmp_path / "b", seed=1, **kwargs
    )
    assert calls and not torch.allclose(other, resumed)
