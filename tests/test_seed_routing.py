"""Routing from the seed papers on the tiny model: LoRA-Retriever, EMR served by task labels
or retrieval, MC-SMoE's smaller library; checked against each expert's (or delta's) own
forward."""

from __future__ import annotations

import numpy as np
import torch
from seed_workspace import tiny_workspace

from lorafuse.core.encode import collate
from lorafuse.core.forward import lower_states, target_logits
from lorafuse.core.mixture import BatchMixer, ConstantMixer, mixture_of_loras
from lorafuse.fusion.base import installed
from lorafuse.fusion.methods import build_fusion
from lorafuse.fusion.seed_routing import retrieval_route, top_k_uniform
from lorafuse.merging.emr import emr_module, rescalers, task_delta
from lorafuse.merging.merge import stack_deltas


def test_top_k_uniform_by_hand() -> None:
    w = top_k_uniform(torch.tensor([[0.1, 0.9, 0.5, -1.0], [0.3, 0.2, 0.1, 0.0]]), 2)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0]]))


def test_retrieval_route_picks_the_most_similar_prototype() -> None:
    protos = torch.eye(3)
    mixer = BatchMixer()
    states = torch.zeros(2, 4, 3)
    states[0, :2] = torch.tensor([0.0, 0.2, 1.0])  # prompt tokens 0, 1 -> prototype 2
    states[1, :2] = torch.tensor([1.0, 0.5, 0.0])  # -> prototype 0
    batch = collate([_enc((1, 2, 3, 4)), _enc((1, 2, 3, 4))], 0)
    retrieval_route(protos, mixer, 1)(None, states, batch)
    torch.testing.assert_close(mixer.current, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    retrieval_route(protos, mixer, 1, groups=[[0, 1], [2]])(None, states, batch)
    torch.testing.assert_close(mixer.current, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def _enc(ids):
    from lorafuse.core.encode import Encoded

    return Encoded(ids, 2)


def one_expert_log_probs(model, sources, batch, states) -> torch.Tensor:
    with mixture_of_loras(model, sources, ConstantMixer(torch.ones(1))), torch.no_grad():
        return torch.log_softmax(target_logits(model, states, batch, 0), -1)


def fused_log_probs(ws, fusion, batch, states) -> torch.Tensor:
    with installed(ws.base.model, fusion, 0) as log_probs, torch.no_grad():
        return log_probs(states, batch)


def test_lora_retriever_routes_each_prompt_to_its_tasks_expert(tiny_base, tiny_experts) -> None:
    ws = tiny_workspace(tiny_base, tiny_experts, n_per_task=6)
    fusion = build_fusion(ws, "lora_retriever", top_k=1)
    test = ws.encoded("test")
    owners = np.repeat(np.arange(3), 6)
    batch = collate(test, 0)
    states = lower_states(tiny_base.model, batch.input_ids, 0)
    fusion.route(tiny_base.model, states, batch)
    chosen = fusion.mixer.current.argmax(-1).numpy()
    assert (chosen == owners).mean() >= 0.8  # chance: 1/3
    got = fused_log_probs(ws, fusion, batch, states)
    for row, k in enumerate(chosen):  # each row runs exactly the expert it was given
        want = one_expert_log_probs(tiny_base.model, [tiny_experts[k]], batch, states)
        sel = batch.rows == row
        torch.testing.assert_close(got[sel], want[sel], atol=1e-5, rtol=0)


def test_emr_oracle_runs_each_tasks_masked_rescaled_delta(tiny_base, tiny_experts) -> None:
    ws = tiny_workspace(tiny_base, tiny_experts, n_per_task=2)
    fusion = build_fusion(ws, "emr", rank=64)  # >= every module's min(d_out, d_in): exact
    modules = tiny_experts[0].module_names
    mods = {m: emr_module(stack_deltas([e.factors(m) for e in tiny_experts])) for m in modules}
    lam = rescalers(
        sum(x.abs_task for x in mods.values()), sum(x.abs_masked for x in mods.values())
    )
    torch.testing.assert_close(torch.tensor(fusion.info["rescalers"]), lam)
    test = ws.encoded("test")
    batch = collate(test, 0)
    model = tiny_base.model
    states = lower_states(model, batch.input_ids, 0)
    got = fused_log_probs(ws, fusion, batch, states)
    for t in range(3):  # reference: task t's dense EMR delta added to the weights
        saved = {m: model.get_submodule(m).weight.detach().clone() for m in modules}
        try:
            with torch.no_grad():
                for m in modules:
                    model.get_submodule(m).weight += task_delta(mods[m], t, float(lam[t]))
                want = torch.log_softmax(target_logits(model, states, batch, 0), -1)
        finally:
            with torch.no_grad():
                for m, w in saved.items():
                    model.get_submodule(m).weight.copy_(w)
        sel = (batch.rows >= 2 * t) & (batch.rows < 2 * t + 2)  # task t's two test items
        torch.testing.assert_close(got[sel], want[sel], atol=1e-4, rtol=0)


def test_emr_retriever_and_mc_smoe_serve_through_routing(tiny_base, tiny_experts) -> None:
    ws = tiny_workspace(tiny_base, tiny_experts, n_per_task=6)
    test = ws.encoded("test")
    batch = collate(test, 0)
    states = lower_states(tiny_base.model, batch.input_ids, 0)
    retriever = build_fusion(ws, "lora_retriever", top_k=1)
    want = fused_log_probs(ws, retriever, batch, states)
    # K groups, no compression: every group is one expert, routed like the retriever
    full = build_fusion(ws, "mc_smoe", n_groups=3, rank=None, density=1.0)
    assert sorted(g[0] for g in full.info["groups"]) == ["e0", "e1", "e2"]
    torch.testing.assert_close(fused_log_probs(ws, full, batch, states), want, atol=1e-5, rtol=0)
    small = build_fusion(ws, "mc_smoe", n_groups=2, rank=2, density=0.5)
    assert len(small.sources) == 2 and sum(len(g) for g in small.info["groups"]) == 3
    assert np.isfinite(fused_log_probs(ws, small, batch, states).numpy()).all()
    emr = build_fusion(ws, "emr_retriever")
    assert len(emr.sources) == 3
    assert np.isfinite(fused_log_probs(ws, emr, batch, states).numpy()).all()


def test_mc_smoe_selection_curve_ends_at_the_library(tiny_base, tiny_experts) -> None:
    from lorafuse.analysis.selection import mc_smoe_selection, mean_loss
    from lorafuse.fusion.seed_routing import retriever_routing

    ws = tiny_workspace(tiny_base, tiny_experts, n_per_task=4)
    routing = retriever_routing(ws, 4)
    assert routing.shape == (12, 3)
    torch.testing.assert_close(routing.sum(-1), torch.ones(12))
    val = ws.encoded("val")
    curve = mc_smoe_selection(
        tiny_base.model, tiny_experts, routing, val, ws.cache, rank=None, density=1.0
    )
    assert sorted(curve) == [1, 2, 3] and sorted(curve[1][0][0]) == [0, 1, 2]
    assert [len(groups) for groups, _ in curve.values()] == [1, 2, 3]
    want = mean_loss(tiny_base.model, tiny_experts, "average", val, ws.cache)
    assert abs(curve[3][1] - want) < 1e-5  # K groups of one, uncompressed: the library itself
