"""``build_elrea`` end to end on the tiny model: files, cluster sizes, trained cluster experts,
resuming without retraining, the uniform-weight row against PEFT's logits, and routing that
can fail: a test prompt's weights favour its task's cluster more than uniform weights do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from tiny_workspace import NAMES, TASKS, tiny_workspace

import lorafuse.elrea.pipeline as pipeline
from lorafuse.core.encode import collate
from lorafuse.core.forward import target_logits
from lorafuse.core.states import pad_states
from lorafuse.elrea.pipeline import ElreaConfig, build_elrea, elrea_dir, input_features
from lorafuse.fusion.base import evaluate
from lorafuse.methods import build_fusion

CONFIG = ElreaConfig(
    base_adapter=NAMES[0],
    train_per_task=None,
    n_clusters=3,
    dim=64,
    min_cluster=3,
    total_steps=30,
    batch_size=8,
    lr=1e-2,
)


@pytest.fixture
def built(tiny_base, tiny_experts, tmp_path):
    ws = tiny_workspace(tiny_base, tiny_experts, tmp_path, per_split=(10, 4, 4))
    out = elrea_dir(ws.library, "gradient")
    return ws, out, build_elrea(ws, out, CONFIG)


def uniform_logit_losses(ws, sources, encoded) -> np.ndarray:
    """Per-example NLL of softmax(mean of each adapter's logits), adapters loaded by PEFT."""
    batch = collate(encoded, 0)
    states = pad_states(ws.cache.get(encoded))
    logits = []
    for path in sources:
        model = PeftModel.from_pretrained(ws.base.model, str(path))
        try:
            with torch.no_grad():
                logits.append(target_logits(model, states, batch, ws.cache.split))
        finally:
            model.unload()
    logp = F.log_softmax(torch.stack(logits).mean(0), -1)
    nll = -logp.gather(1, batch.targets[:, None]).squeeze(1)
    return np.array([nll[batch.rows == i].mean().item() for i in range(len(encoded))])


def test_build_elrea_end_to_end(built, monkeypatch) -> None:
    ws, out, info = built
    sizes = [e["size"] for e in info["experts"]]
    assert sum(sizes) == 3 * 10 and len(sizes) == len(info["centroids"]) >= 2
    assert (out / "elrea.json").is_file() and (out / "second_moment.safetensors").is_file()
    base = load_file(str(ws.adapters[NAMES[0]].weights_path))
    for e in info["experts"]:
        weights = load_file(str(out / e["path"] / "adapter_model.safetensors"))
        assert weights.keys() == base.keys()  # initialised from the base adapter
        assert any(not torch.equal(weights[k], base[k]) for k in base)  # then trained
    # rerun: everything is there, nothing is trained again
    monkeypatch.setattr(pipeline, "train_adapter", lambda *a, **k: pytest.fail("retrained"))
    again = build_elrea(ws, out, CONFIG)
    assert again["experts"] == info["experts"] and again["centroids"] == info["centroids"]

    encoded = ws.encoded("test")
    uniform = build_fusion(ws, "elrea_uniform")
    got = evaluate(ws.base.model, uniform, encoded, ws.cache).loss
    paths = [out / e["path"] for e in info["experts"]] + [ws.adapters[NAMES[0]].path]
    want = uniform_logit_losses(ws, paths, encoded)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_elrea_weights_favour_the_task_cluster(built) -> None:
    ws, out, info = built
    n_clusters = len(info["centroids"])
    centroids = torch.tensor(info["centroids"])
    # each task's cluster: where most of its training examples' features are closest
    train = ws.encoded("train")
    nearest = (input_features(ws, out, CONFIG, train) @ centroids.T).argmax(1).numpy()
    train_tasks = np.array([ex.task for ex in ws.examples("train")])
    right = {
        t: np.bincount(nearest[train_tasks == t], minlength=n_clusters).argmax() for t in TASKS
    }

    fusion = build_fusion(ws, "elrea")
    encoded = ws.encoded("test")
    examples = ws.examples("test")
    task_of = {tuple(e.ids[: e.prompt_len]): x.task for e, x in zip(encoded, examples, strict=True)}
    seen: list[tuple[str, torch.Tensor]] = []
    route = fusion.route

    def spy(model, states, batch) -> None:
        route(model, states, batch)
        for i in range(len(batch.lengths)):
            prompt_len = int(batch.positions[batch.rows == i].min()) + 1
            task = task_of[tuple(batch.input_ids[i, :prompt_len].tolist())]
            seen.append((task, fusion.ensemble.weights[i].clone()))

    fusion.route = spy
    evaluate(ws.base.model, fusion, encoded, ws.cache)
    assert len(seen) == len(encoded) and seen[0][1].shape == (n_clusters + 1,)
    uniform = 1.0 / (n_clusters + 1)
    for task in TASKS:
        on_right = np.mean([w[right[task]].item() for t, w in seen if t == task])
        assert on_right > uniform + 0.05, (task, on_right, uniform)
