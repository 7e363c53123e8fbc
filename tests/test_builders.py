"""Fusion builders by name on a tiny workspace, each against an independent reference: Twin's
router learns a separable task (and its group-wise variant routes like it), ``hc_arrow``
against hand-made clusters and merges (untrained: Arrow over the clusters; trained: lower
loss on its training data than Arrow's start), ``learned_router`` beats its starting point,
Arrow with top_k > 1 against a hand computation on dense deltas."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_workspace import NAMES, TASKS, tiny_workspace

from lorafuse.core.encode import collate
from lorafuse.core.forward import target_logits
from lorafuse.core.mixture import ConstantMixer
from lorafuse.core.states import pad_states
from lorafuse.eval.harness import length_batches, model_log_probs, score_examples
from lorafuse.fusion.base import Fusion, evaluate, installed
from lorafuse.fusion.routers import ArrowRouter
from lorafuse.fusion.twin import train_router
from lorafuse.methods import build_fusion

FIRST_CHAR_TASK = {3 + ord("+") % 120: "add", 3 + ord("<") % 120: "rev", 3 + ord("^") % 120: "up"}


@pytest.fixture
def ws(tiny_base, tiny_experts, tmp_path):
    return tiny_workspace(tiny_base, tiny_experts, tmp_path)


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 16 dimensions, far apart relative to their spread."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 16, generator=torch.Generator().manual_seed(99)) * 4
    labels = torch.arange(3).repeat(n)
    return centres[labels] + torch.randn(len(labels), 16, generator=gen), labels


def test_twin_router_learns_a_separable_task() -> None:
    x, y = blobs(20, seed=0)
    router = train_router(x, y, 3, epochs=100, seed=0)
    test_x, test_y = blobs(50, seed=1)  # unseen points of the same blobs
    with torch.no_grad():
        assert (router(test_x).argmax(-1) == test_y).float().mean() == 1.0
        untrained = train_router(x, y, 3, epochs=0, seed=0)
        assert (untrained(test_x).argmax(-1) == test_y).float().mean() < 0.7


def routed_weights(ws, fusion) -> list[tuple[str, np.ndarray]]:
    """(task of the prompt, routing weights) of every test item, as the builder routes them."""
    seen = []
    route = fusion.route

    def spy(model, states, batch) -> None:
        route(model, states, batch)
        for i in range(len(batch.lengths)):
            task = FIRST_CHAR_TASK[int(batch.input_ids[i, 0])]
            seen.append((task, fusion.mixer.current[i].cpu().numpy().copy()))

    fusion.route = spy
    evaluate(ws.base.model, fusion, ws.encoded("test"), ws.cache)
    return seen


@pytest.mark.parametrize("name", ["twin", "twin_group"])
def test_twin_routes_unseen_prompts_to_their_task_expert(ws, name: str) -> None:
    params = {"groups": len(TASKS)} if name == "twin_group" else {}
    fusion = build_fusion(ws, name, epochs=100, **params)
    assert fusion.info["router_val_accuracy"] == 1.0
    seen = routed_weights(ws, fusion)
    assert len(seen) == len(ws.encoded("test"))
    for task, w in seen:
        assert w.argmax() == TASKS.index(task), (task, w)
        assert w.sum() == pytest.approx(1.0, abs=1e-5)
    if name == "twin_group":  # one merge per group (one per task here) of each served batch
        batches = len(length_batches(ws.encoded("test"), 4096))
        assert batches <= fusion.info["merges"] <= len(TASKS) * batches


def merged_copy(model, experts, weights):
    """The base model with ``sum_k w_k delta_k`` added into its weights (dense reference)."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name in experts[0].module_names:
            modules[name].weight += sum(
                w * e.delta(name) for w, e in zip(weights, experts, strict=True)
            )
    return out


