"""Router bundles: a request-level router exported for a serving engine.

``lorafuse export --library L --method M OUT`` writes

* ``OUT/adapters/NAME/``: plain PEFT adapters vLLM serves as lorafuse computes them (one
  uniform rank from :data:`~lorafuse.serving.export.VLLM_RANKS` across the bundle, scaling
  folded into B, ``lora_alpha = r``, no patterns; a re-compression is reported);
* ``OUT/router.safetensors`` + ``OUT/router.json``: the router (kind, the features it
  computes from the base model, adapter names in order, temperature / top-k, base model,
  state split) and ``OUT/router_adapters/``: adapters the router itself runs (never served);
* ``OUT/README.md``: how to serve it.

What each method's bundle serves:

* ``twin``: Twin-Merging mixes shared + Σ a_t exclusive_t per input; at request level the
  bundle serves the top-1 routed choice, ``shared + exclusive_t``, as one adapter per expert
  (the router's softmax is reported too; ``BundleRouter.mixture_adapter`` writes the exact
  per-request ``shared + Σ_t a_t exclusive_t`` as one adapter, for engines that load
  adapters at run time);
* ``arrow_top1``: request-level Arrow (:mod:`lorafuse.fusion.request_routing`), the library
  experts, one per request, exactly as lorafuse runs it;
* ``learned_router`` (per prompt): the library experts; the router gives per-layer weights
  (reported) and their mean over layers; lorafuse mixes per layer, an engine serves one
  adapter per request (the largest mean weight) unless the caller materialises the mixture
  (:meth:`lorafuse.serving.router.BundleRouter.mixture_adapter`);
* ``elrea``: the cluster experts and the base adapter, with ELREA's weights over them
  (ELREA combines their logits; an engine serves one adapter per request).

Per-token routers (``arrow``, ``hc_arrow``, ``learned_router`` with ``per_example=False``)
change the mix inside the model at every token: no engine serves them; refused.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorafuse.core.mixture import FactorSource
from lorafuse.errors import LorafuseError
from lorafuse.io import atomic_dir
from lorafuse.library import LoraFactors, module_factors, save_adapter, union_modules
from lorafuse.merging.linear import concat_factors
from lorafuse.merging.truncation import Truncation, format_summary
from lorafuse.serving.export import _write_vllm, uniform_factors, vllm_rank
from lorafuse.workspace import Workspace

BUNDLE_METHODS = ("twin", "learned_router", "elrea", "arrow_top1")
PER_TOKEN = ("arrow", "hc_arrow")
ROUTER_JSON = "router.json"
ROUTER_WEIGHTS = "router.safetensors"
FORMAT = "lorafuse-router-bundle/1"


@dataclass
class Bundle:
    """What one method's bundle holds before it is written."""

    adapters: dict[str, dict[str, LoraFactors]]  # served name -> module -> factors
    tensors: dict[str, torch.Tensor]  # the router's weights
    spec: dict[str, Any]  # the router's description (kind-specific part)
    helpers: dict[str, Path | dict[str, LoraFactors]] = field(default_factory=dict)


@dataclass
class BundleResult:
    path: Path
    rank: int
    truncation: dict[str, dict[str, Truncation]]  # adapter -> module -> loss

    def summary(self) -> str:
        lost = {f"{a}:{m}": t for a, mods in self.truncation.items() for m, t in mods.items()}
        what = format_summary(lost) if lost else "no re-compression: every adapter is exact"
        return f"wrote router bundle {self.path} at rank {self.rank}; {what}"


def refuse_unservable(method: str, params: dict[str, Any]) -> None:
    """One line for methods no engine can serve per request (or that are no routers)."""
    per_token = method in PER_TOKEN or (
        method == "learned_router" and not params.get("per_example", True)
    )
    if per_token:
        raise LorafuseError(
            f"{method} routes per token inside the model: no serving engine can serve it as "
            "one adapter per request (export arrow_top1, twin, learned_router or elrea)"
        )
    if method not in BUNDLE_METHODS:
        raise LorafuseError(
            f"no router bundle for {method!r} (have: {', '.join(BUNDLE_METHODS)}); "
            "export a merge as an adapter: lorafuse export SRC OUT --for vllm"
        )


