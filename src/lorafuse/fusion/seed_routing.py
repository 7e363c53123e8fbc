"""Routing built from the seed papers' ideas: LoRA-Retriever, EMR-Merging served by task or
by retrieval, and MC-SMoE's smaller library served by routing.

* **retrieval** (LoraRetriever, Zhao et al. 2024): an input's embedding is the mean of its
  prompt's hidden states entering the first adapted layer (L2-normalised; the paper uses a
  separate instruction-tuned sentence encoder); each expert's embedding is the normalised
  mean of the embeddings of a few of its own task's validation prompts. An input retrieves
  the ``top_k`` most cosine-similar experts and mixes them with equal weights (the paper's
  "mixture" composition: the average of the retrieved LoRAs' outputs at every layer);
* **EMR** (``lorafuse.merging.emr``): one unified delta, a mask and a rescaler per task, each
  task's modulated delta compressed to LoRA rank ``rank`` (default the sum of the experts'
  ranks, as the dense merges); an input runs its task's (``routing="oracle"``: the example's
  task label, the paper's setting) or the top retrieved expert's (``"retriever"``);
* **MC-SMoE** (``lorafuse.merging.mc_smoe``): groups from the retriever's routing weights on
  validation prompts, frequency-weighted merge, low-rank + column-sparse compression; an input
  goes to the group holding its most similar original expert.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lorafuse.core.encode import collate
from lorafuse.core.mixture import BatchMixer, FactorSet, FactorSource
from lorafuse.errors import LorafuseError
from lorafuse.fusion.base import Fusion, prompt_mean
from lorafuse.library import module_factors, union_modules
from lorafuse.merging.emr import emr_module, rescalers, task_delta
from lorafuse.merging.mc_smoe import mc_smoe_sources
from lorafuse.merging.merge import stack_deltas
from lorafuse.merging.svd import compress_dense
from lorafuse.workspace import Workspace

VAL = "val"


def prompt_embeddings(ws: Workspace, indices: Sequence[int], split: str = VAL) -> torch.Tensor:
    """(n, H) normalised prompt-mean states of the split's examples ``indices``."""
    encoded = [ws.encoded(split)[i] for i in indices]
    states = ws.cache.get(encoded, desc="retriever: states")
    rows = []
    for e, s in zip(encoded, states, strict=True):
        batch = collate([e], ws.base.tokenizer.pad_token_id)
        rows.append(prompt_mean(s[None].float(), batch)[0])
    return F.normalize(torch.stack(rows), dim=-1) if rows else torch.zeros(0)


def expert_prototypes(ws: Workspace, per_task: int = 20) -> torch.Tensor:
    """(K, H) each private expert's normalised mean embedding of its own validation prompts."""
    keep = set(ws.per_task(VAL, per_task))
    protos = []
    for name, idx in ws.own_subsets(VAL).items():
        idx = [i for i in idx if i in keep]
        if not idx:
            raise LorafuseError(f"retriever: no validation examples for expert {name!r}")
        protos.append(prompt_embeddings(ws, idx).mean(0))
    return F.normalize(torch.stack(protos), dim=-1)


def top_k_uniform(sim: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B, K) weights 1/k on each row's ``top_k`` largest similarities, 0 elsewhere."""
    k = min(top_k, sim.shape[-1])
    idx = sim.topk(k, dim=-1).indices
    return torch.zeros_like(sim).scatter_(-1, idx, 1.0 / k)


def retrieval_route(protos: torch.Tensor, mixer: BatchMixer, top_k: int, groups=None):
    """A route function: prompt embedding -> cosine to the prototypes -> top-k uniform
    weights (over groups, scoring each by its best member, when ``groups`` is given)."""

    def route(model, states, batch) -> None:
        emb = F.normalize(prompt_mean(states.float(), batch), dim=-1)
        sim = emb @ protos.to(emb.device).T
        if groups is not None:
            sim = torch.stack([sim[:, g].amax(-1) for g in groups], dim=-1)
        mixer.current = top_k_uniform(sim, top_k).to(states.dtype)

    return route


def lora_retriever(ws: Workspace, *, top_k: int = 3, per_task: int = 20, seed: int = 0) -> Fusion:
    """LoraRetriever: retrieve the top-k experts by prompt embedding, average them."""
    started = time.perf_counter()
    protos = expert_prototypes(ws, per_task)
    mixer = BatchMixer()
    return Fusion(
        "lora_retriever",
        "routing",
        list(ws.private.values()),
        mixer,
        route=retrieval_route(protos, mixer, top_k),
        info={"train_s": time.perf_counter() - started, "top_k": top_k},
    )


