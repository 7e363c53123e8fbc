"""Load a router bundle (``lorafuse export --method ...``) and route prompts to its adapters.

    from lorafuse.serving import load_router

    router = load_router("bundle/")            # loads the bundle's base model itself
    for r in router.route(["Reverse the word: cat", "What is 2 + 3?"]):
        print(r.adapters[0], r.weights)        # the adapter to send the request to first

The router computes its features from the base model through the same code as lorafuse's
in-process method (the state cache, the split forward, the mixture layers), so its decisions
are the in-process method's: Twin's MLP on the shared model's prompt features, request-level
Arrow's prototype alignment, the learned per-layer router under the mixture of the bundle's
adapters, ELREA's gradient features against the cluster centroids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lorafuse.core.encode import Encoded, collate, encode_prompt, end_of_turn_id
from lorafuse.core.forward import final_hidden
from lorafuse.core.mixture import BatchMixer, layer_index, mixture_of_loras
from lorafuse.core.sparse import TopK, top_k_of_weights
from lorafuse.core.states import StateCache, pad_states
from lorafuse.errors import LorafuseError
from lorafuse.eval.harness import length_batches
from lorafuse.fusion.base import prompt_mask
from lorafuse.fusion.request_routing import prompt_arrow_scores
from lorafuse.fusion.routers import LayerRouter
from lorafuse.fusion.twin import TwinRouter, feature_table
from lorafuse.library import LoraAdapter, module_factors, union_modules
from lorafuse.merging.linear import concat_factors
from lorafuse.merging.truncation import Truncation
from lorafuse.models import BaseModel, load_base_model
from lorafuse.serving.bundle import FORMAT, ROUTER_JSON, ROUTER_WEIGHTS
from lorafuse.serving.export import _write_vllm, uniform_factors, vllm_rank

MAX_TOKENS = 4096  # tokens per routing batch


@dataclass
class Route:
    """One prompt's decision: the adapters to use, best first, with their weights.

    Top-1 routers (``twin``, ``arrow_top1``): one name, weight 1. ``learned_router``: every
    adapter with its weight averaged over layers (``layers``: per layer). ``elrea``: every
    adapter with ELREA's weight (clusters' softmax, the base adapter's ``1 - max cos``).
    ``scores``: the router's raw output over all the bundle's adapters."""

    adapters: list[str]
    weights: list[float]
    scores: dict[str, float]
    layers: dict[int, list[float]] | None = field(default=None)


class BundleRouter:
    """A loaded bundle: its description, router weights and base model (see module doc)."""

    def __init__(self, path: Path, spec: dict[str, Any], tensors: dict, base: BaseModel):
        self.path = path
        self.spec = spec
        self.kind: str = spec["kind"]
        self.names: list[str] = spec["adapters"]
        self.tensors = tensors
        self.base = base
        self.cache = StateCache(base, int(spec["split"]), persist=False, progress=False)

    def encode(self, prompts: Sequence[str]) -> list[Encoded]:
        """Prompts as lorafuse encodes them (chat template), one end-of-turn token after."""
        tok = self.base.tokenizer
        eot = end_of_turn_id(tok)
        return [Encoded((*(ids := encode_prompt(tok, p)), eot), len(ids)) for p in prompts]

    def route(self, prompts: Sequence[str]) -> list[Route]:
        """Per prompt, the adapter names (best first) and their weights."""
        return self.route_encoded(self.encode(prompts))

    def route_encoded(self, encoded: Sequence[Encoded]) -> list[Route]:
        scores, layers = self.scores(encoded)
        out = []
        for i, row in enumerate(scores.tolist()):
            named = dict(zip(self.names, row, strict=True))
            per_layer = {k: v[i].tolist() for k, v in layers.items()} if layers else None
            if self.spec["serve"] == "top1":
                best = max(range(len(row)), key=row.__getitem__)
                out.append(Route([self.names[best]], [1.0], named, per_layer))
            else:
                order = sorted(range(len(row)), key=lambda k: -row[k])
                out.append(
                    Route([self.names[k] for k in order], [row[k] for k in order], named, per_layer)
                )
        return out

    @torch.no_grad()
    def scores(self, encoded: Sequence[Encoded]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(N, K) the router's output over the adapters (and, for ``learned_router``, per
        layer (N, K) weights; their mean over layers is the output)."""
        encoded = list(encoded)
        if self.kind == "twin":
            return self._twin(encoded), {}
        if self.kind == "arrow_top1":
            return self._arrow(encoded), {}
        if self.kind == "learned_router":
            layers = self._learned(encoded)
            return torch.stack(list(layers.values())).mean(0), layers
        if self.kind == "elrea":
            return self._elrea(encoded), {}
        raise LorafuseError(f"unknown router kind {self.kind!r}", self.path / ROUTER_JSON)

    def mixture_adapter(self, route: Route, out: str | Path) -> dict[str, Truncation]:
        """Write one vLLM adapter whose delta is this request's mix of the bundle's adapters,
        exactly what lorafuse computes for it: Twin's softmax over its choices (``shared +
        Σ a_t exclusive_t``, as the weights sum to 1), the learned router's per-layer
        weights, Arrow's one-hot. Load it at run time (vLLM: ``/v1/load_lora_adapter``).
        Returns the re-compression per module (empty when exact). ELREA mixes logits, which
        no single adapter computes: refused."""
        if self.kind == "elrea":
            raise LorafuseError("elrea combines its adapters' logits: no single adapter is it")
        experts = [LoraAdapter.open(self.path / "adapters" / n) for n in self.names]
        if route.layers is not None:
            per_layer = route.layers
        else:
            mix = [route.scores[n] if self.kind == "twin" else 0.0 for n in self.names]
            if self.kind != "twin":
                mix[self.names.index(route.adapters[0])] = 1.0
            per_layer = None
        factors = {}
        for m in union_modules(experts):
            w = per_layer[layer_index(m)] if per_layer is not None else mix
            factors[m] = concat_factors(module_factors(experts, m), w)
        rank = vllm_rank([f.rank for f in factors.values()], None)
        served, lost = {}, {}
        for m, f in factors.items():
            served[m], info = uniform_factors(f, rank, pad=True)
            if info is not None:
                lost[m] = info
        _write_vllm(Path(out), served, rank, self.spec["base_model"])
        return lost

    def _prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def _batches(self, encoded: list[Encoded]):
        pad = self.base.tokenizer.pad_token_id
        for idx in length_batches(encoded, MAX_TOKENS):
            part = [encoded[i] for i in idx]
            yield idx, collate(part, pad), pad_states(self.cache.get(part, desc="route: states"))

    def _twin(self, encoded: list[Encoded]) -> torch.Tensor:
        spec = self.spec
        router = TwinRouter(spec["hidden"], len(self.names), spec["width"])
        router.load_state_dict(self._prefixed("twin."))
        shared = LoraAdapter.open(self.path / "router_adapters" / "shared")
        mixer = BatchMixer()
        with mixture_of_loras(self.base.model, [shared], mixer, shared):  # shared folded in
            feats = feature_table(self.base.model, mixer, 1, encoded, self.cache)
        w = F.softmax(router.eval()(feats), -1)
        top_k = spec.get("top_k", 0)
        return top_k_of_weights(w, top_k).dense() if 0 < top_k < w.shape[-1] else w

    def _arrow(self, encoded: list[Encoded]) -> torch.Tensor:
        protos = self._prefixed("arrow.")
        out = torch.zeros(len(encoded), len(self.names))
        for idx, batch, states in self._batches(encoded):
            out[idx] = prompt_arrow_scores(
                self.base.model, protos, states, batch, self.cache.split
            ).cpu()
        return out

    def _learned(self, encoded: list[Encoded]) -> dict[int, torch.Tensor]:
        spec = self.spec
        router = LayerRouter(
            spec["layers"],
            spec["hidden"],
            len(self.names),
            spec["temperature"],
            True,
            spec["top_k"],
        )
        router.load_state_dict(self._prefixed("layer."))
        router.requires_grad_(False)
        experts = [LoraAdapter.open(self.path / "adapters" / n) for n in self.names]
        model = self.base.model
        out = {layer: torch.zeros(len(encoded), len(self.names)) for layer in spec["layers"]}
        with mixture_of_loras(model, experts, router), router.hooked(model):
            for idx, batch, states in self._batches(encoded):
                router.mask = prompt_mask(batch, states.shape[1])
                final_hidden(model, states, self.cache.split, batch.lengths)
                for layer, w in router.current.items():
                    out[layer][idx] = (w.dense() if isinstance(w, TopK) else w).float().cpu()
        return out

    def _elrea(self, encoded: list[Encoded]) -> torch.Tensor:
        from lorafuse.elrea.cluster import elrea_weights
        from lorafuse.elrea.features import gradient_features

        spec = self.spec
        if spec["features"] == "embedding":  # the baseline: normalised prompt-mean states
            states = self.cache.get(encoded, desc="route: states")
            emb = torch.stack(
                [s[: e.prompt_len].mean(0) for s, e in zip(states, encoded, strict=True)]
            )
            feats = F.normalize(emb.float(), dim=1)
        else:
            feats = gradient_features(
                self.base,
                self.path / "router_adapters" / "base",
                encoded,
                self.cache,
                dim=spec["dim"],
                seed=spec["seed"],
                adam_state=self._prefixed("second_moment."),
                progress=False,
            )
        return elrea_weights(feats, self.tensors["centroids"], spec["temperature"])


def load_router(
    path: str | Path, base: BaseModel | str | Path | None = None, *, device=None
) -> BundleRouter:
    """Open the router bundle at ``path``; ``base``: the base model (a loaded
    :class:`~lorafuse.models.BaseModel` or a folder; default the one the bundle names)."""
    path = Path(path)
    try:
        spec = json.loads((path / ROUTER_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LorafuseError(f"not a router bundle ({err.__class__.__name__})", path) from None
    if spec.get("format") != FORMAT:
        raise LorafuseError(f"router.json: format {spec.get('format')!r}, expected {FORMAT}", path)
    if not isinstance(base, BaseModel):
        base = load_base_model(base or spec["base_model"], device=device)
    return BundleRouter(path, spec, load_file(str(path / ROUTER_WEIGHTS)), base)


__all__ = ["BundleRouter", "Route", "load_router"]
