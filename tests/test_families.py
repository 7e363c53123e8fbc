"""Base models of other families: exact through lorafuse, or refused in one line.

Each tiny random model (built from its transformers config class, no downloads) is
checked at load; a PEFT adapter (``init_lora_weights=False``) on its top layers is then
scored through lorafuse's harness, and the logits and losses are compared with the
model's own forward, example by example, without padding.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model

from lorafuse.core.encode import Encoded, collate
from lorafuse.core.forward import final_hidden, lower_states, run_layers, target_logits
from lorafuse.core.probe import FULL, SPLIT, check_forward, plan_of
from lorafuse.core.states import StateCache, pad_states
from lorafuse.errors import LorafuseError
from lorafuse.eval.harness import model_log_probs, score_examples
from lorafuse.models import BaseModel

VOCAB = 128
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
ATTN = ["q_proj", "v_proj", "up_proj"]
# family: (config class, model class, config, LoRA targets, layer list name, path)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", SMALL, ATTN, "layers", SPLIT),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        {**SMALL, "sliding_window": 4},
        ATTN,
        "layers",
        SPLIT,
    ),
    "qwen2": (  # biases on q/k/v; layer 0 full attention, layers 1-2 sliding
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {**SMALL, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
        ATTN,
        "layers",
        SPLIT,
    ),
    "gemma2": (  # alternating sliding/full layers, attention and final logit softcapping
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**SMALL, "head_dim": 8, "sliding_window": 4, "final_logit_softcapping": 2.0},
        ATTN,
        "layers",
        SPLIT,
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {**SMALL, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1},
        ["qkv_proj", "gate_up_proj"],
        "layers",
        SPLIT,
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {k: v for k, v in SMALL.items() if k != "num_key_value_heads"},
        ["query_key_value", "dense_h_to_4h"],
        "layers",
        SPLIT,
    ),
    "gpt2": (  # learned absolute position embeddings, Conv1D projections
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=1,
        ),
        ["c_attn"],
        "h",
        SPLIT,
    ),
    "granite": (  # Llama names, but logits divided by logits_scaling: the split misses it
        "GraniteConfig",
        "GraniteForCausalLM",
        {**SMALL, "logits_scaling": 4.0},
        ATTN,
        "layers",
        FULL,
    ),
    "opt": (  # layers under model.decoder, learned positions with an offset
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        ["q_proj", "v_proj", "fc1"],
        "layers",
        FULL,
    ),
    "gemma3": (  # one rotary embedding per layer type: the split forward cannot call it
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**SMALL, "head_dim": 8, "sliding_window": 4, "final_logit_softcapping": 2.0},
        ATTN,
        "layers",
        FULL,
    ),
}
# lengths 6-16: the longer rows exceed the sliding windows of 4
EXAMPLES = [
    Encoded(
        tuple(torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()), p
    )
    for n, p in ((9, 5), (16, 7), (6, 4), (13, 12))
]


def build(family: str) -> torch.nn.Module:
    config_cls, model_cls, config, *_ = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
    return model.to(torch.float32).eval().requires_grad_(False)


def base_of(model: torch.nn.Module, name: str) -> BaseModel:
    return BaseModel(model=model, tokenizer=SimpleNamespace(pad_token_id=0), name=name)


def with_lora(model: torch.nn.Module, family: str) -> torch.nn.Module:
    """A seeded random (non-zero) PEFT LoRA on layers 1-2 of a family's tiny model."""
    *_, targets, layer_list, _ = FAMILIES[family]
    torch.manual_seed(1)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        layers_to_transform=[1, 2],
        layers_pattern=layer_list,
        init_lora_weights=False,
        fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D stores weights transposed
    )
    return get_peft_model(model, lora)


def own_target_logits(model: torch.nn.Module, encoded: list[Encoded]) -> list[torch.Tensor]:
    """The model's own logits at each example's target-predicting positions, one row alone."""
    out = []
    with torch.no_grad():
        for e in encoded:
            logits = model(input_ids=torch.tensor([e.ids])).logits[0]
            out.append(logits[e.prompt_len - 1 : len(e.ids) - 1])
    return out


