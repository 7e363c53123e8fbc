"""Fusion methods on the mixture core: ensembles, Arrow, layer routers, Twin-Merging, HC,
and routing inside ``generate``, checked against PEFT and dense math on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

from lorafuse.core.encode import Encoded, collate
from lorafuse.core.forward import lower_states, run_layers, target_logits
from lorafuse.core.mixture import BatchMixer, ConstantMixer, FactorSet, mixture_of_loras
from lorafuse.core.sparse import dense_weights
from lorafuse.fusion.base import Ensemble, Fusion, installed, prompt_mean
from lorafuse.fusion.ensemble import fit_mixture_weights, score_ensembles, target_log_probs
from lorafuse.fusion.hc import cluster_experts, delta_cosines, factor_inner
from lorafuse.fusion.routers import ArrowRouter, LayerRouter, arrow_prototypes, top_k_softmax
from lorafuse.fusion.twin import twin_sources

SEQS = [(3, 17, 9, 88, 41, 5), (7, 7, 2, 99, 31, 11), (1, 2, 3, 4, 5, 6)]
PROMPT_LEN = 3


def batch_and_states(model):
    encoded = [Encoded(s, PROMPT_LEN) for s in SEQS]
    batch = collate(encoded, pad_id=0)
    with torch.no_grad():
        states = lower_states(model, batch.input_ids, 0)
    return batch, states


def peft_log_probs(model, adapter, batch, states) -> torch.Tensor:
    peft_model = PeftModel.from_pretrained(model, str(adapter.path))
    try:
        with torch.no_grad():
            return F.log_softmax(target_logits(peft_model, states, batch, 0), -1)
    finally:
        peft_model.unload()


def run(model, fusion, batch, states) -> torch.Tensor:
    with installed(model, fusion, 0) as log_probs, torch.no_grad():
        return log_probs(states, batch)


def ensemble_fusion(experts, weights, mode) -> Fusion:
    return Fusion("e", "ensembling", experts, BatchMixer(), ensemble=Ensemble(weights, mode))


def test_ensemble_of_probabilities_and_of_logits(tiny_llama, tiny_experts) -> None:
    batch, states = batch_and_states(tiny_llama)
    each = torch.stack([peft_log_probs(tiny_llama, e, batch, states) for e in tiny_experts])
    w = torch.tensor([0.2, 0.5, 0.3])
    got = run(tiny_llama, ensemble_fusion(tiny_experts, w, "prob"), batch, states)
    want = torch.log(torch.einsum("k,knv->nv", w, each.exp()))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # logits differ from log-probs by a per-row constant, which the softmax removes
    got = run(tiny_llama, ensemble_fusion(tiny_experts, w, "logit"), batch, states)
    want = F.log_softmax(torch.einsum("k,knv->nv", w, each), -1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    got = run(tiny_llama, ensemble_fusion(tiny_experts, one_hot, "prob"), batch, states)
    torch.testing.assert_close(got, each[1], atol=1e-5, rtol=0)


def test_arrow_prototype_is_top_right_singular_vector(tiny_llama, tiny_experts) -> None:
    mixer = ConstantMixer(torch.ones(3))
    with mixture_of_loras(tiny_llama, tiny_experts, mixer) as layers:
        for name, module in layers.items():
            protos = arrow_prototypes(module)
            for k, expert in enumerate(tiny_experts):
                _, _, vh = torch.linalg.svd(expert.delta(name).double())
                cos = F.cosine_similarity(protos[k].double(), vh[0], dim=0)
                assert abs(cos.item()) == pytest.approx(1.0, abs=1e-5)


def test_arrow_routes_each_token_to_the_best_aligned_experts(tiny_llama, tiny_experts) -> None:
    router = ArrowRouter(top_k=1, temperature=1.0)
    with mixture_of_loras(tiny_llama, tiny_experts, router) as layers:
        module = next(iter(layers.values()))
        x = torch.randn(2, 5, module.A.shape[-1])
        w = dense_weights(router.weights(module, x))  # a TopK: top-1 of 3
        protos = arrow_prototypes(module)
    assert w.shape == (2, 5, 3)
    best = (x @ protos.T).abs().argmax(-1)
    torch.testing.assert_close(w, F.one_hot(best, 3).float())


def test_top_k_softmax() -> None:
    w = top_k_softmax(torch.tensor([[1.0, 3.0, 2.0, -1.0]]), 2, 1.0)
    e = torch.tensor([3.0, 2.0]).exp()
    torch.testing.assert_close(w, torch.tensor([[0.0, e[0] / e.sum(), e[1] / e.sum(), 0.0]]))


def test_zero_initialised_layer_router_is_the_uniform_merge(tiny_llama, tiny_experts) -> None:
    batch, states = batch_and_states(tiny_llama)
    router = LayerRouter([0, 1], tiny_llama.config.hidden_size, 3)
    routed = run(
        tiny_llama, Fusion("r", "routing", tiny_experts, router, hooks=router.hooked), batch, states
    )
    uniform = run(
        tiny_llama,
        Fusion("u", "merging", tiny_experts, ConstantMixer(torch.ones(3) / 3)),
        batch,
        states,
    )
    torch.testing.assert_close(routed, uniform, atol=1e-6, rtol=0)
    assert router.current == {}  # hooks removed, nothing left behind


def test_twin_shared_plus_exclusive_is_each_expert(tiny_experts) -> None:
    sources = twin_sources(
        tiny_experts, shared_method="task_arithmetic", shared_params={"scale": 0.3}, rank=64
    )
    shared, exclusive = sources[0], sources[1:]
    for module in tiny_experts[0].module_names:
        torch.testing.assert_close(
            shared.factors(module).delta(),
            0.3 * sum(e.delta(module) for e in tiny_experts),
            atol=1e-5,
            rtol=0,
        )
        for e, x in zip(tiny_experts, exclusive, strict=True):
            got = shared.factors(module).delta() + x.factors(module).delta()
            torch.testing.assert_close(got, e.delta(module), atol=1e-5, rtol=0)


def test_twin_low_rank_exclusive_is_the_best_approximation(tiny_experts) -> None:
    sources = twin_sources(tiny_experts, rank=2)
    module = tiny_experts[0].module_names[0]
    diff = tiny_experts[1].delta(module) - sources[0].factors(module).delta()
    s = torch.linalg.svdvals(diff.double())
    err = torch.linalg.norm(diff.double() - sources[2].factors(module).delta().double())
    assert sources[2].factors(module).rank == 2
    assert err.item() == pytest.approx(s[2:].pow(2).sum().sqrt().item(), rel=1e-4)


def test_factor_inner_product_and_clusters(tiny_experts) -> None:
    module = tiny_experts[0].module_names[0]
    a, b = tiny_experts[0].factors(module), tiny_experts[2].factors(module)
    dense = (a.delta().double() * b.delta().double()).sum().item()
    assert factor_inner(a, b) == pytest.approx(dense, rel=1e-6)
    twin_of_0 = FactorSet(
        "copy", {m: tiny_experts[0].factors(m) for m in tiny_experts[0].module_names}
    )
    experts = [tiny_experts[0], tiny_experts[1], twin_of_0]
    cos = delta_cosines(experts)
    assert cos[0, 2] == pytest.approx(1.0) and abs(cos[0, 1]) < 0.5
    assert sorted(map(sorted, cluster_experts(experts, 2))) == [[0, 2], [1]]


def test_prompt_mean_ignores_answer_and_padding() -> None:
    encoded = [Encoded((1, 2, 3, 4), 2), Encoded((5, 6, 7), 1)]
    batch = collate(encoded, 0)
    hidden = torch.arange(2 * 4, dtype=torch.float).view(2, 4, 1)
    torch.testing.assert_close(prompt_mean(hidden, batch), torch.tensor([[0.5], [4.0]]))


def test_per_item_weights_hold_for_every_generated_token(tiny_llama, tiny_experts) -> None:
    """Weights set once from the prompt are reused for each new token in ``generate``."""
    prompts = torch.tensor([[3, 17, 9, 88], [7, 7, 2, 99]])
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.1, 0.3, 0.6]])
    mixer = BatchMixer()
    mixer.current = weights
    with mixture_of_loras(tiny_llama, tiny_experts, mixer), torch.no_grad():
        together = tiny_llama.generate(prompts, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for i in range(2):
        with mixture_of_loras(tiny_llama, tiny_experts, ConstantMixer(weights[i])), torch.no_grad():
            alone = tiny_llama.generate(
                prompts[i : i + 1], max_new_tokens=4, do_sample=False, pad_token_id=0
            )
        n = alone.shape[1]  # an item that ended early is padded in the batch
        assert torch.equal(together[i, :n], alone[0])
        assert (together[i, n:] == 0).all()


def test_twin_model_routed_one_hot_is_that_expert(tiny_llama, tiny_experts) -> None:
    """Shared delta folded into the weights + one exclusive delta (full rank) == the expert."""
    batch, states = batch_and_states(tiny_llama)
    shared, *exclusive = twin_sources(tiny_experts, shared_params={"scale": 0.5}, rank=64)
    mixer = BatchMixer()
    mixer.current = torch.tensor([0.0, 0.0, 1.0])
    fusion = Fusion("t", "routing", exclusive, mixer, shared=shared)
    got = run(tiny_llama, fusion, batch, states)
    want = peft_log_probs(tiny_llama, tiny_experts[2], batch, states)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the weights were restored: the plain model is unchanged
    with torch.no_grad():
        plain = F.log_softmax(target_logits(tiny_llama, states, batch, 0), -1)
    assert (plain - want).abs().max() > 1e-4
    mixer.current = torch.zeros(3)
    only_shared = run(tiny_llama, fusion, batch, states)
    as_source = Fusion("s", "merging", [shared], ConstantMixer(torch.ones(1)))
    torch.testing.assert_close(
        only_shared, run(tiny_llama, as_source, batch, states), atol=1e-5, rtol=0
    )


def test_fit_mixture_weights_known_answer() -> None:
    """Expert 0 explains examples 0-2, expert 1 example 3: the NLL-optimal mixture is
    (3/4, 1/4) when each expert gives its examples probability ~1 and the others ~0."""
    rows = torch.tensor([0, 0, 1, 2, 3, 3])
    good, bad = 0.0, -30.0
    lp = torch.tensor([[good, bad]] * 4 + [[bad, good]] * 2)
    w = fit_mixture_weights(lp, rows, steps=2000, lr=0.05)
    torch.testing.assert_close(w, torch.tensor([0.75, 0.25]), atol=1e-3, rtol=0)


def test_one_pass_ensembles_equal_separate_fusions(tiny_base, tiny_experts) -> None:
    from lorafuse.core.states import StateCache
    from lorafuse.fusion.base import evaluate

    encoded = [Encoded(s, PROMPT_LEN) for s in SEQS]
    cache = StateCache(tiny_base, 0, persist=False, progress=False)
    variants = {
        "prob": (torch.tensor([0.2, 0.5, 0.3]), "prob"),
        "logit": (torch.ones(3) / 3, "logit"),
    }
    together = score_ensembles(tiny_base.model, tiny_experts, encoded, cache, variants)
    for name, (w, mode) in variants.items():
        alone = evaluate(tiny_base.model, ensemble_fusion(tiny_experts, w, mode), encoded, cache)
        np.testing.assert_allclose(together[name].loss, alone.loss, atol=1e-5)
        assert (together[name].correct == alone.correct).all()
    lp, rows = target_log_probs(tiny_base.model, tiny_experts, encoded, cache)
    batch, states = batch_and_states(tiny_base.model)
    want = peft_log_probs(tiny_base.model, tiny_experts[1], batch, states)
    torch.testing.assert_close(lp[:, 1], want.gather(1, batch.targets[:, None]).squeeze(1))
    assert rows.tolist() == batch.rows.tolist()


def test_method_names_and_parameters_are_checked() -> None:
    from lorafuse.errors import LorafuseError
    from lorafuse.fusion.methods import FUSION_METHODS
    from lorafuse.fusion.run import parse_params
    from lorafuse.methods import build_fusion

    assert parse_params(["top_k=3", "mode=logit", "learn=true", "scale=0.5"]) == {
        "top_k": 3,
        "mode": "logit",
        "learn": True,
        "scale": 0.5,
    }
    with pytest.raises(LorafuseError, match="KEY=VALUE"):
        parse_params(["top_k"])
    with pytest.raises(LorafuseError, match="unknown fusion method 'nope'"):
        build_fusion(None, "nope")  # type: ignore[arg-type]
    with pytest.raises(LorafuseError, match="arrow: unknown parameter.*topk"):
        build_fusion(None, "arrow", topk=2)  # type: ignore[arg-type]
    assert {f.family for f in FUSION_METHODS.values()} == {"merging", "ensembling", "routing"}


def test_per_example_ensemble_weights_equal_each_example_alone(tiny_llama, tiny_experts) -> None:
    """ELREA-style weights per example (not summing to 1), logits combined."""
    batch, states = batch_and_states(tiny_llama)
    w = torch.tensor([[0.7, 0.2, 0.4], [0.0, 1.0, 0.0], [0.3, 0.3, 0.3]])
    got = run(tiny_llama, ensemble_fusion(tiny_experts, w, "logit"), batch, states)
    for i in range(len(SEQS)):
        alone = run(tiny_llama, ensemble_fusion(tiny_experts, w[i], "logit"), batch, states)
        rows = batch.rows == i
        torch.testing.assert_close(got[rows], alone[rows], atol=1e-5, rtol=0)


def test_per_example_layer_router_uses_the_prompt_mean(tiny_llama, tiny_experts) -> None:
    batch, states = batch_and_states(tiny_llama)
    router = LayerRouter([0, 1], tiny_llama.config.hidden_size, 3)
    torch.manual_seed(3)
    for p in router.parameters():
        torch.nn.init.normal_(p, std=0.5)
    fusion = Fusion("r", "routing", tiny_experts, router, route=router.route, hooks=router.hooked)
    seen = {}
    with installed(tiny_llama, fusion, 0) as log_probs, torch.no_grad():
        hook = tiny_llama.model.layers[1].register_forward_pre_hook(
            lambda m, args, kwargs: seen.update(h=args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        log_probs(states, batch)
        hook.remove()
        w = router.current[1]
        logits = router.proj["1"](F.layer_norm(seen["h"], seen["h"].shape[-1:]))
        logits = logits[:, :PROMPT_LEN].mean(1)
    assert w.shape == (3, 3)  # one weight vector per example
    torch.testing.assert_close(w, F.softmax(logits, -1), atol=1e-6, rtol=0)


def test_distilled_student_moves_towards_the_ensemble(tiny_base, tiny_experts, tmp_path) -> None:
    from lorafuse.core.states import StateCache
    from lorafuse.fusion.distill import distill, distillation_loss, teacher_topk
    from lorafuse.library import LoraAdapter
    from lorafuse.training.config import TrainConfig

    gen = torch.Generator().manual_seed(0)
    encoded = [
        Encoded(tuple(torch.randint(1, 128, (8,), generator=gen).tolist()), 5) for _ in range(16)
    ]
    cache = StateCache(tiny_base, 0, persist=False, progress=False)
    w = torch.tensor([0.6, 0.3, 0.1])
    teacher = teacher_topk(tiny_base.model, tiny_experts, encoded, cache, w, topk=128)
    loss = distillation_loss(teacher, 0, 0)
    states = cache.get(encoded)
    with torch.no_grad():
        before = loss(tiny_base.model, states, encoded, list(range(16))).item()
    config = TrainConfig(
        steps=30,
        batch_size=8,
        lr=0.05,
        warmup=0,
        rank=4,
        alpha=8,
        top_layers=2,
        target_modules=["q_proj", "v_proj", "up_proj"],
        checkpoint_every=100,
    )
    result = distill(
        tiny_base,
        tiny_experts,
        encoded,
        cache,
        tmp_path / "student",
        config,
        weights=w,
        topk=128,
        progress=False,
    )
    student = Fusion("s", "merging", [LoraAdapter.open(result.path)], ConstantMixer(torch.ones(1)))
    with installed(tiny_base.model, student, 0), torch.no_grad():
        after = loss(tiny_base.model, states, encoded, list(range(16))).item()
    # the full-vocabulary teacher (topk = vocab): cross-entropy = KL + teacher entropy,
    # so the gap to the entropy is the KL; distillation must close much of it
    entropy = torch.cat([-(v.exp() * v).sum(-1) for v, _ in teacher]).mean().item()
    assert after - entropy < 0.5 * (before - entropy)


def test_twin_router_features_come_from_the_shared_model_alone(tiny_llama, tiny_experts) -> None:
    """The router reads the shared model (W + shared delta), with no exclusive delta."""
    from lorafuse.fusion.base import prompt_mean
    from lorafuse.fusion.twin import shared_features

    batch, states = batch_and_states(tiny_llama)
    shared, *exclusive = twin_sources(tiny_experts, rank=64)
    mixer = BatchMixer()
    with mixture_of_loras(tiny_llama, exclusive, mixer, shared), torch.no_grad():
        got = shared_features(tiny_llama, mixer, len(exclusive), states, batch, 0)
    with mixture_of_loras(tiny_llama, [shared], ConstantMixer(torch.ones(1))), torch.no_grad():
        hidden = tiny_llama.model.norm(run_layers(tiny_llama, states, 0))
    torch.testing.assert_close(got, prompt_mean(hidden, batch), atol=1e-5, rtol=0)
