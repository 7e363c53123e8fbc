"""The paper's Random Cluster ablation: ``elrea_random`` weights its random clusters'
experts (and the base adapter) uniformly; ``elrea_random_cosine`` routes the same experts by
ELREA's standardised cosine weights."""

from __future__ import annotations

import pytest
import torch
from test_elrea_build import CONFIG
from tiny_workspace import tiny_workspace

from lorafuse.elrea.cluster import elrea_weights
from lorafuse.elrea.pipeline import build_elrea, elrea_dir, input_features
from lorafuse.fusion.base import evaluate
from lorafuse.methods import METHODS, build_fusion

RANDOM = CONFIG.model_copy(update={"clustering": "random"})


@pytest.fixture
def built(tiny_base, tiny_experts, tmp_path):
    ws = tiny_workspace(tiny_base, tiny_experts, tmp_path, per_split=(10, 4, 4))
    out = elrea_dir(ws.library, "random")
    return ws, out, build_elrea(ws, out, RANDOM)


def routed_weights(ws, fusion, encoded) -> dict[tuple[int, ...], torch.Tensor]:
    """Each test prompt's weights over the adapters, as the ensemble used them."""
    seen: dict[tuple[int, ...], torch.Tensor] = {}
    route = fusion.route

    def spy(model, states, batch) -> None:
        route(model, states, batch)
        w = fusion.ensemble.weights
        for i in range(len(batch.lengths)):
            prompt_len = int(batch.positions[batch.rows == i].min()) + 1
            row = w[i] if w.dim() == 2 else w
            seen[tuple(batch.input_ids[i, :prompt_len].tolist())] = row.clone()

    fusion.route = spy
    evaluate(ws.base.model, fusion, encoded, ws.cache)
    return seen


def test_elrea_random_is_uniform_and_the_cosine_variant_is_routed(built) -> None:
    ws, out, info = built
    assert METHODS["elrea_random"].defaults == {"clustering": "random", "weights": "uniform"}
    n = len(info["experts"]) + 1  # cluster experts and the base adapter
    encoded = ws.encoded("test")

    uniform = routed_weights(ws, build_fusion(ws, "elrea_random"), encoded)
    assert len(uniform) == len({e.ids[: e.prompt_len] for e in encoded})
    for w in uniform.values():
        assert torch.equal(w, torch.full((n,), 1.0 / n))

    cosine = routed_weights(ws, build_fusion(ws, "elrea_random_cosine"), encoded)
    feats = input_features(ws, out, RANDOM, list(encoded))
    want = elrea_weights(feats, torch.tensor(info["centroids"]), RANDOM.temperature)
    for i, e in enumerate(encoded):
        torch.testing.assert_close(cosine[tuple(e.ids[: e.prompt_len])], want[i])
    spread = torch.stack(list(cosine.values()))
    assert (spread - 1.0 / n).abs().max() > 1e-3  # routed, not uniform
