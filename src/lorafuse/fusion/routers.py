"""Routers: mixers that compute the experts' weights from the inputs.

* :class:`ArrowRouter` (Ostapenko et al. 2024, "Towards modular LLMs by building and reusing
  a library of LoRAs"): per adapted module, each expert's prototype is the top right-singular
  vector of its ``B A`` (from the factors, no dense matrix); per token, logits ``|v_k . x|``
  (sign-agnostic), top-k, softmax with a temperature. Training-free.
* :class:`ArrowInitRouter`: the same logits with the prototypes as trainable parameters,
  initialised from Arrow (the Trade-offs paper's "Arrow HC": routing among clusters of
  experts initialised with Arrow, then optimised by SGD); before training it is Arrow.
* :class:`LayerRouter`: a linear router per decoder layer on that layer's input hidden
  states (per token), trained by gradient descent with the experts frozen. Zero-initialised,
  so training starts from the uniform merge (with ``top_k``: from k experts, uniform).

A router that keeps k < K experts returns a :class:`~lorafuse.core.sparse.TopK`, which the
mixture core computes on the selected experts only (sparse dispatch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorafuse.core.decoder import find_layers
from lorafuse.core.mixture import MixtureLinear, Weights
from lorafuse.core.sparse import top_k_select
from lorafuse.library import LoraFactors
from lorafuse.merging.svd import factor_svd


def top_k_softmax(logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Softmax over the ``k`` largest logits of the last axis; zero elsewhere."""
    if k >= logits.shape[-1]:
        return F.softmax(logits / temperature, dim=-1)
    top = logits.topk(k, dim=-1)
    masked = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
    return F.softmax(masked / temperature, dim=-1)


def arrow_prototypes(module: MixtureLinear) -> torch.Tensor:
    """(K, d_in): each expert's top right-singular vector of its delta in this module."""
    vs = []
    for k in range(module.A.shape[0]):
        _, s, vh = factor_svd(LoraFactors(A=module.A[k], B=module.B[k], scaling=1.0))
        vs.append(vh[0] if s[0] > 0 else torch.zeros_like(vh[0]))
    return torch.stack(vs).to(module.A.dtype)


def arrow_logits(x: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Arrow's logits ``|v_k . x| / |x|`` per token: (..., d) and (K, d) -> (..., K)."""
    logits = torch.einsum("...d,kd->...k", x, protos.to(x.device, x.dtype)).abs()
    # logits scale with |x|; normalise per token so the temperature means the same
    return logits / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)


class ArrowRouter:
    """Per-token, per-module routing by prototype alignment (training-free)."""

    def __init__(self, top_k: int = 2, temperature: float = 1.0):
        self.top_k = top_k
        self.temperature = temperature
        self._prototypes: dict[str, torch.Tensor] = {}

    def weights(self, module: MixtureLinear, x: torch.Tensor) -> Weights:
        if module.name not in self._prototypes:
            self._prototypes[module.name] = arrow_prototypes(module)
        logits = arrow_logits(x, self._prototypes[module.name])
        return select(logits, self.top_k, self.temperature)


class ArrowInitRouter(nn.Module):
    """Arrow's routing with trainable prototypes (one (K, d_in) parameter per module).

    :meth:`initialise` sets them to Arrow's prototypes of the installed mixture layers, so
    the untrained router routes exactly as :class:`ArrowRouter`; then they train."""

    def __init__(self, top_k: int = 2, temperature: float = 1.0):
        super().__init__()
        self.top_k = top_k
        self.temperature = temperature
        self.protos = nn.ParameterDict()

    @staticmethod
    def key(name: str) -> str:
        return name.replace(".", "__")  # ParameterDict keys cannot hold dots

    @torch.no_grad()
    def initialise(self, model: nn.Module) -> None:
        """Arrow's prototypes of every mixture layer installed in ``model``."""
        for module in model.modules():
            if isinstance(module, MixtureLinear):
                self.protos[self.key(module.name)] = nn.Parameter(arrow_prototypes(module))

    def weights(self, module: MixtureLinear, x: torch.Tensor) -> Weights:
        logits = arrow_logits(x, self.protos[self.key(module.name)])
        return select(logits, self.top_k, self.temperature)


def select(logits: torch.Tensor, top_k: int | None, temperature: float = 1.0) -> Weights:
    """Softmax weights over all K logits, or the top-k as a :class:`TopK` when
    ``0 < top_k < K`` (whose dense form is :func:`top_k_softmax`)."""
    if top_k and top_k < logits.shape[-1]:
        return top_k_select(logits, top_k, temperature)
    return F.softmax(logits / temperature, dim=-1)


class LayerRouter(nn.Module):
    """A linear router per decoder layer on the layer's input hidden states.

    ``per_example=True`` (default): the router's logits are averaged over the prompt tokens,
    one weight vector per example and layer, reused for every answer / generated token
    (set ``mask`` (B, T) to the prompt positions, or let the first call of a ``generate``
    - the prompt - define them). ``per_example=False``: weights per token.
    ``top_k`` (0 or None: all K): keep the k largest logits, softmax over them (sparse).
    """

    def __init__(
        self,
        layers: Sequence[int],
        hidden: int,
        k: int,
        temperature: float = 1.0,
        per_example: bool = True,
        top_k: int | None = None,
    ):
        super().__init__()
        self.top_k = top_k
        self.proj = nn.ModuleDict({str(layer): nn.Linear(hidden, k) for layer in layers})
        for p in self.proj.parameters():
            nn.init.zeros_(p)
        self.temperature = temperature
        self.per_example = per_example
        self.mask: torch.Tensor | None = None  # (B, T) prompt positions, set per batch
        self.current: dict[int, Weights] = {}

    def weights(self, module: MixtureLinear, x: torch.Tensor) -> Weights:
        return self.current[module.layer]

    def _layer_weights(self, layer: int, h: torch.Tensor) -> Weights:
        # the residual stream's scale grows with depth: normalise so logits start small
        h = F.layer_norm(h, h.shape[-1:])
        logits = self.proj[str(layer)](h) / self.temperature  # (B, T, K)
        if not self.per_example:
            return select(logits, self.top_k)
        if self.mask is not None:
            m = self.mask.to(h.device, h.dtype)[..., None]
            return select((logits * m).sum(1) / m.sum(1).clamp(min=1), self.top_k)
        if h.shape[1] == 1 and layer in self.current:  # generate: keep the prompt's weights
            return self.current[layer]
        return select(logits.mean(1), self.top_k)

    @contextlib.contextmanager
    def hooked(self, model: nn.Module) -> Iterator[None]:
        """Forward pre-hooks on the routed decoder layers compute that layer's weights."""
        layers = find_layers(model)
        handles = []
        for name in self.proj:
            layer = int(name)

            def hook(mod, args, kwargs, layer=layer):
                h = args[0] if args else kwargs["hidden_states"]
                self.current[layer] = self._layer_weights(layer, h)

            handles.append(layers[layer].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.current.clear()
            self.mask = None

    def route(self, model: nn.Module, states: torch.Tensor, batch) -> None:
        """Before each scored batch: the prompt mask for per-example routing."""
        from lorafuse.fusion.base import prompt_mask

        self.mask = prompt_mask(batch, states.shape[1])
