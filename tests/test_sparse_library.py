"""A tiny K = 64 library runs every routing method of the fusion registry, each with top-k
routing where it has it, and the sparse dispatch scores exactly as the dense masked mixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafuse.core.encode import Encoded
from lorafuse.core.states import StateCache
from lorafuse.fusion.base import evaluate
from lorafuse.fusion.methods import FUSION_METHODS, build_fusion
from lorafuse.library import LoraAdapter, LoraFactors, save_adapter
from lorafuse.library.manifest import ExpertEntry, new_manifest, write_manifest
from lorafuse.tasks.example import Example, TaskSuite
from lorafuse.workspace import Workspace

K = 64
MODULES = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
# small budgets: this checks that every method runs at K = 64, not how well
PARAMS = {
    "arrow": {"top_k": 2},
    "hc_arrow": {"n_clusters": 8, "top_k": 2, "steps": 2},
    "learned_router": {"steps": 2, "top_k": 2},
    "twin": {"epochs": 5, "rank": 2, "top_k": 2},
}
# routing methods that choose per input without the top-k mixture (a task's own delta, a
# retrieved mixture of three, merged groups): they must run at K = 64
OTHERS = {
    "lora_retriever": {"per_task": 2},
    "emr": {"rank": 4},
    "emr_retriever": {"rank": 4, "per_task": 2},
    "mc_smoe": {"n_groups": 8, "rank": 2},
    "twin_group": {"epochs": 5, "rank": 2, "top_k": 2, "groups": 8},  # dense merge per group
    "arrow_top1": {},
}


@pytest.fixture
def workspace(tiny_base, tmp_path) -> Workspace:
    gen = torch.Generator().manual_seed(0)
    model = tiny_base.model
    entries, adapters = [], {}
    for k in range(K):
        factors = {}
        for name in MODULES:
            lin = model.get_submodule(name)
            factors[name] = LoraFactors(
                A=torch.randn(2, lin.in_features, generator=gen) * 0.5,
                B=torch.randn(lin.out_features, 2, generator=gen) * 0.5,
                scaling=1.0,
            )
        save_adapter(tmp_path / f"t{k}", factors, base_model=None)
        adapters[f"t{k}"] = LoraAdapter.open(tmp_path / f"t{k}")
        entries.append(ExpertEntry(name=f"t{k}", path=f"t{k}", tasks=[f"task{k}"]))
    manifest = new_manifest("tiny", entries)
    write_manifest(tmp_path, manifest)
    splits, encoded = {}, {}
    for split, n in (("val", 2), ("test", 1)):
        rows = [(k, torch.randint(3, 128, (6,), generator=gen)) for k in range(K) for _ in range(n)]
        splits[split] = [Example(f"task{k}", "p", "a") for k, _ in rows]
        encoded[split] = [Encoded(tuple(ids.tolist()), 4) for _, ids in rows]
    cache = StateCache(tiny_base, 0, persist=False, progress=False)
    ws = Workspace(tiny_base, TaskSuite(splits), tmp_path, manifest, adapters, cache)
    ws._encoded.update(encoded)  # no tokenizer: the tiny model's ids directly
    return ws


def test_every_routing_method_runs_sparse_at_k64(workspace, monkeypatch) -> None:
    from lorafuse.core import mixture

    calls = []
    kernel = mixture.sparse_mixture
    monkeypatch.setattr(mixture, "sparse_mixture", lambda *a: calls.append(a[-1].k) or kernel(*a))
    routing = [n for n, m in FUSION_METHODS.items() if m.family == "routing"]
    assert set(routing) == set(PARAMS) | set(OTHERS)  # a new routing method gets a line here
    test = workspace.encoded("test")
    for name, params in OTHERS.items():
        fusion = build_fusion(workspace, name, **params)
        assert np.isfinite(evaluate(workspace.base.model, fusion, test, workspace.cache).loss).all()
    for name in PARAMS:
        fusion = build_fusion(workspace, name, **PARAMS[name])
        assert 2 < len(fusion.sources) <= K  # hc_arrow: up to 8 merged clusters
        calls.clear()
        sparse = evaluate(workspace.base.model, fusion, test, workspace.cache)
        assert calls and set(calls) == {2}, name  # top-2 of K, on the sparse path
        fusion.sparse = False
        dense = evaluate(workspace.base.model, fusion, test, workspace.cache)
        assert np.isfinite(sparse.loss).all(), name
        np.testing.assert_allclose(sparse.loss, dense.loss, rtol=1e-5, atol=1e-6, err_msg=name)
        assert (sparse.correct == dense.correct).all(), name
