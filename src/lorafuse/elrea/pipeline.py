"""ELREA end to end: gradient features -> clusters -> cluster experts -> routed ensemble.

1. The base adapter (the library's multi-task adapter) is the starting point.
2. Every training example's gradient feature (``features.gradient_features``: prompt-token
   gradient w.r.t. the LoRA weights, Adam-normalised, projected, unit norm), cached on disk.
   Adam normalisation uses both moments when the base adapter has a saved optimizer state
   (``optimizer_state.safetensors``, see ``adam_state``), else the second moment estimated
   over the training examples; ``elrea.json`` records which (``adam_normalisation``).
3. BIRCH clusters, rebalanced (``cluster.cluster_features``).
4. One expert per cluster, initialised from the base adapter, trained on the cluster at a
   lower learning rate (steps proportional to the cluster's size). Resumable: finished
   experts are kept, an interrupted one resumes from its checkpoint.
5. At inference the input's feature gives the weights (``cluster.elrea_weights``) of the
   cluster experts and the base adapter, computed once per prompt; next-token logits are
   combined as a weighted sum, all adapters in one batched pass.

Baselines from the paper share the code: ``clustering="random"`` (random clusters with the
same sizes as the gradient clusters) and ``"embedding"`` (clusters of the base model's mean
hidden state over the prompt, at the first adapted layer, instead of gradients); and
uniform weights at inference (``weights="uniform"``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from lorafuse.core.encode import Encoded
from lorafuse.core.mixture import BatchMixer
from lorafuse.elrea.adam_state import OPTIMIZER_FILE, load_adam_state
from lorafuse.elrea.cluster import Clustering, centroids, cluster_features, elrea_weights
from lorafuse.elrea.features import estimate_second_moment, gradient_features
from lorafuse.errors import LorafuseError
from lorafuse.fingerprint import (
    FINGERPRINT_NAME,
    Stamp,
    examples_digest,
    files_digest,
    mismatch,
    read_stamp,
    say,
    write_stamp,
)
from lorafuse.fusion.base import Ensemble, Fusion
from lorafuse.io import atomic_path, atomic_write_json, read_json
from lorafuse.library import LoraAdapter
from lorafuse.models import cache_root
from lorafuse.training.config import TrainConfig
from lorafuse.training.train import top_layers_at, train_adapter
from lorafuse.workspace import DEFAULT_LIBRARY, Workspace

Clusterer = Literal["gradient", "random", "embedding"]


class ElreaConfig(BaseModel):
    """Settings of one ELREA build (defaults sized for a CPU)."""

    model_config = ConfigDict(extra="forbid")

    base_adapter: str = "multitask"
    train_per_task: int | None = Field(100, ge=1)  # examples featurised per task (None: all)
    clustering: Clusterer = "gradient"
    n_clusters: int = Field(5, ge=1)
    dim: int = Field(1024, ge=1, le=8192)
    sample: int = Field(10_000, ge=1)
    max_ratio: float = Field(5.0, gt=1)
    rounds: int = Field(3, ge=0)
    threshold: float = Field(0.3, gt=0)
    min_cluster: int = Field(20, ge=1)  # smaller clusters join their nearest neighbour
    total_steps: int = Field(150, ge=1)  # over all clusters, split by cluster size
    lr: float = Field(1e-3, gt=0)  # lower than the base adapter's 3e-3
    batch_size: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    seed: int = 0


def elrea_dir(library: str | Path, clustering: str) -> Path:
    """Where the ELREA build of one clustering is read from: inside the library, except for
    the shipped library, whose own build is used until ``lorafuse elrea`` has made one in
    the cache (:func:`elrea_build_dir`)."""
    built = elrea_build_dir(library, clustering)
    if (built / "elrea.json").is_file():
        return built
    return Path(library) / "elrea" / clustering


def elrea_build_dir(library: str | Path, clustering: str) -> Path:
    """Where ``lorafuse elrea`` writes: inside the library, but never into the installed
    package: builds for the shipped library go to ``cache_root()/elrea/default-HASH``."""
    library = Path(library)
    if library.resolve() != DEFAULT_LIBRARY.resolve():
        return library / "elrea" / clustering
    shipped = files_digest([DEFAULT_LIBRARY / "library.json"])[:8]
    return cache_root() / "elrea" / f"default-{shipped}" / clustering


def elrea_stamp(ws: Workspace, config: ElreaConfig, train: list[Encoded]) -> Stamp:
    """The run an ELREA build belongs to: settings (not the inference temperature),
    featurised examples, base model, split and base adapter."""
    adapter = ws.adapters[config.base_adapter]
    files = [adapter.path / "adapter_config.json", adapter.weights_path]
    if (adapter.path / OPTIMIZER_FILE).is_file():  # its moments change every feature
        files.append(adapter.path / OPTIMIZER_FILE)
    return Stamp.of(
        config.model_dump(exclude={"temperature"}),
        examples_digest(train),
        {"base": ws.base.fingerprint, "split": ws.cache.split, "adapter": files_digest(files)},
    )


_BUILT = ("elrea.json", "second_moment.safetensors", "experts")


def claim_build(out: Path, stamp: Stamp) -> None:
    """Make ``out`` belong to this run: a build of another run (or one without a
    fingerprint) is removed first, saying so, so its experts never pair with new clusters."""
    have = read_stamp(out / FINGERPRINT_NAME)
    stale = [name for name in _BUILT if (out / name).exists()]
    parts = stamp.differs(have)
    if parts and stale:
        say(f"{out}: ELREA build of a different run ({mismatch(parts)}); rebuilding from scratch")
        for name in _BUILT:  # elrea.json first: no reader sees a half-removed build
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    if parts:
        write_stamp(out / FINGERPRINT_NAME, stamp)


def _prompt_embeddings(ws: Workspace, encoded: list[Encoded]) -> torch.Tensor:
    """Unit-norm mean hidden state over each prompt at the first adapted layer (cached)."""
    states = ws.cache.get(encoded, desc="embeddings: states")
    emb = torch.stack([s[: e.prompt_len].mean(0) for s, e in zip(states, encoded, strict=True)])
    return torch.nn.functional.normalize(emb.float(), dim=1)


def input_features(
    ws: Workspace, out: Path, config: ElreaConfig, encoded: list[Encoded], ray: str | None = None
) -> torch.Tensor:
    """Features of any examples, in the space the build clustered (gradients or embeddings);
    ``ray``: a Ray cluster address (or ``auto``) to shard the gradient features over."""
    if config.clustering == "embedding":
        return _prompt_embeddings(ws, encoded)
    base_path = ws.adapters[config.base_adapter].path
    # both moments from the base adapter's optimizer state, else the estimated second moment
    v = load_adam_state(base_path) or load_file(str(out / "second_moment.safetensors"))
    featurize = gradient_features
    if ray is not None:
        from functools import partial

        from lorafuse.elrea.distributed import gradient_features_ray

        featurize = partial(gradient_features_ray, address=ray)
    return featurize(
        ws.base,
        base_path,
        encoded,
        ws.cache,
        dim=config.dim,
        seed=config.seed,
        adam_state=v,
        progress=False,
    )


def build_elrea(
    ws: Workspace, out: str | Path, config: ElreaConfig, *, ray: str | None = None
) -> dict:
    """Run (or resume) the pipeline into ``out``; returns the written ``elrea.json``.
    ``ray``: shard the gradient features over a Ray cluster (see :func:`input_features`)."""
    out = Path(out)
    if config.base_adapter not in ws.adapters:
        raise LorafuseError(f"no adapter {config.base_adapter!r} in {ws.library} for ELREA's base")
    started = time.perf_counter()
    train = [ws.encoded("train")[i] for i in ws.per_task("train", config.train_per_task)]
    base_path = ws.adapters[config.base_adapter].path
    out.mkdir(parents=True, exist_ok=True)
    claim_build(out, elrea_stamp(ws, config, train))
    v_file = out / "second_moment.safetensors"
    moments = load_adam_state(base_path)
    if moments is None and not v_file.is_file():
        v = estimate_second_moment(ws.base, base_path, train, ws.cache)
        with atomic_path(v_file) as tmp:
            save_file({k: t.contiguous() for k, t in v.items()}, str(tmp))
    t0 = time.perf_counter()
    feats = input_features(ws, out, config, train, ray=ray)
    features_s = time.perf_counter() - t0
    clustering = _cluster(ws, out, config, feats)
    experts = []
    train_s = 0.0
    for c, size in enumerate(clustering.sizes):
        members = [train[i] for i in np.flatnonzero(clustering.labels == c)]
        steps = max(10, round(config.total_steps * size / len(train)))
        path = out / "experts" / f"cluster{c}"
        if not (path / "adapter_model.safetensors").is_file():
            tc = TrainConfig(
                steps=steps,
                lr=config.lr,
                batch_size=config.batch_size,
                seed=config.seed + c,
                warmup=0,
                top_layers=top_layers_at(ws.base.model, ws.cache.split),
            )
            result = train_adapter(
                ws.base,
                members,
                ws.cache,
                tc,
                path,
                desc=f"elrea cluster {c}",
                init_adapter=base_path,
            )
            train_s += result.train_time_s
        experts.append({"path": f"experts/cluster{c}", "size": size, "steps": steps})
    info = {
        "config": config.model_dump(),
        "experts": experts,
        "centroids": clustering.centroids.tolist(),
        "notes": clustering.notes,
        "adam_normalisation": (
            "second_moment (estimated over the training examples; no optimizer state)"
            if moments is None
            else f"adam_update (both moments of the base adapter's optimizer state, step "
            f"{moments.step}, betas {list(moments.betas)})"
        ),
        "features_s": round(features_s, 1),
        "train_s": round(train_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(out / "elrea.json", info)
    return info


def _cluster(ws: Workspace, out: Path, config: ElreaConfig, feats: torch.Tensor) -> Clustering:
    x = feats.numpy()
    kwargs = dict(
        n_clusters=config.n_clusters,
        sample=config.sample,
        max_ratio=config.max_ratio,
        rounds=config.rounds,
        threshold=config.threshold,
        min_size=config.min_cluster,
        seed=config.seed,
    )
    if config.clustering != "random":
        return cluster_features(x, **kwargs)
    # random clusters of the same sizes as the gradient clusters (paper's baseline)
    ref = cluster_features(x, **kwargs)
    labels = np.random.default_rng(config.seed).permutation(ref.labels)
    return Clustering(labels, centroids(x, labels), ref.notes)


def elrea_fusion(
    ws: Workspace,
    out: str | Path,
    *,
    weights: str = "elrea",
    temperature: float | None = None,
) -> Fusion:
    """The routed ensemble of a built ELREA (``weights="uniform"``: the paper's baseline)."""
    out = Path(out)
    info = read_json(out / "elrea.json")
    config = ElreaConfig(**info["config"])
    temp = temperature or config.temperature
    experts = [LoraAdapter.open(out / e["path"]) for e in info["experts"]]
    sources = [*experts, ws.adapters[config.base_adapter]]
    cents = torch.tensor(info["centroids"], dtype=torch.float32)
    table: dict[tuple[int, ...], torch.Tensor] = {}
    n = len(sources)
    fusion = Fusion(
        f"elrea:{config.clustering}:{weights}",
        "ensembling",
        sources,
        BatchMixer(),
        ensemble=Ensemble(torch.full((n,), 1.0 / n), "logit"),
        info={"clusters": [e["size"] for e in info["experts"]], "train_s": info["train_s"]},
    )

    def prepare(encoded) -> None:
        if weights == "uniform":
            return
        feats = input_features(ws, out, config, list(encoded))
        w = elrea_weights(feats, cents, temp)
        table.update({e.ids[: e.prompt_len]: w[i] for i, e in enumerate(encoded)})

    def route(model, states, batch) -> None:
        if weights == "uniform":
            fusion.ensemble.weights = torch.full((n,), 1.0 / n)
            return
        rows = []
        for i in range(len(batch.lengths)):
            first_target = int(batch.positions[batch.rows == i].min()) + 1
            rows.append(table[tuple(batch.input_ids[i, :first_target].tolist())])
        fusion.ensemble.weights = torch.stack(rows)

    fusion.prepare = prepare
    fusion.route = route
    return fusion
