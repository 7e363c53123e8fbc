"""The seed papers' data-driven merges against their formulas: RegMean / PLeaS least squares,
Sens-Merging, DAM, EMR, MC-SMoE (hand-made matrices, and the tiny model's own forward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from seed_workspace import tiny_workspace

from lorafuse.core.encode import collate
from lorafuse.core.fit import per_example_nll
from lorafuse.core.forward import lower_states, target_logits
from lorafuse.core.mixture import ConstantMixer, FactorSet, mixture_of_loras
from lorafuse.fusion.data_merges import (
    expert_grams,
    expert_sensitivities,
    logit_distances,
    own_data,
)
from lorafuse.fusion.methods import build_fusion
from lorafuse.library import LoraFactors, save_adapter
from lorafuse.merging.dam import cosine_penalty, dam_factors, dam_layers, train_dam
from lorafuse.merging.emr import emr_module, rescalers, task_delta
from lorafuse.merging.least_squares import regmean
from lorafuse.merging.mc_smoe import compress_expert, merge_group, routing_groups
from lorafuse.merging.sensitivity import (
    cross_task_scaling,
    layerwise_merge,
    sens_coefficients,
    sensitivity_sum,
)


def lora(gen, d_out, d_in, r, s=1.0) -> LoraFactors:
    return LoraFactors(
        torch.randn(r, d_in, generator=gen, dtype=torch.float64),
        torch.randn(d_out, r, generator=gen, dtype=torch.float64),
        s,
    )


# ------------------------------------------------------------------ RegMean / PLeaS
def test_regmean_is_the_stacked_least_squares_solution() -> None:
    gen = torch.Generator().manual_seed(0)
    parts = [lora(gen, 5, 7, 2, 0.5), lora(gen, 5, 7, 3, 2.0)]
    xs = [torch.randn(6, 7, generator=gen, dtype=torch.float64) for _ in parts]
    got = regmean(parts, [x.T @ x for x in xs], alpha=1.0).delta()
    # argmin_D sum_i ||X_i D^T - X_i delta_i^T||^2, solved as one stacked regression
    lhs = torch.cat(xs)
    rhs = torch.cat([x @ p.delta().T for x, p in zip(xs, parts, strict=True)])
    want = torch.linalg.lstsq(lhs, rhs).solution.T
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    # with shrunk off-diagonals the normal equations hold for G~ = a G + (1 - a) diag(G)
    a = 0.6
    d = regmean(parts, [x.T @ x for x in xs], alpha=a).delta()
    shrunk = [a * x.T @ x + (1 - a) * torch.diag(torch.diagonal(x.T @ x)) for x in xs]
    residual = sum((d - p.delta()) @ g for p, g in zip(parts, shrunk, strict=True))
    assert residual.abs().max() < 1e-9


def test_regmean_of_one_expert_is_that_expert() -> None:
    gen = torch.Generator().manual_seed(1)
    p = lora(gen, 4, 6, 2, 1.5)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(regmean([p], [x.T @ x]).delta(), p.delta())


def test_expert_grams_are_each_experts_own_layer_inputs(tiny_base, tiny_experts) -> None:
    ws = tiny_workspace(tiny_base, tiny_experts)
    data = own_data(ws, None)
    grams = expert_grams(tiny_base.model, tiny_experts, data, ws.cache)
    module = "model.layers.1.self_attn.q_proj"
    for k, (expert, encoded) in enumerate(zip(tiny_experts, data, strict=True)):
        seen = []
        peft_model = PeftModel.from_pretrained(tiny_base.model, str(expert.path))
        layer = peft_model.get_submodule("base_model.model." + module)
        handle = layer.register_forward_hook(lambda m, i, o, seen=seen: seen.append(i[0][0]))
        try:
            with torch.no_grad():
                for e in encoded:  # one at a time: no padding
                    peft_model(input_ids=torch.tensor([e.ids]))
        finally:
            handle.remove()
            peft_model.unload()
        want = (lambda x: x.T @ x)(torch.cat(seen).double())
        # fp32 forwards, padded batch vs one sequence at a time: rounding-level differences
        torch.testing.assert_close(grams[k][module], want, atol=1e-5 * want.abs().max(), rtol=1e-4)


# ------------------------------------------------------------------ Sens-Merging
def test_sensitivity_sum_is_per_example_gradient_times_delta() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(3, 4, generator=gen, requires_grad=True)
    x = torch.randn(2, 5, 4, generator=gen)
    delta = torch.randn(3, 4, generator=gen)
    want = 0.0
    for b in range(2):  # the reference: autograd per example
        loss = (torch.tanh(x[b] @ w.T) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, w)
        want += (delta * grad).abs().sum()
    y = (x @ w.T).detach().requires_grad_(True)
    (g,) = torch.autograd.grad((torch.tanh(y) ** 2).sum(), y)
    torch.testing.assert_close(sensitivity_sum(delta, x, g), want)


def test_expert_sensitivities_match_gradients_of_the_merged_weights(
    tiny_base, tiny_experts
) -> None:
    ws = tiny_workspace(tiny_base, tiny_experts, n_per_task=2)
    data = own_data(ws, None)
    sens = expert_sensitivities(tiny_base.model, tiny_experts, data, ws.cache, [0, 1])
    model = tiny_base.model
    for k, (expert, encoded) in enumerate(zip(tiny_experts, data, strict=True)):
        want = torch.zeros(2, dtype=torch.float64)
        originals = {}
        for m in expert.module_names:  # expert k merged into the weights, which get gradients
            lin = model.get_submodule(m)
            originals[m] = lin.weight.detach().clone()
            lin.weight = torch.nn.Parameter(originals[m] + expert.delta(m))
        try:
            for e in encoded:
                batch = collate([e], 0)
                states = lower_states(model, batch.input_ids, 0)
                per_example_nll(target_logits(model, states, batch, 0), batch).sum().backward()
                for m in expert.module_names:
                    lin = model.get_submodule(m)
                    layer = int(m.split(".")[2])
                    want[layer] += (expert.delta(m) * lin.weight.grad).abs().sum().double()
                    lin.weight.grad = None
        finally:
            for m, w in originals.items():
                model.get_submodule(m).weight = torch.nn.Parameter(w, requires_grad=False)
        torch.testing.assert_close(sens[k], want / len(encoded), rtol=1e-4, atol=1e-7)


def test_sens_coefficients_by_hand() -> None:
    sens = torch.tensor([[1.0, 3.0], [2.0, 2.0]], dtype=torch.float64)  # (K=2, L=2)
    dist = torch.tensor([[0.0, 1.0], [3.0, 0.0]], dtype=torch.float64)
    # d_bar = 2; tau_0 = exp(-d_01 / 2), tau_1 = exp(-d_10 / 2)
    tau = torch.tensor([torch.e**-0.5, torch.e**-1.5], dtype=torch.float64)
    torch.testing.assert_close(cross_task_scaling(dist), tau)
    alpha = torch.tensor([[0.5, 1.5], [1.0, 1.0]], dtype=torch.float64)  # L * S / sum_l S
    score = alpha * tau[:, None] / 0.5
    want = 2 * torch.exp(score) / torch.exp(score).sum(0)
    torch.testing.assert_close(sens_coefficients(sens, dist, temperature=0.5), want.T)
    task_only = sens_coefficients(sens, dist, scaling="task")
    torch.testing.assert_close(task_only.T, 2 * torch.softmax(alpha, 0))


def test_layerwise_task_arithmetic_uses_each_layers_weights(tiny_experts) -> None:
    coef = torch.tensor([[0.2, 0.5, 1.0], [1.5, -0.3, 0.7]])
    merged = layerwise_merge(tiny_experts, "task_arithmetic", coef, [0, 1], scale=0.5)
    for m in tiny_experts[0].module_names:
        row = coef[int(m.split(".")[2])]
        want = 0.5 * sum(w * e.delta(m) for w, e in zip(row, tiny_experts, strict=True))
        torch.testing.assert_close(merged[m].delta(), want, atol=1e-5, rtol=1e-5)


def test_logit_distances_by_dense_reference(tiny_base, tiny_experts) -> None:
    ws = tiny_workspace(tiny_base, tiny_experts, n_per_task=2)
    data = own_data(ws, None)
    dist = logit_distances(tiny_base.model, tiny_experts, data, ws.cache)
    j = 1
    batch = collate(data[j], 0)
    states = lower_states(tiny_base.model, batch.input_ids, 0)
    logits = []
    for e in tiny_experts:
        with mixture_of_loras(tiny_base.model, [e], ConstantMixer(torch.ones(1))), torch.no_grad():
            logits.append(target_logits(tiny_base.model, states, batch, 0))
    want = torch.stack([(z - logits[j]).norm(dim=-1).mean() for z in logits]).double()
    torch.testing.assert_close(dist[:, j], want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ DAM
def test_dam_export_is_column_scaled_deltas_and_matches_its_layer(
    tiny_base, tiny_experts, tmp_path
) -> None:
    gen = torch.Generator().manual_seed(3)
    module = "model.layers.0.mlp.up_proj"
    parts = [e.factors(module) for e in tiny_experts]
    coef = torch.rand(3, parts[0].d_in, generator=gen)
    want = sum(p.delta() @ torch.diag(c) for p, c in zip(parts, coef, strict=True))
    torch.testing.assert_close(dam_factors(parts, coef).delta(), want, atol=1e-5, rtol=1e-5)
    ws = tiny_workspace(tiny_base, tiny_experts, n_per_task=2)
    batch = collate(ws.encoded("val"), 0)
    model = tiny_base.model
    states = lower_states(model, batch.input_ids, 0)
    with dam_layers(model, tiny_experts, 0.0) as layers, torch.no_grad():
        coefs = {}
        for m, layer in layers.items():
            layer.coef.copy_(torch.rand(layer.coef.shape, generator=gen))
            coefs[m] = layer.coef.clone()
        got = target_logits(model, states, batch, 0)
    exported = {m: dam_factors([e.factors(m) for e in tiny_experts], c) for m, c in coefs.items()}
    with mixture_of_loras(model, [FactorSet("dam", exported)], ConstantMixer(torch.ones(1))):
        with torch.no_grad():
            want_logits = target_logits(model, states, batch, 0)
    torch.testing.assert_close(got, want_logits, atol=1e-5, rtol=1e-5)
    # written as a PEFT adapter, PEFT itself runs the same merged model
    path = save_adapter(tmp_path / "dam", exported, base_model="tiny")
    peft_model = PeftModel.from_pretrained(model, str(path))
    try:
        with torch.no_grad():
            peft_logits = target_logits(peft_model, states, batch, 0)
    finally:
        peft_model.unload()
    torch.testing.assert_close(got, peft_logits, atol=1e-5, rtol=1e-5)


def test_cosine_penalty_by_hand() -> None:
    c = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    s = 2**-0.5
    torch.testing.assert_close(cosine_penalty([c]), torch.tensor((s + 0.0 + s) / 3))


def test_dam_training_lowers_the_kl_to_the_experts(tiny_base, tiny_experts) -> None:
    ws = tiny_workspace(tiny_base, tiny_experts, n_per_task=4)
    data = own_data(ws, None)
    encoded = [e for part in data for e in part]
    owner = [k for k, part in enumerate(data) for _ in part]
    result = train_dam(
        tiny_base.model, tiny_experts, encoded, owner, ws.cache,
        steps=12, lr=0.1, batch_size=12, cos_weight=0.0,
    )  # fmt: skip
    assert result.history[-1] < 0.7 * result.history[0]  # one full batch: same data each step
    fusion = build_fusion(ws, "dam", steps=2)
    assert fusion.sources[0].factors(tiny_experts[0].module_names[0]).rank == 2 + 4 + 3


# ------------------------------------------------------------------ EMR
def test_emr_elect_mask_rescale_by_hand() -> None:
    tau = torch.tensor([[[3.0, -1.0], [0.5, 0.0]], [[-2.0, -4.0], [1.0, 2.0]]])
    mod = emr_module(tau)
    # signs of the sum [[1, -5], [1.5, 2]] -> +,-,+,+; max agreeing magnitude
    torch.testing.assert_close(mod.unified, torch.tensor([[3.0, -4.0], [1.0, 2.0]]))
    want_masks = torch.tensor([[[1, 1], [1, 0]], [[0, 1], [1, 1]]], dtype=torch.bool)
    assert torch.equal(mod.masks, want_masks)
    lam = rescalers(mod.abs_task, mod.abs_masked)
    torch.testing.assert_close(lam, torch.tensor([4.5 / 8.0, 9.0 / 7.0]))
    torch.testing.assert_close(
        task_delta(mod, 1, float(lam[1])), 9.0 / 7.0 * torch.tensor([[0.0, -4.0], [1.0, 2.0]])
    )


# ------------------------------------------------------------------ MC-SMoE
def test_mc_smoe_groups_merge_and_compress_by_hand() -> None:
    routing = torch.tensor(
        [[0.7, 0.2, 0.1, 0.0], [0.6, 0.3, 0.1, 0.0], [0.1, 0.1, 0.8, 0.0], [0.2, 0.5, 0.3, 0.0]]
    )
    groups, freq = routing_groups(routing, 2)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64))
    # dominant 0 and 1 (ties by index); columns 2, 3 join the most cosine-similar dominant one
    cols = F.normalize(routing.T.double(), dim=1)
    sim = cols @ cols.T
    assert groups[0][0] == 0 and groups[1][0] == 1
    for j in (2, 3):
        best = 0 if sim[j, 0] >= sim[j, 1] else 1
        assert j in groups[best]
    gen = torch.Generator().manual_seed(4)
    parts = [lora(gen, 4, 6, 2), lora(gen, 4, 6, 2)]
    merged = merge_group(parts, [0.5, 0.25])
    torch.testing.assert_close(
        merged.delta(), (0.5 * parts[0].delta() + 0.25 * parts[1].delta()) / 0.75
    )
    small = compress_expert(merged, 1, 0.5)
    u, s, vh = torch.linalg.svd(merged.delta())
    best1 = s[0] * torch.outer(u[:, 0], vh[0])
    keep = best1.norm(dim=0).topk(3).indices
    want = torch.zeros_like(best1)
    want[:, keep] = best1[:, keep]
    torch.testing.assert_close(small.delta(), want, atol=1e-9, rtol=1e-9)
