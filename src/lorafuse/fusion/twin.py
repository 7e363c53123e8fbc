"""Twin-Merging (Lu et al. 2024): a shared delta for everyone plus routed exclusive deltas.

* shared ``ΔW_s``: a static merge of the experts (task arithmetic or TIES);
* exclusive ``ΔW_t^excl = ΔW_t - ΔW_s``, per expert, compressed to rank ``r`` by SVD in factor
  space (exact when ``r`` covers the rank of the difference);
* router: a 3-layer MLP (BatchNorm, LeakyReLU) on the shared model's mean last hidden state
  over the prompt, trained with cross-entropy on the task labels of validation items;
* output ``W + ΔW_s + Σ_t softmax(router)_t ΔW_t^excl``, the weights computed once per prompt.

The reference code merges full weights for every input at batch size 1; here the shared delta
is folded into the weights once, the exclusive deltas are sources of the mixture core, and a
mixed batch is one forward.
The group-wise variant bins items by the argmax of their router weights, splits each bin by
k-means and gives every group the mean weight vector of its validation items.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

from lorafuse.core.encode import Batch, Encoded, collate
from lorafuse.core.forward import causal_lm, final_hidden
from lorafuse.core.mixture import BatchMixer, FactorSet, FactorSource
from lorafuse.core.states import StateCache, pad_states
from lorafuse.eval.harness import length_batches
from lorafuse.fusion.base import prompt_mean
from lorafuse.library import module_factors
from lorafuse.merging import merge
from lorafuse.merging.linear import concat_factors
from lorafuse.merging.svd import compress_factors


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


def twin_sources(
    experts: Sequence[FactorSource],
    *,
    shared_method: str = "task_arithmetic",
    shared_params: dict | None = None,
    rank: int = 32,
) -> list[FactorSet]:
    """[shared, exclusive_1..K] as in-memory factor sets (one module at a time)."""
    shared = merge(experts, shared_method, progress=False, **(shared_params or {}))
    exclusive: list[dict] = [{} for _ in experts]
    for module, s in shared.items():
        own = module_factors(experts, module)  # zeros where an expert has no delta
        for k, e in enumerate(own):
            diff = concat_factors([e, s], [1.0, -1.0])
            exclusive[k][module] = compress_factors(diff, rank) if rank < diff.rank else diff
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


class GroupWeights:
    """Group-wise Twin-Merging: one mean weight vector per (argmax bin, k-means group)."""

    def __init__(self, weights: np.ndarray, groups_per_bin: int = 2, seed: int = 0) -> None:
        self.models: dict[int, tuple[KMeans | None, np.ndarray]] = {}
        bins = weights.argmax(1)
        for b in np.unique(bins):
            w = weights[bins == b]
            n = min(groups_per_bin, len(w))
            if n < 2:
                self.models[int(b)] = (None, w.mean(0, keepdims=True))
                continue
            km = KMeans(n_clusters=n, n_init=4, random_state=seed).fit(w)
            means = np.stack([w[km.labels_ == g].mean(0) for g in range(n)])
            self.models[int(b)] = (km, means)
        self.k = weights.shape[1]

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        out = np.zeros_like(weights)
        for i, w in enumerate(weights):
            b = int(w.argmax())
            if b not in self.models:  # a bin never seen on validation: keep the item's own
                out[i] = w
                continue
            km, means = self.models[b]
            out[i] = means[0] if km is None else means[int(km.predict(w[None])[0])]
        return out