def own_losses(logits: list[torch.Tensor], encoded: list[Encoded]) -> torch.Tensor:
    return torch.stack(
        [
            F.cross_entropy(z, torch.tensor(e.ids[e.prompt_len :]), reduction="mean")
            for z, e in zip(logits, encoded, strict=True)
        ]
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_through_the_harness_equals_its_own_forward(
    family: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path))
    path = FAMILIES[family][-1]
    model = build(family)
    base = base_of(model, family)
    cache = StateCache(base, 1, progress=False)  # checked here, at load
    assert cache.forward.path == path, cache.forward
    assert (cache.directory is None) == (path == FULL)  # input embeddings are not cached
    peft_model = with_lora(model, family).eval()

    states = cache.get(EXAMPLES)
    batch = collate(EXAMPLES, 0)
    with torch.no_grad():
        got = target_logits(peft_model, pad_states(states), batch, 1)
    want = own_target_logits(peft_model, EXAMPLES)
    torch.testing.assert_close(got, torch.cat(want), atol=1e-4, rtol=1e-4)
    with peft_model.disable_adapter():  # the adapter matters: it moves the logits
        plain = torch.cat(own_target_logits(peft_model, EXAMPLES))
    assert (plain - torch.cat(want)).abs().max() > 1e-2

    scores = score_examples(model_log_probs(peft_model, 1), EXAMPLES, cache)
    torch.testing.assert_close(
        torch.from_numpy(scores.loss).float(), own_losses(want, EXAMPLES), atol=1e-5, rtol=1e-5
    )


def test_split_forward_covers_sliding_windows_and_softcapping() -> None:
    """Without a layer's sliding window or the softcap, the probe sees the difference."""
    import lorafuse.core.decoder as dec

    for family in ("mistral", "qwen2", "gemma2", "gpt2"):
        model = build(family)
        assert check_forward(model).path == SPLIT
        parts = dec.decoder_parts(model)
        parts.softcap = parts.positions = None  # as the Llama-only split forward was
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dec, "decoder_parts", lambda m, p=parts: p)
            mp.setattr(dec, "layer_type", lambda config, i: "full_attention")
            plan = check_forward(model)
        assert plan.path == FULL and "differs" in plan.reason, (family, plan)


def test_full_path_keeps_per_layer_access_closed() -> None:
    model = build("granite")
    ids = torch.tensor([EXAMPLES[0].ids])
    states = lower_states(model, ids, 2)
    torch.testing.assert_close(states, model.get_input_embeddings()(ids))  # split ignored
    with pytest.raises(LorafuseError, match="own full forward"):
        run_layers(model, states, 1)
    with torch.no_grad():
        normed = final_hidden(model, states, 1)
    assert normed.shape == (1, len(EXAMPLES[0].ids), 32)


def test_final_hidden_is_the_decoder_stacks_own() -> None:
    model = build("gemma2")
    ids = torch.tensor([EXAMPLES[1].ids])
    with torch.no_grad():
        got = final_hidden(model, lower_states(model, ids, 2), 2)
        want = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unchecked_sliding_window_is_refused_beyond_its_length() -> None:
    """A window longer than every probe row is only trusted within it."""
    config_cls, model_cls, config, *_ = FAMILIES["mistral"]
    config = {**config, "sliding_window": 80, "max_position_embeddings": 128}
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()
    assert plan_of(model).max_len == 80
    lower_states(model, torch.ones(1, 80, dtype=torch.long), 1)
    with pytest.raises(LorafuseError, match="longer than the sliding window"):
        lower_states(model, torch.ones(1, 81, dtype=torch.long), 1)


class Opaque(transformers.LlamaForCausalLM):
    """Llama's names, another forward (logits halved), and no ``inputs_embeds``."""

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is not None:
            raise ValueError("this model takes token ids only")
        out = super().forward(input_ids=input_ids, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_model_no_path_reproduces_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lorafuse.eval.run as run_mod
    from lorafuse.cli import main

    torch.manual_seed(0)
    model = Opaque(transformers.LlamaConfig(**SMALL)).eval().requires_grad_(False)
    folder = tmp_path / "opaque-model"
    model.name_or_path = str(folder)
    with pytest.raises(LorafuseError) as err:
        check_forward(model)
    assert str(err.value).startswith(f"{folder}: cannot run this model exactly")
    assert "\n" not in str(err.value)

    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"task": "t", "prompt": "p", "answer": "a", "split": "test"}\n')
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(run_mod, "load_base_model", lambda *a, **k: base_of(model, "opaque"))
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["lorafuse", "eval", "--tasks", str(tasks), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    stderr = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1 and str(folder) in stderr, stderr


@pytest.mark.parametrize("target", ["prompt", "answer"])
def test_gradient_features_follow_the_softcap(target: str) -> None:
    """ELREA's one-backward gradients equal autograd through the softcapped logits."""
    from lorafuse.elrea import per_example_lora_grads, per_example_lora_grads_loop

    model = build("gemma2")
    cache = StateCache(base_of(model, "gemma2"), 1, persist=False, progress=False)
    torch.manual_seed(2)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=ATTN, layers_to_transform=[1, 2], init_lora_weights=False
    )
    peft_model = get_peft_model(model, lora).eval()
    states = cache.get(EXAMPLES)
    fast = per_example_lora_grads(peft_model, states, EXAMPLES, 1, 0, target=target)
    slow = per_example_lora_grads_loop(peft_model, states, EXAMPLES, 1, 0, target=target)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)


