"""Twin-Merging as the paper does it: group-wise merging of the served inputs (k-means on the
router weights, one merged model per group) against per-item Twin and a dense mean-weight merge;
exclusive deltas no larger than the library, and exact at a rank that covers them."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_workspace import tiny_workspace

from lorafuse.core.encode import Encoded, collate
from lorafuse.core.forward import lower_states, target_logits
from lorafuse.core.mixture import BatchMixer
from lorafuse.core.states import pad_states
from lorafuse.fusion.base import Fusion, installed
from lorafuse.fusion.group_merge import group_items
from lorafuse.fusion.twin import twin_sources
from lorafuse.library import open_library
from lorafuse.methods import build_fusion

LIBRARY = Path(__file__).resolve().parents[1] / "src" / "lorafuse" / "data" / "default_library"


@pytest.fixture
def ws(tiny_base, tiny_experts, tmp_path):
    return tiny_workspace(tiny_base, tiny_experts, tmp_path)


def one_batch(ws):
    """Every test item of the workspace as one served batch, with its states."""
    encoded = ws.encoded("test")
    batch = collate(encoded, ws.base.tokenizer.pad_token_id)
    return batch, pad_states(ws.cache.get(encoded))


def log_probs_of(ws, fusion: Fusion, batch, states) -> torch.Tensor:
    with installed(ws.base.model, fusion, ws.cache.split) as lp, torch.no_grad():
        return lp(states, batch)


def two_clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax weights over 4 experts in two tight clusters with the same argmax (so only
    the k-means step can tell them apart), interleaved."""
    rng = np.random.default_rng(seed)
    centres = np.array([[3.0, 2.0, 0.0, 0.0], [3.0, 0.0, 2.0, 0.5]])
    truth = np.arange(2 * n) % 2
    logits = centres[truth] + 0.05 * rng.standard_normal((2 * n, 4))
    w = np.exp(logits)
    return w / w.sum(1, keepdims=True), truth


@pytest.mark.parametrize("bins", [True, False])
def test_two_groups_recover_two_router_clusters(bins: bool) -> None:
    w, truth = two_clusters(15, seed=0)
    labels, means = group_items(w, 2, bins=bins, seed=0)
    assert len(means) == 2
    assert (labels == truth).all() or (labels == 1 - truth).all()
    for g in range(2):  # each group's weights are its members' mean
        np.testing.assert_allclose(means[g], w[labels == g].mean(0))
    # one group: everyone's mean; as many groups as rows: each row alone, its own weights
    labels, means = group_items(w, 1, bins=bins)
    assert (labels == 0).all()
    np.testing.assert_allclose(means[0], w.mean(0))
    labels, means = group_items(w, len(w), bins=bins)
    np.testing.assert_allclose(means[labels], w)


def test_groups_respect_argmax_bins_and_their_sizes() -> None:
    w, truth = two_clusters(10, seed=1)  # 20 rows whose argmax is expert 0
    other = np.array([[0.1, 0.7, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]])  # 2 rows, argmax 1
    labels, means = group_items(np.vstack([w, other]), 3, seed=0)
    # one group per bin, the third to the larger bin, where k-means finds the two clusters
    assert (means.argmax(1) == np.array([0, 0, 1])).all()
    assert labels[20] == labels[21] == 2
    assert (labels[:20] == truth).all() or (labels[:20] == 1 - truth).all()
    # fewer groups than bins: the bins are not kept, k-means over all rows
    labels, _ = group_items(np.vstack([w, other]), 1)
    assert (labels == 0).all()


def test_twin_group_as_many_groups_as_inputs_is_per_item_twin(ws) -> None:
    batch, states = one_batch(ws)
    per_item = log_probs_of(ws, build_fusion(ws, "twin", epochs=30), batch, states)
    group = build_fusion(ws, "twin_group", epochs=30, groups=len(batch.lengths))
    got = log_probs_of(ws, group, batch, states)
    torch.testing.assert_close(got, per_item, atol=2e-5, rtol=0)
    assert group.info["merges"] > 1  # merged weights per group, not the mixture core
    few = log_probs_of(ws, build_fusion(ws, "twin_group", epochs=30, groups=2), batch, states)
    assert (few - per_item).abs().max() > 1e-4  # grouping changes the weights


def test_twin_group_one_group_is_the_mean_weight_merge(ws, tiny_experts) -> None:
    batch, states = one_batch(ws)
    twin = build_fusion(ws, "twin", epochs=30)
    log_probs_of(ws, twin, batch, states)  # its route sets the per-item router weights
    mean = twin.mixer.current.mean(0)
    # dense reference: W + ΔW_shared + Σ_t mean_t ΔW_t^excl folded into a copy of the model
    model = copy.deepcopy(ws.base.model)
    with torch.no_grad():
        for m in tiny_experts[0].module_names:
            delta = twin.shared.factors(m).delta()
            delta += sum(w * s.factors(m).delta() for w, s in zip(mean, twin.sources, strict=True))
            model.get_submodule(m).weight += delta
        want = F.log_softmax(target_logits(model, states, batch, ws.cache.split), -1)
    one = build_fusion(ws, "twin_group", epochs=30, groups=1)
    got = log_probs_of(ws, one, batch, states)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert one.info["merges"] == 1


def test_exclusive_deltas_no_larger_than_the_shipped_library() -> None:
    _, adapters = open_library(LIBRARY, kinds={"private"})
    experts = list(adapters.values())
    _, *exclusive = twin_sources(experts, shared_params={"scale": 0.3})
    library_bytes = sum(a.num_bytes for a in experts)
    assert sum(x.num_bytes for x in exclusive) <= library_bytes
    e, x = experts[0], exclusive[0]
    assert all(x.factors(m).rank == e.factors(m).rank for m in e.module_names)
    _, *wide = twin_sources(experts, shared_params={"scale": 0.3}, rank=32)  # raised
    assert sum(x.num_bytes for x in wide) > library_bytes


def test_twin_at_a_rank_covering_the_differences_is_the_full_rank_version(
    tiny_llama, tiny_experts
) -> None:
    """ΔW_t - ΔW_s lies in the span of the experts' deltas: rank 2 + 4 + 3 = 9 is exact, though
    the factor-space difference has rank up to 4 + 9 = 13 (so rank 9 does compress)."""
    batch = collate([Encoded((3, 17, 9, 88, 41, 5), 3), Encoded((7, 7, 2, 99, 31, 11), 3)], 0)
    with torch.no_grad():
        states = lower_states(tiny_llama, batch.input_ids, 0)
    weights = torch.tensor([[0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])

    def run(rank: int | None) -> torch.Tensor:
        shared, *exclusive = twin_sources(tiny_experts, rank=rank)
        mixer = BatchMixer()
        mixer.current = weights
        fusion = Fusion("t", "routing", exclusive, mixer, shared=shared)
        with installed(tiny_llama, fusion, 0) as lp, torch.no_grad():
            return lp(states, batch)

    full = run(10**6)  # no compression at all
    torch.testing.assert_close(run(9), full, atol=1e-5, rtol=0)
    assert (run(None) - full).abs().max() > 1e-4  # the default (each expert's rank) is lossy