def safe_name(name: str) -> str:
    """An adapter name an engine accepts on its command line (``--lora-modules NAME=PATH``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "adapter"


def _layer_table(sources: list[FactorSource]) -> dict[str, dict[str, LoraFactors]]:
    return {s.name: {m: s.factors(m) for m in s.module_names} for s in sources}  # type: ignore[attr-defined]


def twin_bundle(ws: Workspace, fusion) -> Bundle:
    """Top-1 choice adapters ``shared + exclusive_t``; the MLP router on the shared model."""
    # the trained router lives in the workspace's memo, next to these very sources
    shared, _, _, _, router = next(
        v for k, v in ws.memo.items() if k[0] == "twin" and v[1] is fusion.sources
    )
    sources = fusion.sources
    names = [safe_name(n) for n in ws.private]
    adapters = {}
    for name, excl in zip(names, sources, strict=True):
        adapters[name] = {
            m: concat_factors(module_factors([shared, excl], m), [1.0, 1.0])
            for m in union_modules([shared, excl])
        }
    width = router.net[0].out_features
    tensors = {f"twin.{k}": v for k, v in router.state_dict().items()}
    spec = {
        "kind": "twin",
        "features": "mean over the prompt of the final-normed last hidden state of the base "
        "model plus the shared delta (router_adapters/shared)",
        "serve": "top1",
        "top_k": int(fusion.info.get("top_k") or 0),  # the in-process mix: top-k of softmax
        "hidden": int(router.net[0].in_features),
        "width": int(width),
    }
    shared_factors = {m: shared.factors(m) for m in shared.module_names}
    return Bundle(adapters, tensors, spec, {"shared": shared_factors})


def arrow_bundle(ws: Workspace, fusion) -> Bundle:
    names = [safe_name(n) for n in ws.private]
    experts = list(ws.private.values())
    adapters = {n: dict(e.iter_factors()) for n, e in zip(names, experts, strict=True)}
    protos = fusion.route.prototypes
    spec = {
        "kind": "arrow_top1",
        "features": "per adapted module, |v_k . x| / |x| of each prompt token's input x on the "
        "base model, averaged over the prompt and the modules (v_k: expert k's top right-"
        "singular vector there)",
        "serve": "top1",
        "top_k": 1,
        "modules": list(protos),
    }
    return Bundle(adapters, {f"arrow.{m}": v for m, v in protos.items()}, spec)


def learned_router_bundle(ws: Workspace, fusion) -> Bundle:
    names = [safe_name(n) for n in ws.private]
    experts = list(ws.private.values())
    adapters = {n: dict(e.iter_factors()) for n, e in zip(names, experts, strict=True)}
    router = fusion.mixer
    spec = {
        "kind": "learned_router",
        "features": "per decoder layer, a linear map of the layer-normed input hidden states "
        "(averaged over the prompt) under the mixture of the bundle's adapters",
        "serve": "weights",
        "layers": [int(k) for k in router.proj],
        "hidden": int(next(iter(router.proj.values())).in_features),
        "temperature": float(router.temperature),
        "top_k": int(router.top_k or 0),
    }
    return Bundle(adapters, {f"layer.{k}": v for k, v in router.state_dict().items()}, spec)


def elrea_bundle(ws: Workspace, fusion, params: dict[str, Any]) -> Bundle:
    from lorafuse.elrea.pipeline import ElreaConfig, elrea_dir
    from lorafuse.io import read_json

    out = elrea_dir(ws.library, params.get("clustering", "gradient"))
    info = read_json(out / "elrea.json")
    config = ElreaConfig(**info["config"])
    temperature = params.get("temperature") or config.temperature
    clusters = [e["path"].rsplit("/", 1)[-1] for e in info["experts"]]
    base_name = safe_name(config.base_adapter)
    cluster_experts = fusion.sources[: len(clusters)]  # then the base adapter
    adapters = {
        safe_name(c): dict(s.iter_factors()) for c, s in zip(clusters, cluster_experts, strict=True)
    }
    adapters[base_name] = dict(ws.adapters[config.base_adapter].iter_factors())
    tensors = {"centroids": torch.tensor(info["centroids"], dtype=torch.float32)}
    if config.clustering != "embedding":
        v = load_file(str(out / "second_moment.safetensors"))
        tensors.update({f"second_moment.{k}": t for k, t in v.items()})
    spec = {
        "kind": "elrea",
        "features": "gradient" if config.clustering != "embedding" else "embedding",
        "serve": "weights",
        "clustering": config.clustering,
        "dim": config.dim,
        "seed": config.seed,
        "temperature": float(temperature),
    }
    return Bundle(adapters, tensors, spec, {"base": ws.adapters[config.base_adapter].path})


def export_bundle(
    ws: Workspace,
    method: str,
    out: str | Path,
    *,
    params: dict[str, Any] | None = None,
    rank: int | None = None,
    seed: int = 0,
    report: Callable[[str], None] = print,
) -> BundleResult:
    """Build ``method`` on ``ws`` and write its router bundle to ``out`` (module docstring)."""
    import lorafuse.methods  # noqa: F401  (fills the registry, ELREA's included)
    from lorafuse.fusion.registry import build_fusion

    params = dict(params or {})
    refuse_unservable(method, params)
    fusion = build_fusion(ws, method, seed=seed, **params)
    if method == "twin":
        bundle = twin_bundle(ws, fusion)
    elif method == "arrow_top1":
        bundle = arrow_bundle(ws, fusion)
    elif method == "learned_router":
        bundle = learned_router_bundle(ws, fusion)
    else:
        bundle = elrea_bundle(ws, fusion, params)
    ranks = [f.rank for mods in bundle.adapters.values() for f in mods.values()]
    r = vllm_rank(ranks, rank)
    served: dict[str, dict[str, LoraFactors]] = {}
    lost: dict[str, dict[str, Truncation]] = {}
    for name, mods in bundle.adapters.items():
        served[name], lost[name] = {}, {}
        for m, f in mods.items():
            served[name][m], info = uniform_factors(f, r, pad=True)
            if info is not None:
                lost[name][m] = info
    spec = {
        "format": FORMAT,
        "method": method,
        "params": {k: v for k, v in params.items() if isinstance(v, int | float | str | bool)},
        **bundle.spec,
        "adapters": list(bundle.adapters),
        "rank": r,
        "base_model": base_model_spec(ws),
        "split": int(ws.cache.split),
        "truncation": {
            a: {
                m: {"rel_error": t.rel_error, "energy_kept": t.energy_kept} for m, t in mods.items()
            }
            for a, mods in lost.items()
            if mods
        },
    }
    base_model = spec["base_model"]
    with atomic_dir(Path(out)) as tmp:
        for name, factors in served.items():
            _write_vllm(tmp / "adapters" / name, factors, r, base_model)
        for name, helper in bundle.helpers.items():
            dest = tmp / "router_adapters" / name
            if isinstance(helper, Path):  # the router's own copy, exactly as trained
                shutil.copytree(helper, dest)
            else:
                save_adapter(dest, helper, base_model=base_model)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in bundle.tensors.items()}
        save_file(tensors, str(tmp / ROUTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ROUTER_JSON).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(bundle_readme(spec), encoding="utf-8")
    result = BundleResult(Path(out), r, {a: m for a, m in lost.items() if m})
    report(result.summary())
    return result


def base_model_spec(ws: Workspace) -> str:
    """What ``load_router`` loads: 'embedded' for the embedded model (its converted copy is
    per machine), else the base model's folder (or, in memory, its name)."""
    from lorafuse.models import EMBEDDED, cache_root

    if ws.base.path is None:
        return ws.base.name
    embedded = cache_root() / "models" / "SmolLM2-135M-Instruct"  # models.embedded_model_dir
    return EMBEDDED if ws.base.path.resolve() == embedded.resolve() else str(ws.base.path)


def bundle_readme(spec: dict[str, Any]) -> str:
    mods = " ".join(f"{a}=adapters/{a}" for a in spec["adapters"])
    return (
        f"Router bundle of `{spec['method']}` written by lorafuse ({spec['kind']}, serves "
        f"{'the top-1 adapter' if spec['serve'] == 'top1' else 'weights over the adapters'}).\n\n"
        f"    vllm serve BASE --enable-lora --max-lora-rank {spec['rank']} "
        f"--max-loras {len(spec['adapters'])} --lora-modules {mods}\n\n"
        "    from lorafuse.serving import load_router\n"
        "    router = load_router('THIS_FOLDER')\n"
        "    for prompt, r in zip(prompts, router.route(prompts)):\n"
        "        client.completions.create(model=r.adapters[0], prompt=prompt)\n"
    )


__all__ = ["BUNDLE_METHODS", "BundleResult", "export_bundle", "refuse_unservable"]