def test_fusion_on_the_full_path_equals_peft(tmp_path: Path) -> None:
    """A probability ensemble and a layer router on a model that runs its own forward."""
    from lorafuse.core.mixture import BatchMixer, ConstantMixer
    from lorafuse.fusion.base import Ensemble, Fusion, installed
    from lorafuse.fusion.routers import LayerRouter
    from lorafuse.library import LoraAdapter

    model = build("granite")
    experts = []
    for k in range(2):
        torch.manual_seed(20 + k)
        lora = LoraConfig(r=2 + k, lora_alpha=4, target_modules=ATTN, init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        peft_model.save_pretrained(tmp_path / f"e{k}")
        peft_model.unload()
        experts.append(LoraAdapter.open(tmp_path / f"e{k}"))
    model.requires_grad_(False)
    batch = collate(EXAMPLES, 0)
    states = lower_states(model, batch.input_ids, 0)
    assert plan_of(model).path == FULL

    def own_log_probs(adapter: LoraAdapter) -> torch.Tensor:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(adapter.path))
        try:
            return F.log_softmax(torch.cat(own_target_logits(peft_model, EXAMPLES)), -1)
        finally:
            peft_model.unload()

    each = torch.stack([own_log_probs(e) for e in experts])
    w = torch.tensor([0.3, 0.7])
    fusion = Fusion("e", "ensembling", experts, BatchMixer(), ensemble=Ensemble(w, "prob"))
    with installed(model, fusion, 0) as log_probs, torch.no_grad():
        got = log_probs(states, batch)
    want = torch.log(torch.einsum("k,knv->nv", w, each.exp()))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    router = LayerRouter([0, 1, 2], 32, 2)  # zero-initialised: the uniform merge
    routed = Fusion("r", "routing", experts, router, hooks=router.hooked)
    uniform = Fusion("u", "merging", experts, ConstantMixer(torch.ones(2) / 2))
    with installed(model, routed, 0) as log_probs, torch.no_grad():
        got = log_probs(states, batch)
    with installed(model, uniform, 0) as log_probs, torch.no_grad():
        want = log_probs(states, batch)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    plain = F.log_softmax(torch.cat(own_target_logits(model, EXAMPLES)), -1)
    assert (got - plain).abs().max() > 1e-2  # the routed experts did run


def test_adapted_layers_are_found_in_every_family_naming() -> None:
    """The split is chosen below the lowest adapted layer, so GPT-2's ``h.N`` must count."""
    from lorafuse.core.mixture import layer_index

    assert layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("gpt_neox.layers.2.attention.query_key_value") == 2
    assert layer_index("model.decoder.layers.1.fc1") == 1
    assert layer_index("lm_head") == -1


def test_check_runs_in_eval_mode_and_restores_training() -> None:
    model = build("gpt2")  # dropout 0.1 everywhere
    model.train()
    assert check_forward(model).path == SPLIT
    assert model.training


class CharTokenizer:
    """Enough of a tokenizer for ``encode_examples``: one id per character, no template."""

    pad_token_id, eos_token_id, unk_token_id, chat_template = 0, 1, 2, None

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.unk_token_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[3 + ord(c) % (VOCAB - 3) for c in text])


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_results_record_the_forward_path(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import lorafuse.eval.run as run_mod

    tasks = tmp_path / "t.jsonl"
    rows = [{"task": "t", "prompt": f"q{i}", "answer": "ab", "split": "test"} for i in range(3)]
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = build(family)
    base = BaseModel(model=model, tokenizer=CharTokenizer(), name=family)
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(run_mod, "load_base_model", lambda *a, **k: base)
    results = run_mod.evaluate_command(
        base_model=family,
        adapter=None,
        library=None,
        tasks=str(tasks),
        split="test",
        seed=0,
        out=tmp_path / "r.json",
    )
    forward = results["config"]["forward"]
    if family == "gemma2":
        assert forward == "split"
    else:
        assert forward.startswith("full (split forward differs"), forward
    tok = CharTokenizer()
    encoded = []
    for r in rows:
        prompt = tok(f"{r['prompt']}\n").input_ids
        encoded.append(Encoded(tuple(prompt + tok(r["answer"]).input_ids + [1]), len(prompt)))
    want = own_losses(own_target_logits(model, encoded), encoded).mean()
    assert results["methods"]["base"]["mean_loss"] == pytest.approx(float(want), abs=1e-5)