def emr_sources(
    experts: Sequence[FactorSource], rank: int | None
) -> tuple[list[FactorSet], list[float]]:
    """Each task's EMR delta ``lambda_t M_t * tau_uni`` per module as LoRA factors, over the
    union of the experts' modules (zero delta where an expert has none, as the merges)."""
    per_module = {}
    abs_task = abs_masked = 0.0
    for m in union_modules(experts):
        parts = module_factors(experts, m)  # zeros where an expert does not adapt m
        mod = emr_module(stack_deltas(parts))
        own = sum(e.factors(m).rank for e in experts if m in set(e.module_names))
        per_module[m] = (mod, rank or own)
        abs_task, abs_masked = abs_task + mod.abs_task, abs_masked + mod.abs_masked
    lam = rescalers(torch.as_tensor(abs_task), torch.as_tensor(abs_masked))
    sources = [
        FactorSet(
            f"emr{t}",
            {
                m: compress_dense(task_delta(mod, t, float(lam[t])), r)
                for m, (mod, r) in per_module.items()
            },
        )
        for t in range(len(experts))
    ]
    return sources, lam.tolist()


def oracle_route(ws: Workspace, mixer: BatchMixer):
    """A route function giving each input its own task's expert (looked up by token ids)."""
    order = list(ws.private)
    expert_of = ws.expert_of
    owner: dict[tuple[int, ...], int] = {}
    for split in ws.suite.splits:
        for ex, enc in zip(ws.examples(split), ws.encoded(split), strict=True):
            if ex.task in expert_of:
                owner[enc.ids] = order.index(expert_of[ex.task])

    def route(model, states, batch) -> None:
        rows = []
        for ids, n in zip(batch.input_ids.tolist(), batch.lengths.tolist(), strict=True):
            key = tuple(ids[:n])
            if key not in owner:
                raise LorafuseError("emr oracle: an input that is no example of a known task")
            rows.append(owner[key])
        mixer.current = F.one_hot(torch.tensor(rows), len(order)).to(states.device, states.dtype)

    return route


def emr(
    ws: Workspace,
    *,
    routing: str = "oracle",
    rank: int | None = None,
    per_task: int = 20,
    seed: int = 0,
) -> Fusion:
    """EMR-Merging: unified delta + per-task mask and rescaler, chosen by task label or router."""
    if routing not in ("oracle", "retriever"):
        raise LorafuseError(f"emr routing must be 'oracle' or 'retriever', got {routing!r}")
    ws.require_tasks("emr (one mask and rescaler per task)")
    started = time.perf_counter()
    sources, lam = emr_sources(list(ws.private.values()), rank)
    mixer = BatchMixer()
    if routing == "oracle":
        route = oracle_route(ws, mixer)
    else:
        route = retrieval_route(expert_prototypes(ws, per_task), mixer, 1)
    info: dict[str, Any] = {"train_s": time.perf_counter() - started, "rescalers": lam}
    return Fusion(f"emr_{routing}", "routing", sources, mixer, route=route, info=info)


def retriever_routing(ws: Workspace, per_task: int = 20, temperature: float = 0.1) -> torch.Tensor:
    """(N, K) the retriever's softmax weights over the experts on validation prompts."""
    protos = expert_prototypes(ws, per_task)
    emb = prompt_embeddings(ws, ws.per_task(VAL, per_task))
    return torch.softmax(emb @ protos.T / temperature, dim=-1)


def mc_smoe(
    ws: Workspace,
    *,
    n_groups: int | None = None,
    rank: int | None = 8,
    density: float = 0.9,
    per_task: int = 20,
    seed: int = 0,
) -> Fusion:
    """MC-SMoE: experts grouped by routing statistics, merged, compressed, routed.

    Frequency-weighted merge per group, then low rank + column-sparse compression.
    ``n_groups`` defaults to half the experts, rounded up (4 of the shipped 8)."""
    started = time.perf_counter()
    experts = list(ws.private.values())
    n_groups = n_groups or (len(experts) + 1) // 2
    sources, groups, freq = mc_smoe_sources(
        experts, retriever_routing(ws, per_task), n_groups, rank=rank, density=density
    )
    mixer = BatchMixer()
    route = retrieval_route(expert_prototypes(ws, per_task), mixer, 1, groups=groups)
    names = list(ws.private)
    info = {
        "train_s": time.perf_counter() - started,
        "groups": [[names[i] for i in g] for g in groups],
        "frequency": freq.tolist(),
    }
    return Fusion("mc_smoe", "routing", sources, mixer, route=route, info=info)


# registration: merged into FUSION_METHODS by one line in fusion/methods.py
# name -> (family, builder, defaults)
SEED_ROUTING: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "lora_retriever": ("routing", lora_retriever, {}),
    "emr": ("routing", emr, {"routing": "oracle"}),
    "emr_retriever": ("routing", emr, {"routing": "retriever"}),
    "mc_smoe": ("routing", mc_smoe, {}),
}