def test_hc_arrow_against_hand_made_clusters(ws, tiny_experts) -> None:
    encoded = ws.encoded("test")
    one = build_fusion(ws, "hc_arrow", n_clusters=1)  # one cluster: nothing to route
    assert one.info["clusters"] == [list(NAMES)]
    mean = merged_copy(ws.base.model, tiny_experts, [1 / 3] * 3)
    want = score_examples(model_log_probs(mean, ws.cache.split), encoded, ws.cache)
    got = evaluate(ws.base.model, one, encoded, ws.cache)
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    # as many clusters as experts: Arrow over the experts themselves
    each = build_fusion(ws, "hc_arrow", n_clusters=3, top_k=1, steps=0)  # untrained: Arrow
    each = evaluate(ws.base.model, each, encoded, ws.cache)
    arrow = evaluate(ws.base.model, build_fusion(ws, "arrow", top_k=1), encoded, ws.cache)
    np.testing.assert_allclose(each.loss, arrow.loss, rtol=1e-6, atol=1e-6)
    # two clusters: the pair of experts whose flattened deltas have the highest cosine
    flat = [torch.cat([e.delta(m).flatten() for m in e.module_names]) for e in tiny_experts]
    cos = {
        (i, j): F.cosine_similarity(flat[i], flat[j], dim=0).item()
        for i, j in itertools.combinations(range(3), 2)
    }
    i, j = max(cos, key=cos.get)
    (k,) = set(range(3)) - {i, j}
    two = build_fusion(ws, "hc_arrow", n_clusters=2, steps=0).info["clusters"]
    assert sorted(map(sorted, two)) == sorted([sorted([NAMES[i], NAMES[j]]), [NAMES[k]]])


def test_hc_arrow_starts_from_arrow_and_sgd_lowers_its_loss(ws) -> None:
    """Three tasks told apart by their first token, one expert (cluster) each: at 0 steps
    the router is Arrow over the merged clusters; trained, its validation loss is lower."""
    val = ws.encoded("val")
    start = build_fusion(ws, "hc_arrow", n_clusters=2, top_k=2, steps=0)
    arrow = Fusion("a", "routing", start.sources, ArrowRouter(top_k=2, temperature=0.1))
    at_zero = evaluate(ws.base.model, start, val, ws.cache).loss
    np.testing.assert_allclose(
        at_zero, evaluate(ws.base.model, arrow, val, ws.cache).loss, rtol=1e-6, atol=1e-6
    )
    trained = build_fusion(ws, "hc_arrow", n_clusters=2, top_k=2, steps=30, lr=0.05)
    assert trained.info["clusters"] == start.info["clusters"]
    after = evaluate(ws.base.model, trained, val, ws.cache).loss
    assert after.mean() < at_zero.mean() - 0.02, (after.mean(), at_zero.mean())
    moved = [
        (trained.mixer.protos[k] - start.mixer.protos[k]).abs().max().item()
        for k in start.mixer.protos
    ]
    assert max(moved) > 1e-3


def test_learned_router_improves_on_its_start(ws, tiny_experts) -> None:
    """Zero-initialised, the router is the uniform merge; training must lower val loss."""
    val = ws.encoded("val")
    fusion = build_fusion(ws, "learned_router", steps=30, lr=0.05)
    first, last = fusion.info["val_loss_first_last"]
    assert last < first
    uniform = Fusion("u", "merging", tiny_experts, ConstantMixer(torch.ones(3) / 3))
    start = evaluate(ws.base.model, uniform, val, ws.cache).loss.mean()
    trained = evaluate(ws.base.model, fusion, val, ws.cache).loss.mean()
    assert trained < start - 1e-3


def test_arrow_top2_equals_hand_routing_on_dense_deltas(ws, tiny_experts) -> None:
    """Each adapted linear: W x + sum over the 2 experts whose top right-singular vector is
    best aligned with x of softmax(|v_k . x| / |x| / T) * delta_k x, by hand from dense
    deltas (torch's SVD), through the whole model."""
    model, temperature = ws.base.model, 0.3
    batch = collate(ws.encoded("test")[:6], 0)
    states = pad_states(ws.cache.get(ws.encoded("test")[:6]))
    fusion = build_fusion(ws, "arrow", top_k=2, temperature=temperature)
    with installed(model, fusion, ws.cache.split) as log_probs, torch.no_grad():
        got = log_probs(states, batch)

    modules = dict(model.named_modules())
    handles = []
    for name in tiny_experts[0].module_names:
        deltas = [e.delta(name) for e in tiny_experts]
        protos = torch.stack([torch.linalg.svd(d.double())[2][0].float() for d in deltas])

        def hook(mod, args, out, deltas=deltas, protos=protos):
            x = args[0]
            logits = (x @ protos.T).abs() / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
            top2 = logits.argsort(-1, descending=True)[..., :2]
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top2, True)
            w = torch.softmax((logits / temperature).masked_fill(~keep, float("-inf")), -1)
            assert ((w > 0).sum(-1) == 2).all()
            return out + sum(w[..., k : k + 1] * (x @ d.T) for k, d in enumerate(deltas))

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            want = F.log_softmax(target_logits(model, states, batch, ws.cache.split), -1)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
