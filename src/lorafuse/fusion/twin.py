"""Twin-Merging (Lu et al. 2024): a shared delta for everyone plus routed exclusive deltas.

* shared ``ΔW_s``: a static merge of the experts (task arithmetic or TIES);
* exclusive ``ΔW_t^excl = ΔW_t - ΔW_s``, per expert, compressed by truncated SVD in factor
  space and stored as LoRA factors (the paper stores ``U_r, Σ_r, V_r``). By default each
  exclusive delta gets its expert's own rank in that module, so the exclusive deltas hold
  exactly as many parameters as the library they come from (in a module some expert does not
  adapt, the library's ranks there are shared out evenly); ``rank`` sets one rank for all
  (exact when it covers the rank of the difference);
* router: a 3-layer MLP (BatchNorm, LeakyReLU) on the shared model's mean last hidden state
  over the prompt, trained with cross-entropy on the task labels of validation items;
* output ``W + ΔW_s + Σ_t softmax(router)_t ΔW_t^excl``, the weights computed once per prompt.

The reference code merges full weights for every input at batch size 1. ``twin`` folds the
shared delta into the weights once, the exclusive deltas are sources of the mixture core, and a
mixed batch is one forward. ``twin_group`` is the paper's group-wise variant: the router
weights of the batch being served are grouped (argmax bins, k-means within each bin, see
:mod:`lorafuse.fusion.group_merge`), the weights are merged once per group with the group's
mean router weights, and each group's rows run on their merged (dense) weights.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorafuse.core.encode import Batch, Encoded, collate
from lorafuse.core.forward import causal_lm, final_hidden
from lorafuse.core.mixture import BatchMixer, FactorSet, FactorSource, mixture_of_loras
from lorafuse.core.sparse import TopK, dense_weights, top_k_of_weights
from lorafuse.core.states import StateCache, pad_states
from lorafuse.errors import LorafuseError
from lorafuse.eval.harness import length_batches
from lorafuse.fusion.base import Fusion, prompt_mean
from lorafuse.fusion.group_merge import group_items, grouped_logits
from lorafuse.library import LoraFactors, module_factors
from lorafuse.merging import merge
from lorafuse.merging.linear import concat_factors
from lorafuse.merging.svd import compress_factors
from lorafuse.workspace import Workspace

VAL = "val"


class TwinRouter(nn.Module):
    """3-layer MLP from a prompt feature (H) to K expert logits."""

    def __init__(self, hidden: int, k: int, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden, width),
            nn.BatchNorm1d(width),
            nn.LeakyReLU(),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.LeakyReLU(),
            nn.Linear(width, k),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def exclusive_ranks(own: Sequence[LoraFactors], present: Sequence[bool]) -> list[int]:
    """Default ranks of one module's exclusive deltas: as many parameters as the library.

    Each expert's own rank where every expert adapts the module; else the present experts'
    ranks shared out evenly over all K (at least 1: an absent expert's exclusive delta is
    ``-ΔW_s``, not zero)."""
    if all(present):
        return [f.rank for f in own]
    total = sum(f.rank for f, p in zip(own, present, strict=True) if p)
    return [max(1, total // len(own))] * len(own)


def twin_sources(
    experts: Sequence[FactorSource],
    *,
    shared_method: str = "task_arithmetic",
    shared_params: dict | None = None,
    rank: int | None = None,
) -> list[FactorSet]:
    """[shared, exclusive_1..K] as in-memory factor sets (one module at a time); exclusive
    ranks: ``rank`` for all, or by default :func:`exclusive_ranks` (the library's size)."""
    shared = merge(experts, shared_method, progress=False, **(shared_params or {}))
    exclusive: list[dict] = [{} for _ in experts]
    for module, s in shared.items():
        own = module_factors(experts, module)  # zeros where an expert has no delta
        present = [module in set(e.module_names) for e in experts]
        ranks = [rank] * len(own) if rank is not None else exclusive_ranks(own, present)
        for k, (e, r) in enumerate(zip(own, ranks, strict=True)):
            diff = concat_factors([e, s], [1.0, -1.0])
            exclusive[k][module] = compress_factors(diff, r) if r < diff.rank else diff
    names = [getattr(e, "name", f"expert{k}") for k, e in enumerate(experts)]
    return [FactorSet("shared", shared)] + [
        FactorSet(f"{n}-exclusive", m) for n, m in zip(names, exclusive, strict=True)
    ]


@torch.no_grad()
def shared_features(
    model: nn.Module,
    mixer: BatchMixer,
    n_sources: int,
    states: torch.Tensor,
    batch: Batch,
    split: int,
) -> torch.Tensor:
    """The shared model's last hidden state averaged over each prompt: (B, H).

    The shared delta is folded into the weights; every exclusive source gets weight 0.
    """
    mixer.current = torch.zeros(n_sources, device=states.device)
    hidden = final_hidden(model, states, split, batch.lengths)
    return prompt_mean(hidden, batch)


def feature_table(
    model: nn.Module,
    mixer: BatchMixer,
    n_sources: int,
    encoded: Sequence[Encoded],
    cache: StateCache,
) -> torch.Tensor:
    """Prompt features of every example (batched by length)."""
    states = cache.get(encoded, desc="twin: states")
    pad = cache.base.tokenizer.pad_token_id
    out = torch.zeros(len(encoded), causal_lm(model).config.hidden_size)
    for idx in length_batches(encoded, 4096):
        batch = collate([encoded[i] for i in idx], pad)
        out[idx] = shared_features(
            model, mixer, n_sources, pad_states([states[i] for i in idx]), batch, cache.split
        ).cpu()
    return out


def train_router(
    features: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    *,
    epochs: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
) -> TwinRouter:
    """Full-batch Adam on cross-entropy; features standardised inside by BatchNorm."""
    torch.manual_seed(seed)
    router = TwinRouter(features.shape[1], k)
    opt = torch.optim.Adam(router.parameters(), lr=lr, weight_decay=1e-4)
    router.train()
    for _ in range(epochs):
        loss = F.cross_entropy(router(features), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return router.eval()


def router_weights(
    model: nn.Module,
    mixer: BatchMixer,
    router: TwinRouter,
    states: torch.Tensor,
    batch: Batch,
    split: int,
    top_k: int = 0,
) -> torch.Tensor | TopK:
    """Softmax of the router on the shared model's prompt features: (B, K), or its top-k."""
    n = router.net[-1].out_features
    f = shared_features(model, mixer, n, states, batch, split)
    with torch.no_grad():
        w = F.softmax(router(f.cpu()), -1)
    return top_k_of_weights(w, top_k) if 0 < top_k < n else w


def twin(
    ws: Workspace,
    *,
    shared: str = "task_arithmetic",
    scale: float = 0.3,
    rank: int | None = None,
    max_per_task: int = 1000,
    epochs: int = 300,
    top_k: int = 0,
    seed: int = 0,
) -> Fusion:
    """Twin-Merging: shared merge + routed SVD-compressed exclusive deltas (MLP router;
    ``rank``: of every exclusive delta, default each expert's own, the library's size;
    ``top_k`` > 0: only the k largest weights, renormalised, computed sparsely)."""
    started = time.perf_counter()
    key = ("twin", shared, scale, rank, max_per_task, epochs, seed)
    if key not in ws.memo:  # twin and twin_group share sources and router
        ws.memo[key] = _twin_parts(ws, *key[1:])
    shared_set, sources, feats, labels, router = ws.memo[key]
    mixer = BatchMixer()
    split = ws.cache.split

    def route(model, states, batch) -> None:
        w = router_weights(model, mixer, router, states, batch, split, top_k)
        mixer.current = w.to(states.device)

    with torch.no_grad():
        val_acc = float((router(feats).argmax(-1) == labels).float().mean())
    return Fusion(
        "twin",
        "routing",
        sources,
        mixer,
        route=route,
        shared=shared_set,
        info={
            "train_s": time.perf_counter() - started,
            "router_val_accuracy": val_acc,
            "shared": shared,
            "scale": scale,
            "rank": rank if rank is not None else "expert",
            "exclusive_mb": sum(s.num_bytes for s in sources) / 2**20,
            "top_k": top_k,
        },
    )


def twin_group(
    ws: Workspace,
    *,
    shared: str = "task_arithmetic",
    scale: float = 0.3,
    rank: int | None = None,
    max_per_task: int = 1000,
    epochs: int = 300,
    groups: int = 20,
    bins: bool = True,
    top_k: int = 0,
    seed: int = 0,
) -> Fusion:
    """Group-wise Twin-Merging: each served batch's router weights in ``groups`` groups
    (argmax bins, k-means), merged once per group with its mean weights, rows run on them."""
    fusion = twin(
        ws,
        shared=shared,
        scale=scale,
        rank=rank,
        max_per_task=max_per_task,
        epochs=epochs,
        top_k=top_k,
        seed=seed,
    )
    mixer, split, info = fusion.mixer, ws.cache.split, fusion.info
    info.update({"groups": groups, "bins": bins, "merges": 0})

    def run(model, states, batch) -> torch.Tensor:
        w = dense_weights(mixer.current).detach().cpu().numpy()  # set by twin's route
        labels, means = group_items(w, groups, bins=bins, seed=seed)
        info["merges"] += len(means)  # one merge per group of each served batch
        return grouped_logits(model, states, batch, split, labels, means)

    fusion.name, fusion.run = "twin_group", run
    return fusion


def _twin_parts(
    ws: Workspace,
    shared: str,
    scale: float,
    rank: int | None,
    max_per_task: int,
    epochs: int,
    seed: int,
) -> tuple:
    """Shared + exclusive factor sets, validation prompt features and labels, trained router."""
    ws.require_tasks("twin (its router learns which expert's task a prompt is)")
    experts = list(ws.private.values())
    params = {"scale": scale} if shared in ("task_arithmetic", "ties", "dare_ties") else {}
    shared_set, *sources = twin_sources(
        experts, shared_method=shared, shared_params=params, rank=rank
    )
    val_examples, val_encoded = ws.examples(VAL), ws.encoded(VAL)
    order = list(ws.private)
    missing = {ex.task for ex in val_examples} - set(ws.expert_of)
    if missing:
        raise LorafuseError(f"twin: no private expert for task(s) {', '.join(sorted(missing))}")
    keep = ws.per_task(VAL, max_per_task)
    labels = torch.tensor([order.index(ws.expert_of[val_examples[i].task]) for i in keep])
    mixer = BatchMixer()
    with mixture_of_loras(ws.base.model, sources, mixer, shared_set):
        feats = feature_table(
            ws.base.model, mixer, len(sources), [val_encoded[i] for i in keep], ws.cache
        )
    router = train_router(feats, labels, len(sources), epochs=epochs, seed=seed)
    return shared_set, sources, feats, labels, router
